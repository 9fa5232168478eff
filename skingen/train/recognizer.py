"""Differentiable PP-OCRv4 text recognizer in PyTorch, loaded from the ONNX weights in ``rapidocr-onnxruntime``.

The module tree mirrors PaddleOCR's inference-time (re-parameterised) PP-OCRv4 mobile recognizer:
PPLCNetV3 backbone (scale 0.95) -> SVTR neck (``EncoderWithSVTR``) -> CTC head (one linear layer).
Weights are read from the ONNX graph in the order the graph uses them, so any PaddleOCR export of this
architecture loads (the wheel's model, or a PaddleOCR-trained checkpoint exported with paddle2onnx).

Input convention, exactly as the ONNX model: ``(B, 3, 48, W)`` float, channels in **BGR** order (PaddleOCR
reads images with OpenCV), normalised ``(x/255 - 0.5)/0.5``. :func:`preprocess_crops` takes RGB crops (the
order the rest of skingen uses) and does the resize, channel swap, normalisation and padding.

The recognizer is frozen and always in eval mode: BatchNorm statistics never change, whatever
``.train()`` is called with (the training loop calls it on every module it can reach).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SkingenError

REC_HEIGHT = 48
REC_MAX_WIDTH = 320
BLANK_TOKEN = "<blank>"
DEFAULT_MODEL_NAME = "ch_PP-OCRv4_rec_infer.onnx"

# PPLCNetV3 stages for recognition at scale 0.95, as in PaddleOCR's ``NET_CONFIG_rec``
# (kernel, in, out, stride, squeeze-excite); channels already scaled and rounded to multiples of 16.
LCNETV3_REC_BLOCKS: tuple[tuple[int, int, int, tuple[int, int], bool], ...] = (
    (3, 16, 32, (1, 1), False),
    (3, 32, 64, (1, 1), False),
    (3, 64, 64, (1, 1), False),
    (3, 64, 128, (2, 1), False),
    (3, 128, 128, (1, 1), False),
    (3, 128, 240, (1, 2), False),
    (5, 240, 240, (1, 1), False),
    (5, 240, 240, (1, 1), False),
    (5, 240, 240, (1, 1), False),
    (5, 240, 240, (1, 1), False),
    (5, 240, 480, (2, 1), True),
    (5, 480, 480, (1, 1), True),
    (5, 480, 480, (2, 1), False),
    (5, 480, 480, (1, 1), False),
)


def default_model_path() -> Path:
    """The PP-OCRv4 recognition model inside the installed ``rapidocr-onnxruntime`` wheel."""
    try:
        import rapidocr_onnxruntime
    except ImportError:
        raise SkingenError(
            "rapidocr-onnxruntime is not installed, so there is no default recognizer model; "
            "install it (`pip install rapidocr-onnxruntime`) or pass a PP-OCRv4 rec ONNX file"
        ) from None
    return Path(rapidocr_onnxruntime.__file__).parent / "models" / DEFAULT_MODEL_NAME


# ---------------------------------------------------------------------------------------------------------
# Module tree. Submodules are declared in forward order: the weight loader relies on it.


class LearnableAffine(nn.Module):
    """``scale * x + bias`` with scalar parameters (PPLCNetV3's LearnableAffineBlock)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x + self.bias


class RepConvAct(nn.Module):
    """A re-parameterised LearnableRepLayer: one conv (branches and BN folded in) -> affine -> hardswish -> affine."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: tuple[int, int], groups: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=(kernel - 1) // 2, groups=groups)
        self.affine = LearnableAffine()
        self.act_affine = LearnableAffine()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act_affine(F.hardswish(self.affine(self.conv(x))))


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, channels // reduction, 1)
        self.expand = nn.Conv2d(channels // reduction, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.expand(F.relu(self.reduce(x.mean(dim=(2, 3), keepdim=True))))
        return x * F.hardsigmoid(gate)


class LCNetV3Block(nn.Module):
    """Depthwise conv (kxk) -> optional squeeze-excite -> pointwise conv."""

    def __init__(self, kernel: int, in_ch: int, out_ch: int, stride: tuple[int, int], use_se: bool) -> None:
        super().__init__()
        self.depthwise = RepConvAct(in_ch, in_ch, kernel, stride, groups=in_ch)
        self.se = SqueezeExcite(in_ch) if use_se else nn.Identity()
        self.pointwise = RepConvAct(in_ch, out_ch, 1, (1, 1), groups=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.se(self.depthwise(x)))


class PPLCNetV3(nn.Module):
    """Backbone: (B, 3, 48, W) -> (B, 480, 1, W/8) after the inference-time (3, 2) average pool."""

    def __init__(self) -> None:
        super().__init__()
        self.stem_conv = nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(16)
        self.blocks = nn.Sequential(*(LCNetV3Block(*spec) for spec in LCNETV3_REC_BLOCKS))
        self.out_channels = LCNETV3_REC_BLOCKS[-1][2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem_bn(self.stem_conv(x)))
        return F.avg_pool2d(x, kernel_size=(3, 2), stride=(3, 2))


class ConvBNSwish(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, kernel: tuple[int, int]) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel, padding=(kernel[0] // 2, kernel[1] // 2), bias=False)
        self.bn = nn.BatchNorm2d(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.bn(self.conv(x)))


class SVTRAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        qkv = self.qkv(x).reshape(batch, length, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(batch, length, dim))


class SVTRBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn = SVTRAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.fc1 = nn.Linear(dim, int(dim * mlp_ratio))
        self.fc2 = nn.Linear(int(dim * mlp_ratio), dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.silu(self.fc1(self.norm2(x))))


class SVTRNeck(nn.Module):
    """PaddleOCR's ``EncoderWithSVTR``: local convs, global SVTR mixing over the width, fused with a shortcut.

    (B, 480, 1, T) -> (B, T, 120): the sequence features the CTC head reads (AnyText's "neck" features).
    """

    def __init__(self, in_ch: int = 480, dims: int = 120, depth: int = 2, hidden: int = 120) -> None:
        super().__init__()
        self.conv1 = ConvBNSwish(in_ch, in_ch // 8, (1, 3))
        self.conv2 = ConvBNSwish(in_ch // 8, hidden, (1, 1))
        self.blocks = nn.ModuleList(SVTRBlock(hidden, num_heads=8, mlp_ratio=2.0) for _ in range(depth))
        self.norm = nn.LayerNorm(hidden, eps=1e-6)
        self.conv3 = ConvBNSwish(hidden, in_ch, (1, 1))
        self.conv4 = ConvBNSwish(2 * in_ch, in_ch // 8, (1, 3))
        self.conv1x1 = ConvBNSwish(in_ch // 8, dims, (1, 1))
        self.out_channels = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        z = self.conv2(self.conv1(x))
        batch, channels, height, width = z.shape
        z = z.flatten(2).transpose(1, 2)
        for block in self.blocks:
            z = block(z)
        z = self.norm(z).reshape(batch, height, width, channels).permute(0, 3, 1, 2)
        z = self.conv1x1(self.conv4(torch.cat([shortcut, self.conv3(z)], dim=1)))
        return z.squeeze(2).transpose(1, 2)


class PPOCRRecognizer(nn.Module):
    """Frozen PP-OCRv4 recognizer; always in eval mode.

    ``forward(x)`` returns pre-softmax **logits** ``(B, T, C)`` (the ONNX model outputs ``softmax`` of these);
    ``log_probs(x)`` gives log-softmax for ``F.ctc_loss`` (transpose to ``(T, B, C)``), ``probs(x)`` the
    ONNX-equivalent probabilities, ``features(x)`` the neck features ``(B, T, 120)``.
    ``charset[0]`` is the CTC blank; T = W / 8.
    """

    def __init__(self, charset: Sequence[str]) -> None:
        super().__init__()
        self.charset = list(charset)
        self.backbone = PPLCNetV3()
        self.neck = SVTRNeck(in_ch=self.backbone.out_channels)
        self.head = nn.Linear(self.neck.out_channels, len(self.charset))

    def train(self, mode: bool = True) -> PPOCRRecognizer:
        # Frozen scorer: stay in eval so BatchNorm uses its stored statistics, whatever the caller asks.
        return super().train(False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.neck(self.backbone(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def log_probs(self, x: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self(x).float(), dim=-1)

    def probs(self, x: torch.Tensor) -> torch.Tensor:
        return F.softmax(self(x).float(), dim=-1)

    @torch.no_grad()
    def read(self, x: torch.Tensor) -> list[tuple[str, float]]:
        """Greedy CTC reading of a preprocessed batch: ``[(text, mean confidence), ...]``."""
        return ctc_greedy_decode(self.probs(x), self.charset)


# ---------------------------------------------------------------------------------------------------------
# Loading from ONNX.


def _onnx_constants(graph) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    constants[node.output[0]] = numpy_helper.to_array(attr.t)
    return constants


def _onnx_weights_in_use_order(graph) -> list[tuple[str, np.ndarray]]:
    """Float parameters in the order the graph first uses them (paddle2onnx's ``p2o.*`` op constants excluded)."""
    constants = _onnx_constants(graph)
    seen: set[str] = set()
    ordered = []
    for node in graph.node:
        for name in node.input:
            if name in seen or name not in constants or name.startswith("p2o."):
                continue
            value = constants[name]
            if value.dtype.kind != "f":
                continue
            seen.add(name)
            ordered.append((name, value))
    return ordered


def _torch_weight_slots(model: nn.Module) -> list[tuple[str, torch.Tensor, bool]]:
    """``(state_dict key, tensor, transposed)`` in forward order, matching the ONNX graph's use order."""
    slots = []
    for prefix, module in model.named_modules():
        names: tuple[str, ...]
        if isinstance(module, nn.Conv2d):
            names = ("weight", "bias") if module.bias is not None else ("weight",)
        elif isinstance(module, nn.BatchNorm2d):
            names = ("weight", "bias", "running_mean", "running_var")
        elif isinstance(module, (nn.LayerNorm, nn.Linear)):
            names = ("weight", "bias")
        elif isinstance(module, LearnableAffine):
            names = ("scale", "bias")
        else:
            continue
        for name in names:
            # ONNX MatMul weights are (in, out); nn.Linear stores (out, in).
            transposed = isinstance(module, nn.Linear) and name == "weight"
            slots.append((f"{prefix}.{name}", getattr(module, name), transposed))
    return slots


def read_charset(model_path: str | Path, character_dict_path: str | Path | None = None) -> list[str]:
    """The recognizer's classes: blank, the model's characters, then the space class (PaddleOCR's order).

    Characters come from ``character_dict_path`` (PaddleOCR's ``rec_char_dict_path``: one per line) when
    given, else from the ONNX metadata ``character`` that RapidOCR's models carry.
    """
    if character_dict_path is not None:
        path = Path(character_dict_path)
        if not path.is_file():
            raise SkingenError(f"{path}: character dictionary not found (expected PaddleOCR's one-character-per-line .txt)")
        chars = path.read_text(encoding="utf-8").splitlines()
    else:
        import onnx

        meta = {prop.key: prop.value for prop in onnx.load(str(model_path), load_external_data=False).metadata_props}
        if "character" not in meta:
            raise SkingenError(
                f"{model_path}: the model carries no 'character' metadata; pass the PaddleOCR character "
                "dictionary it was trained with (--recognizer_char_dict / character_dict_path)"
            )
        chars = meta["character"].splitlines()
    return [BLANK_TOKEN, *chars, " "]


def load_recognizer(
    path: str | Path | None = None,
    *,
    character_dict_path: str | Path | None = None,
    device: str | torch.device | None = None,
) -> PPOCRRecognizer:
    """Build :class:`PPOCRRecognizer` from a PP-OCRv4 (mobile) recognition ONNX file; frozen, eval, fp32.

    ``path=None`` uses the model in rapidocr-onnxruntime's wheel.
    """
    import onnx

    model_path = Path(path) if path is not None else default_model_path()
    if not model_path.is_file():
        raise SkingenError(
            f"{model_path}: recognizer model not found; pass a PP-OCRv4 recognition .onnx file "
            "(e.g. ch_PP-OCRv4_rec_infer.onnx, or a PaddleOCR checkpoint exported with paddle2onnx), "
            "or leave it unset for the model shipped with rapidocr-onnxruntime"
        )
    try:
        graph = onnx.load(str(model_path)).graph
    except Exception as err:  # onnx raises DecodeError and friends for non-ONNX files
        raise SkingenError(f"{model_path}: not a readable ONNX model ({type(err).__name__}: {err})") from None

    charset = read_charset(model_path, character_dict_path)
    weights = _onnx_weights_in_use_order(graph)
    if not weights:
        raise SkingenError(f"{model_path}: the ONNX graph holds no weights")
    num_classes = weights[-1][1].shape[0]
    if len(charset) == num_classes + 1:
        charset = charset[:-1]  # trained with use_space_char: False
    if len(charset) != num_classes:
        hint = "" if character_dict_path is None else f" (dictionary {character_dict_path})"
        raise SkingenError(
            f"{model_path}: the CTC head has {num_classes} classes but the character list{hint} gives "
            f"{len(charset)} (blank + {len(charset) - 2} characters + space); pass the dictionary the model was trained with"
        )

    model = PPOCRRecognizer(charset)
    slots = _torch_weight_slots(model)
    not_this_architecture = (
        f"{model_path}: not a PP-OCRv4 mobile recognition model (PPLCNetV3 backbone + SVTR neck + CTC head)"
    )
    if len(slots) != len(weights):
        raise SkingenError(f"{not_this_architecture}: it has {len(weights)} weight tensors, expected {len(slots)}")
    state = {}
    for (key, tensor, transposed), (onnx_name, value) in zip(slots, weights):
        value = torch.tensor(value.T if transposed else value, dtype=torch.float32)
        if value.numel() == tensor.numel() and value.dim() != tensor.dim():
            value = value.reshape(tensor.shape)  # scalars stored as () or (1,)
        if value.shape != tensor.shape:
            raise SkingenError(
                f"{not_this_architecture}: weight '{onnx_name}' has shape {tuple(value.shape)}, "
                f"expected {tuple(tensor.shape)} for {key}"
            )
        state[key] = value
    model.load_state_dict(state, strict=False)  # BatchNorm's num_batches_tracked is not in ONNX
    model.requires_grad_(False)
    model.eval()
    if device is not None:
        model.to(device)
    return model


# ---------------------------------------------------------------------------------------------------------
# Charset: encoding targets and greedy decoding.


def _map_char(ch: str, char_to_index: dict[str, int]) -> list[int] | None:
    if ch in char_to_index:
        return [char_to_index[ch]]
    # Full-width letters/digits, ideographic space, compatibility forms -> their canonical characters.
    normalised = unicodedata.normalize("NFKC", ch)
    if normalised and all(c in char_to_index for c in normalised):
        return [char_to_index[c] for c in normalised]
    # Half-width punctuation whose full-width form is in the dictionary (e.g. "?" -> "？").
    if "!" <= ch <= "~":
        wide = chr(ord(ch) + 0xFEE0)
        if wide in char_to_index:
            return [char_to_index[wide]]
    return None


def encode_texts(texts: Sequence[str], charset: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """CTC targets for ``F.ctc_loss``: ``(targets concatenated (sum(lengths),) long, target_lengths (B,), n_unknown)``.

    Characters missing from the dictionary are mapped through NFKC (full-width -> half-width) or to their
    full-width form; the rest are dropped and counted in ``n_unknown``.
    """
    char_to_index = {ch: i for i, ch in enumerate(charset) if i > 0}
    targets: list[int] = []
    lengths = []
    unknown = 0
    for text in texts:
        indices: list[int] = []
        for ch in text:
            mapped = _map_char(ch, char_to_index)
            if mapped is None:
                unknown += 1
            else:
                indices.extend(mapped)
        targets.extend(indices)
        lengths.append(len(indices))
    return torch.tensor(targets, dtype=torch.long), torch.tensor(lengths, dtype=torch.long), unknown


def ctc_greedy_decode(probs: torch.Tensor | np.ndarray, charset: Sequence[str]) -> list[tuple[str, float]]:
    """Best-path CTC decoding of probabilities ``(B, T, C)``: merge repeats, drop blanks (index 0).

    The score is the mean probability of the kept characters (0 for an empty reading), as RapidOCR reports it.
    """
    if isinstance(probs, torch.Tensor):
        probs = probs.detach().float().cpu().numpy()
    best = probs.argmax(axis=2)
    best_prob = probs.max(axis=2)
    results = []
    for indices, scores in zip(best, best_prob):
        keep = indices != 0
        keep[1:] &= indices[1:] != indices[:-1]
        text = "".join(charset[i] for i in indices[keep])
        results.append((text, float(scores[keep].mean()) if keep.any() else 0.0))
    return results


# ---------------------------------------------------------------------------------------------------------
# Preprocessing (differentiable for torch tensors).


def normalize_for_recognizer(rgb: torch.Tensor, value_range: tuple[float, float] = (0.0, 255.0)) -> torch.Tensor:
    """RGB ``(..., 3, H, W)`` in ``value_range`` -> the recognizer's input: BGR, ``(x/255 - 0.5)/0.5``."""
    low, high = value_range
    unit = (rgb - low) / (high - low)
    return (unit.flip(-3) - 0.5) / 0.5


def preprocess_crops(
    crops: Sequence[torch.Tensor | np.ndarray],
    *,
    height: int = REC_HEIGHT,
    max_width: int = REC_MAX_WIDTH,
    value_range: tuple[float, float] = (0.0, 255.0),
) -> torch.Tensor:
    """Text-line crops -> a recognizer batch ``(B, 3, height, max_width)``.

    Each crop (torch ``(3, h, w)`` RGB in ``value_range``, or a numpy ``(h, w, 3)`` RGB uint8 image) is resized
    to ``height`` keeping its aspect ratio (width capped at ``max_width``), normalised, and zero-padded on
    the right (zero is mid-grey after normalisation, as PaddleOCR pads). Torch inputs keep their gradients.
    """
    if len(crops) == 0:
        raise ValueError("preprocess_crops needs at least one crop")
    batch = []
    for crop in crops:
        if isinstance(crop, np.ndarray):
            if crop.ndim != 3 or crop.shape[2] != 3:
                raise ValueError(f"numpy crops must be (h, w, 3) RGB, got shape {crop.shape}")
            tensor = torch.from_numpy(np.array(crop, dtype=np.float32)).permute(2, 0, 1)
            crop_range = (0.0, 255.0)
        else:
            tensor = crop.float()
            crop_range = value_range
        crop_h, crop_w = tensor.shape[-2:]
        width = max(1, min(max_width, int(np.ceil(height * crop_w / max(crop_h, 1)))))
        resized = F.interpolate(
            tensor[None], size=(height, width), mode="bilinear", align_corners=False,
            antialias=crop_h > height or crop_w > width,
        )[0]
        normalised = normalize_for_recognizer(resized, crop_range)
        batch.append(F.pad(normalised, (0, max_width - width)))
    return torch.stack(batch)
