"""An exponential moving average of the trained ControlNet's weights (``--use_ema``), with diffusers' ``EMAModel``.

After every optimizer step ``shadow -= (1 - d) * (shadow - weights)`` with diffusers' decay schedule
``d = min(ema_decay, (1 + k) / (10 + k))``, ``k = step - ema_update_after_step - 1`` (``d = 0``, a plain copy,
while ``k <= 0``). The average is part of each checkpoint (accelerate's custom state, so resuming continues it
exactly), is saved as a loadable ControlNet in ``OUTPUT_DIR/ema`` next to the raw weights in ``OUTPUT_DIR``, and
is swapped in for validation grids.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

EMA_SUBFOLDER = "ema"


class WeightsEMA:
    """The moving average of one model's trainable weights; ``state_dict``/``load_state_dict`` for checkpoints."""

    def __init__(self, model: torch.nn.Module, *, decay: float, update_after_step: int, device,
                 foreach: bool = False):
        from diffusers.training_utils import EMAModel

        self.device = torch.device(device)
        self.average = EMAModel(
            [p for p in model.parameters() if p.requires_grad], decay=decay, update_after_step=update_after_step,
            model_cls=type(model), model_config=model.config, foreach=foreach,
        )
        self.average.to(self.device)

    @staticmethod
    def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]

    @property
    def optimization_step(self) -> int:
        return self.average.optimization_step

    def step(self, model: torch.nn.Module) -> None:
        """Fold the model's current weights into the average (call once per optimizer step)."""
        self.average.step(self.trainable(model))

    @contextlib.contextmanager
    def swapped_in(self, model: torch.nn.Module):
        """The model carries the averaged weights inside the block, its own weights again after it."""
        parameters = self.trainable(model)
        self.average.store(parameters)
        self.average.copy_to(parameters)
        try:
            yield model
        finally:
            self.average.restore(parameters)

    def save(self, model: torch.nn.Module, output_dir: str | Path, save_weights) -> Path:
        """Write the averaged weights as a model folder ``output_dir/ema`` with ``save_weights(model, folder)``."""
        with self.swapped_in(model):
            return save_weights(model, Path(output_dir) / EMA_SUBFOLDER)

    def state_dict(self) -> dict:
        return self.average.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.average.load_state_dict(state)
        self.average.to(self.device)  # accelerate loads custom states onto the CPU
