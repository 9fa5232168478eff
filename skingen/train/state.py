"""What a training run counts and checkpoints: the plan of steps over the seeded data stream, the loss sums of one
optimizer step, and the state a checkpoint stores and a resume reads back."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingPlan:
    """How the seeded data stream is cut into steps: global batches of ``global_batch_size`` rows, an optimizer
    step every ``accumulation`` of them."""

    num_rows: int
    batch_size: int  # per process
    processes: int
    accumulation: int
    max_train_steps: int

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.processes

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(self.num_rows / self.global_batch_size)


@dataclass
class LossWindow:
    """Named loss sums over the micro-batches of one optimizer step, each already divided by processes x
    accumulation (so the sums are the step's means), and whether every micro-batch was finite."""

    names: tuple[str, ...]
    sums: dict[str, float] = field(default_factory=dict)
    finite: bool = True
    extra_logs: dict[str, float] = field(default_factory=dict)

    def add(self, accelerator, parts: dict[str, torch.Tensor | None], scale: float) -> bool:
        """Add one micro-batch's ``parts`` (``loss``, the total that is trained on, first); returns whether its loss
        was finite on every process. One collective tells every process whether any process saw a non-finite loss,
        so all skip together."""
        loss = parts["loss"]
        zero = torch.zeros((), device=loss.device)
        values = [(~torch.isfinite(loss.detach())).float()]
        values += [parts[name].detach().float() if parts.get(name) is not None else zero for name in self.names]
        reduced = accelerator.reduce(torch.stack(values), reduction="sum").cpu().double()
        finite = reduced[0].item() == 0
        self.finite = self.finite and finite
        for name, value in zip(self.names, reduced[1:].tolist()):
            self.sums[name] = self.sums.get(name, 0.0) + value * scale
        return finite

    def logs(self) -> dict[str, float]:
        return {**{name: self.sums.get(name, 0.0) for name in self.names}, **self.extra_logs}

    def reset(self) -> None:
        self.sums, self.finite, self.extra_logs = {}, True, {}


@dataclass
class TrainingState:
    """The counters of a run and what a checkpoint stores (written by :meth:`checkpoint`, read by :meth:`resume`).

    The position in the seeded data order is ``global_step * accumulation`` global batches (``micro_step``);
    the epoch follows from it.
    """

    seed: int
    plan: TrainingPlan
    global_step: int = 0
    nonfinite_steps: int = 0
    nonfinite_in_a_row: int = 0

    @property
    def micro_step(self) -> int:
        return self.global_step * self.plan.accumulation

    @property
    def epoch(self) -> int:
        return self.micro_step // self.plan.batches_per_epoch

    @property
    def finished(self) -> bool:
        return self.global_step >= self.plan.max_train_steps

    def record_step(self, finite: bool) -> None:
        self.global_step += 1
        if finite:
            self.nonfinite_in_a_row = 0
        else:
            self.nonfinite_steps += 1
            self.nonfinite_in_a_row += 1

    def checkpoint(self) -> dict[str, Any]:
        return {
            "global_step": self.global_step, "seed": self.seed, "nonfinite_steps": self.nonfinite_steps,
            "nonfinite_in_a_row": self.nonfinite_in_a_row, "epoch": self.epoch, "micro_step": self.micro_step,
            "global_batch_size": self.plan.global_batch_size, "num_rows": self.plan.num_rows,
            "max_train_steps": self.plan.max_train_steps,
        }

    def resume(self, saved: dict[str, Any], path: Path) -> None:
        """Continue from a checkpoint's state (diffusers' own checkpoints carry only the step)."""
        if (saved.get("global_batch_size"), saved.get("num_rows")) not in ((None, None),
                                                                          (self.plan.global_batch_size, self.plan.num_rows)):
            logger.warning(f"{path}: saved with global batch {saved.get('global_batch_size')} over "
                           f"{saved.get('num_rows')} rows, now {self.plan.global_batch_size} over {self.plan.num_rows}; "
                           "the data order will differ from an uninterrupted run")
        self.global_step = int(saved.get("global_step", 0))
        self.nonfinite_steps = int(saved.get("nonfinite_steps", 0))
        self.nonfinite_in_a_row = int(saved.get("nonfinite_in_a_row", 0))
