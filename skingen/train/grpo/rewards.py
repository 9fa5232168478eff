"""The rewards of GRPO are ``evaluate.py``'s metrics on each sampled image, computed by the same functions:
``edge_f1`` (Canny edges of the image against its control, ``--tolerance`` pixels), ``ocr_ned`` (1 - normalised
edit distance of the recogniser's reading of each text box against the row's ``texts``) and ``ocr_accuracy``
(fraction of boxes read exactly), through the recogniser ``evaluate.py`` uses (``--ocr_backend``).

``--reward edge_f1=1,ocr_ned=0.5`` names the rewards and their weights (a bare name weighs 1). A reward that does
not apply to a row (OCR on a row without boxes) is NaN: left out of its statistics, 0 in the weighted sum (every
image of a group shares the row, so it moves no advantage).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ...errors import SkingenError
from ...evaluate.metrics import edge_scores, text_metrics

REWARD_NAMES = ("edge_f1", "ocr_ned", "ocr_accuracy")
TEXT_REWARDS = ("ocr_ned", "ocr_accuracy")


def parse_reward_weights(text: str) -> dict[str, float]:
    """``"edge_f1=1,ocr_ned=0.5"`` (or ``"edge_f1,ocr_ned"``) -> ``{"edge_f1": 1.0, "ocr_ned": 0.5}``."""
    weights: dict[str, float] = {}
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        name, _, weight = part.partition("=")
        name = name.strip()
        if name not in REWARD_NAMES:
            raise SkingenError(f"--reward {text}: unknown reward {name!r}; choose from {', '.join(REWARD_NAMES)} "
                               "(e.g. --reward edge_f1=1,ocr_ned=0.5)")
        try:
            weights[name] = float(weight) if weight else 1.0
        except ValueError:
            raise SkingenError(f"--reward {text}: weight {weight!r} of {name} is not a number") from None
    if not weights or not any(weights.values()):
        raise SkingenError(f"--reward {text!r}: name at least one reward with a non-zero weight, e.g. edge_f1=1")
    return weights


@dataclass
class RewardInput:
    """What one sampled image is scored against: its control (white edges on black, at the image's size) and the
    row's text boxes (quads in the image's pixels) with their texts."""

    control: Image.Image
    boxes: Sequence = ()
    texts: Sequence[str] = ()


class Rewards:
    """Scores sampled images with the named rewards; ``ocr`` is an ``skingen.prep.ocr`` backend (needed only when a text
    reward is named)."""

    def __init__(self, weights: dict[str, float], *, ocr=None, tolerance: int = 2, low: int = 50, high: int = 80):
        self.weights = dict(weights)
        self.ocr = ocr
        self.tolerance, self.low, self.high = tolerance, low, high
        if self.needs_ocr and ocr is None:
            raise SkingenError("the text rewards (ocr_ned, ocr_accuracy) need an OCR backend; --ocr_backend none "
                               "leaves only edge_f1")

    @property
    def names(self) -> list[str]:
        return list(self.weights)

    @property
    def needs_ocr(self) -> bool:
        return any(name in TEXT_REWARDS for name in self.weights)

    def score(self, images: Sequence[Image.Image], inputs: Sequence[RewardInput]) -> dict[str, np.ndarray]:
        """Each named reward per image (NaN where it does not apply)."""
        scores = {name: np.full(len(images), np.nan) for name in self.weights}
        for index, (image, given) in enumerate(zip(images, inputs)):
            if "edge_f1" in scores:
                scores["edge_f1"][index] = edge_scores(image, given.control, self.tolerance, self.low, self.high).f1
            if self.needs_ocr and len(given.boxes):
                text = text_metrics(image, [np.asarray(box) for box in given.boxes], list(given.texts), self.ocr)
                if "ocr_ned" in scores:
                    scores["ocr_ned"][index] = text.ned
                if "ocr_accuracy" in scores:
                    scores["ocr_accuracy"][index] = text.sentence_accuracy
        return scores

    def total(self, scores: dict[str, np.ndarray]) -> np.ndarray:
        """The weighted sum the advantages come from."""
        return sum(weight * np.nan_to_num(scores[name], nan=0.0) for name, weight in self.weights.items())
