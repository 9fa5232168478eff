"""Several conditioning images per row (``--conditioning_image_column A B ...``), concatenated on channels.

A ControlNet for ``n`` conditioning images takes ``3 * n`` input channels, in the order of the columns. A new
ControlNet is initialised from the UNet with that many channels (``ControlNetModel.from_unet(...,
conditioning_channels=3n)``); a pretrained one with fewer channels (e.g. a Canny ControlNet) is widened with
zero weights for the added channels, so it starts out exactly as the pretrained model on its own condition and
learns to use the others. At inference the images are stacked the same way (``stack_conditions``).
"""

from __future__ import annotations

import torch

from ..errors import SkingenError

CHANNELS_PER_IMAGE = 3


def conditioning_channels(num_images: int) -> int:
    return CHANNELS_PER_IMAGE * num_images


def controlnet_input_conv(controlnet) -> torch.nn.Conv2d:
    return controlnet.controlnet_cond_embedding.conv_in


def match_conditioning_channels(controlnet, num_images: int, *, new: bool = False, source: str = "the ControlNet"):
    """``controlnet`` taking ``3 * num_images`` channels: as is, or widened with zero weights for the new channels
    of a pretrained ControlNet; a ``new`` one (just initialised from the UNet) gets a freshly initialised input
    layer of that width, as ``ControlNetModel.from_unet(unet, conditioning_channels=3n)`` builds it."""
    wanted = conditioning_channels(num_images)
    have = controlnet.config.conditioning_channels
    if have == wanted:
        return controlnet
    conv = controlnet_input_conv(controlnet)
    if new:
        controlnet.controlnet_cond_embedding.conv_in = torch.nn.Conv2d(
            wanted, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
            dtype=conv.weight.dtype, device=conv.weight.device)
        controlnet.register_to_config(conditioning_channels=wanted)
        return controlnet
    if have > wanted:
        raise SkingenError(
            f"{source} takes {have} conditioning channels ({have // CHANNELS_PER_IMAGE} images) but "
            f"{num_images} --conditioning_image_column were given; name {have // CHANNELS_PER_IMAGE} columns"
        )
    widened = torch.nn.Conv2d(wanted, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                              dtype=conv.weight.dtype, device=conv.weight.device)
    with torch.no_grad():
        widened.weight.zero_()
        widened.weight[:, :have] = conv.weight
        widened.bias.copy_(conv.bias)
    controlnet.controlnet_cond_embedding.conv_in = widened
    controlnet.register_to_config(conditioning_channels=wanted)
    return controlnet


def kaiming_conditioning_encoder(controlnet, seed: int = 0):
    """Re-initialise the convolutions of a new ControlNet's conditioning encoder with Kaiming (He) normal weights
    and zero biases, leaving its zero-initialised output conv as it is (the ControlNet still starts as a no-op).

    With PyTorch's default init each conv + SiLU of the encoder shrinks its input's scale (to about 1% after the
    seven convolutions of SDXL's encoder), so the zero conv's gradient, which is proportional to those features, is
    about 100x smaller than the latents' path gets and the control is ignored at first (measured on the demo's tiny
    model, one seed: after 400 steps a black control changed no output pixel). He init keeps the scale through the
    SiLUs; the same run's outputs then moved by 0.025 when the control was blacked out."""
    embedding = controlnet.controlnet_cond_embedding
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for conv in (embedding.conv_in, *embedding.blocks):
            fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
            std = (2.0 / fan_in) ** 0.5
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * std)
            conv.bias.zero_()
    return controlnet


def stack_conditions(images: list[torch.Tensor]) -> torch.Tensor:
    """Conditioning images ``(B, 3, H, W)`` in [0, 1], one per column, as the ControlNet's input ``(B, 3n, H, W)``."""
    return images[0] if len(images) == 1 else torch.cat(images, dim=1)
