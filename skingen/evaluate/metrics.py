"""Evaluation metrics: layout adherence (Canny-edge F1), text accuracy on known boxes, optional CLIP score.

- Edge F1 follows ControlNet++: Canny edges of the generated image against the control's
  edges, matched within a pixel tolerance.
- Text metrics follow AnyText: each ground-truth box is cut out and recognised; a line is
  correct when the string matches exactly (sentence accuracy), and the normalised edit
  distance is ``1 - levenshtein / max(len)`` (a similarity: 1.0 is a perfect read).
- CLIP score follows torchmetrics: ``100 * max(cos(image, text), 0)``.
- Diversity: for each control (and prompt) generated with several seeds, the mean pairwise distance of
  its images: ``1 - SSIM`` of downscaled grey images by default (SSIM as Wang et al. 2004 and
  scikit-image's ``structural_similarity(gaussian_weights=True)``), or ``1 - cos`` of the image
  embeddings of a local CLIP/DINO model (a perceptual distance). 0 means every seed gave the same image.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ..data.images import open_rgb
from ..errors import SkingenError
from ..prep.glyphs import canny_control
from ..prep.ocr import crop_quad


@dataclass
class EdgeScores:
    precision: float
    recall: float
    f1: float


def _as_rgb_array(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim == 2:
        return np.stack([array] * 3, axis=-1)
    return array[..., :3]


def binarize_control(control) -> np.ndarray:
    """A control image (white lines on black) as a bool edge map."""
    gray = np.asarray(control.convert("L")) if isinstance(control, Image.Image) else _as_rgb_array(control).max(axis=-1)
    return gray > 127


def _disk(radius: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def edge_map_scores(predicted: np.ndarray, target: np.ndarray, tolerance: int = 2) -> EdgeScores:
    """Precision/recall/F1 of two bool edge maps of one size; an edge pixel counts as matched when the
    other map has an edge within ``tolerance`` pixels (Euclidean disk)."""
    if predicted.shape != target.shape:
        raise ValueError(f"edge maps differ in shape: {predicted.shape} vs {target.shape}")
    if tolerance < 0:
        raise SkingenError(f"--tolerance must be >= 0 pixels, got {tolerance}")
    predicted = predicted.astype(bool)
    target = target.astype(bool)
    n_pred, n_target = int(predicted.sum()), int(target.sum())
    if n_pred == 0 and n_target == 0:
        return EdgeScores(1.0, 1.0, 1.0)
    kernel = _disk(tolerance)
    near_target = cv2.dilate(target.astype(np.uint8), kernel) > 0
    near_pred = cv2.dilate(predicted.astype(np.uint8), kernel) > 0
    precision = float((predicted & near_target).sum() / n_pred) if n_pred else 0.0
    recall = float((target & near_pred).sum() / n_target) if n_target else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return EdgeScores(precision, recall, f1)


def edge_scores(generated, control, tolerance: int = 2, low: int = 50, high: int = 80) -> EdgeScores:
    """Canny edges of ``generated`` (thresholds ``low``/``high``, as the canny control is made) against the
    binarised ``control``. The generated image is resized to the control's size first."""
    control_edges = binarize_control(control)
    height, width = control_edges.shape
    pixels = _as_rgb_array(generated)
    if pixels.shape[:2] != (height, width):
        pixels = cv2.resize(np.ascontiguousarray(pixels), (width, height), interpolation=cv2.INTER_AREA)
    generated_edges = np.asarray(canny_control(pixels, low, high))[..., 0] > 0
    return edge_map_scores(generated_edges, control_edges, tolerance)


def edge_f1(generated, control, tolerance: int = 2, low: int = 50, high: int = 80) -> float:
    """F1 between the generated image's Canny edges and the control's edges, within ``tolerance`` pixels."""
    return edge_scores(generated, control, tolerance, low, high).f1


def levenshtein(a: Sequence, b: Sequence) -> int:
    """Edit distance (insertions, deletions, substitutions all cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, item_a in enumerate(a, start=1):
        current = [i]
        for j, item_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (item_a != item_b)))
        previous = current
    return previous[-1]


def normalized_edit_distance(a: str, b: str) -> float:
    """AnyText's NED: ``1 - levenshtein(a, b) / max(len(a), len(b))``; 1.0 for identical strings (both empty too)."""
    longest = max(len(a), len(b))
    if longest == 0:
        return 1.0
    return 1.0 - levenshtein(a, b) / longest


def sentence_accuracy(predictions: Sequence[str], targets: Sequence[str]) -> float:
    """Fraction of lines read exactly right."""
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions for {len(targets)} targets")
    if not targets:
        return float("nan")
    return sum(p == t for p, t in zip(predictions, targets)) / len(targets)


def normalize_text(text: str) -> str:
    """Strings are compared without surrounding whitespace (captions often carry a trailing space)."""
    return text.strip()


@dataclass
class LineResult:
    target: str
    predicted: str
    score: float
    correct: bool
    ned: float


@dataclass
class TextMetrics:
    lines: list[LineResult] = field(default_factory=list)

    @property
    def sentence_accuracy(self) -> float:
        return sentence_accuracy([line.predicted for line in self.lines], [line.target for line in self.lines])

    @property
    def ned(self) -> float:
        return float(np.mean([line.ned for line in self.lines])) if self.lines else float("nan")


def text_metrics(
    image, boxes: Sequence, texts: Sequence[str], ocr, box_scale: tuple[float, float] = (1.0, 1.0)
) -> TextMetrics:
    """Recognise each ground-truth box of ``image`` with ``ocr`` and compare with its text.

    ``boxes`` are 4-point quads; ``box_scale`` (sx, sy) maps them onto ``image`` when they were given in
    another image's pixels (e.g. the dataset image at 1024 and the generated one at 512).
    """
    if len(boxes) != len(texts):
        raise SkingenError(f"{len(boxes)} boxes but {len(texts)} texts; each box needs exactly one text")
    # A box without a string is layout, not text (e.g. an icon key of a package's own keyboard): not scored.
    boxes, texts = zip(*[(b, t) for b, t in zip(boxes, texts) if normalize_text(t)]) if any(map(normalize_text, texts)) else ((), ())
    pixels = np.ascontiguousarray(_as_rgb_array(image))
    scale = np.asarray(box_scale, dtype=np.float32)
    crops = [crop_quad(pixels, np.asarray(box, dtype=np.float32) * scale) for box in boxes]
    reads = ocr.recognize(crops) if crops else []
    lines = []
    for target, (predicted, score) in zip(texts, reads):
        target, predicted = normalize_text(target), normalize_text(predicted)
        lines.append(
            LineResult(
                target, predicted, float(score), predicted == target, normalized_edit_distance(predicted, target)
            )
        )
    return TextMetrics(lines)


class ClipScorer:
    """CLIP score of image/prompt pairs with a transformers CLIP model from a local folder (or hub id online)."""

    def __init__(self, model_name_or_path: str | os.PathLike, device: str = "cpu"):
        from transformers import CLIPModel, CLIPProcessor

        source = str(model_name_or_path)
        try:
            self.processor = CLIPProcessor.from_pretrained(source)
            self.model = CLIPModel.from_pretrained(source).to(device).eval()
        except (OSError, ValueError) as err:  # a path that is not a folder reaches the hub-id check: ValueError
            raise SkingenError(
                f"--clip_model {source}: could not load a CLIP model and processor ({str(err).splitlines()[0]}); "
                "pass a local folder holding a transformers CLIPModel with its processor files "
                "(e.g. a downloaded openai/clip-vit-large-patch14); without internet hub ids cannot be fetched"
            ) from None
        self.device = device

    def __call__(self, images: Sequence, prompts: Sequence[str], batch_size: int = 16) -> list[float]:
        import torch

        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
        scores: list[float] = []
        for start in range(0, len(images), batch_size):
            batch_images = [Image.fromarray(_as_rgb_array(im)) for im in images[start : start + batch_size]]
            inputs = self.processor(
                text=list(prompts[start : start + batch_size]),
                images=batch_images,
                return_tensors="pt",
                padding=True,
                truncation=True,
            ).to(self.device)
            with torch.no_grad():
                outputs = self.model(**inputs)
            # image_embeds and text_embeds come out L2-normalised: their dot product is the cosine.
            cosine = (outputs.image_embeds * outputs.text_embeds).sum(dim=-1)
            scores.extend((100.0 * cosine.clamp(min=0)).tolist())
        return scores


def clip_score(
    images: Sequence, prompts: Sequence[str], model_path: str | os.PathLike, device: str = "cpu"
) -> list[float]:
    """Per-pair CLIP score ``100 * max(cos, 0)``; loads the model each call (use ``ClipScorer`` to reuse it)."""
    return ClipScorer(model_path, device=device)(images, prompts)


# ---------------------------------------------------------------------------------------------------------------
# Diversity: how different the images of one control are across seeds

DIVERSITY_THUMBNAIL = 64  # px: SSIM compares layout and texture at this size, not pixel noise


def grey_thumbnail(image, size: int = DIVERSITY_THUMBNAIL) -> np.ndarray:
    """``image`` as a ``size`` x ``size`` grey float64 array in [0, 255] (area-averaged)."""
    grey = cv2.cvtColor(np.ascontiguousarray(_as_rgb_array(image)).astype(np.uint8), cv2.COLOR_RGB2GRAY)
    return cv2.resize(grey, (size, size), interpolation=cv2.INTER_AREA).astype(np.float64)


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 255.0, sigma: float = 1.5) -> float:
    """Mean structural similarity of two grey images of one shape (Wang et al. 2004).

    Gaussian-weighted local statistics (sigma 1.5, 11 x 11 window, population covariances), K1 = 0.01,
    K2 = 0.03, and the mean taken away from the borders the window does not cover: the conventions of
    scikit-image's ``structural_similarity(gaussian_weights=True, use_sample_covariance=False)``.
    """
    if a.shape != b.shape:
        raise ValueError(f"SSIM needs images of one shape, got {a.shape} and {b.shape}")
    a, b = a.astype(np.float64), b.astype(np.float64)
    radius = int(3.5 * sigma + 0.5)  # scikit-image truncates the Gaussian at 3.5 sigma

    def blur(x: np.ndarray) -> np.ndarray:
        return cv2.GaussianBlur(x, (2 * radius + 1, 2 * radius + 1), sigma, borderType=cv2.BORDER_REFLECT)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    inner = ssim_map[radius:-radius, radius:-radius] if min(a.shape) > 2 * radius else ssim_map
    return float(inner.mean())


class SSIMDistance:
    """``1 - SSIM`` of grey thumbnails: 0 for identical images, larger the more layout and texture differ."""

    def __init__(self, size: int = DIVERSITY_THUMBNAIL):
        if size < 16:
            raise SkingenError(f"--diversity_size must be >= 16 px (SSIM uses an 11 px window), got {size}")
        self.size = size
        self.name = f"1 - SSIM ({size} px grey)"

    def features(self, images: Sequence) -> list[np.ndarray]:
        return [grey_thumbnail(image, self.size) for image in images]

    def distance(self, a: np.ndarray, b: np.ndarray) -> float:
        return 1.0 - ssim(a, b)


class PerceptualDistance:
    """``1 - cos`` of image embeddings from a local transformers vision model (CLIP, DINO/DINOv2, ViT).

    CLIP-like models give ``get_image_features``; others their pooled output, else the first token.
    """

    def __init__(self, model_name_or_path: str | os.PathLike, device: str = "cpu"):
        from transformers import AutoImageProcessor, AutoModel

        source = str(model_name_or_path)
        try:
            self.processor = AutoImageProcessor.from_pretrained(source)
            self.model = AutoModel.from_pretrained(source).to(device).eval()
        except (OSError, ValueError) as err:
            raise SkingenError(
                f"--diversity_model {source}: could not load a vision model and its image processor "
                f"({str(err).splitlines()[0] if str(err) else type(err).__name__}); pass a local folder holding a "
                "transformers CLIP, DINO or ViT model with preprocessor_config.json (e.g. a downloaded "
                "facebook/dinov2-small); without internet hub ids cannot be fetched"
            ) from None
        self.device = device
        self.name = f"1 - cos ({Path(source).name} embeddings)"

    def features(self, images: Sequence) -> list[np.ndarray]:
        import torch

        inputs = self.processor(images=[Image.fromarray(_as_rgb_array(im)) for im in images], return_tensors="pt")
        inputs = {key: value.to(self.device) for key, value in inputs.items()}
        with torch.no_grad():
            if hasattr(self.model, "get_image_features"):
                embeds = self.model.get_image_features(**inputs)
                embeds = getattr(embeds, "pooler_output", embeds)  # newer transformers return an output object
            else:
                outputs = self.model(**inputs)
                pooled = getattr(outputs, "pooler_output", None)
                embeds = pooled if pooled is not None else outputs.last_hidden_state[:, 0]
        embeds = torch.nn.functional.normalize(embeds.float(), dim=-1)
        return list(embeds.cpu().numpy())

    def distance(self, a: np.ndarray, b: np.ndarray) -> float:
        return float(1.0 - np.dot(a, b))


def mean_pairwise_distance(features: Sequence, distance) -> float | None:
    """Mean of ``distance`` over all unordered pairs; None with fewer than two items."""
    pairs = [(i, j) for i in range(len(features)) for j in range(i + 1, len(features))]
    if not pairs:
        return None
    return float(np.mean([distance(features[i], features[j]) for i, j in pairs]))


def diversity_groups(records: Sequence[dict]) -> dict[tuple[str, str], list[dict]]:
    """Records grouped by what they were generated from (control image and prompt); seeds differ within a group."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for record in records:
        groups.setdefault((str(record.get("control") or ""), str(record.get("prompt") or "")), []).append(record)
    return groups


def diversity(records: Sequence[dict], measure, open_image=open_rgb) -> dict:
    """Per control with two or more images, the mean pairwise distance of its images; overall the mean over
    those controls. ``measure`` is an ``SSIMDistance`` or ``PerceptualDistance``."""
    per_control = []
    for (control, prompt), members in diversity_groups(records).items():
        if len(members) < 2:
            continue
        features = measure.features([open_image(record["output"]) for record in members])
        per_control.append(
            {
                "control": control,
                "prompt": prompt,
                "images": len(members),
                "outputs": [record["id"] for record in members],
                "diversity": mean_pairwise_distance(features, measure.distance),
            }
        )
    overall = _mean(group["diversity"] for group in per_control)
    return {"measure": measure.name, "controls": len(per_control), "overall": overall, "per_control": per_control}


# ---------------------------------------------------------------------------------------------------------------
# Evaluating generated images against their controls and texts; reports and comparisons

METRIC_LABELS = {
    "edge_f1": "edge F1",
    "edge_precision": "edge precision",
    "edge_recall": "edge recall",
    "sentence_accuracy": "sentence accuracy",
    "ned": "NED",
    "clip_score": "CLIP score",
    "diversity": "diversity",
}


@dataclass
class EvalPair:
    """One generated image and what it should match. ``box_size`` is the (w, h) of the image the boxes
    were measured on (None: the generated image itself); ``where`` names the input line for errors."""

    id: str
    output: str
    control: str | None = None
    prompt: str = ""
    boxes: list = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    box_size: tuple[int, int] | None = None
    where: str = ""


def evaluate_pair(
    pair: EvalPair, generated: Image.Image, *, ocr=None, tolerance: int = 2, low: int = 50, high: int = 80
) -> dict:
    """Edge and text metrics of one generated image; metrics that do not apply are None."""
    record: dict = {"id": pair.id, "output": pair.output, "control": pair.control, "prompt": pair.prompt}
    record.update(edge_precision=None, edge_recall=None, edge_f1=None)
    if pair.control is not None:
        scores = edge_scores(generated, open_rgb(pair.control, pair.where), tolerance, low, high)
        record.update(edge_precision=scores.precision, edge_recall=scores.recall, edge_f1=scores.f1)
    record.update(sentence_accuracy=None, ned=None, lines=[])
    if pair.boxes and ocr is not None:
        src_w, src_h = pair.box_size or generated.size
        result = text_metrics(
            generated, pair.boxes, pair.texts, ocr, box_scale=(generated.width / src_w, generated.height / src_h)
        )
        record.update(
            sentence_accuracy=result.sentence_accuracy,
            ned=result.ned,
            lines=[asdict(line) for line in result.lines],
        )
    record["clip_score"] = None
    return record


def evaluate_pairs(
    pairs: Sequence[EvalPair],
    *,
    ocr=None,
    clip_scorer: ClipScorer | None = None,
    tolerance: int = 2,
    low: int = 50,
    high: int = 80,
    batch_size: int = 16,
) -> list[dict]:
    """Per-image records for ``pairs`` (edge scores when a control is given, text metrics when boxes are
    given and ``ocr`` is set, CLIP score when ``clip_scorer`` is set)."""
    records: list[dict] = []
    with tqdm(total=len(pairs), desc="evaluating", unit="img") as bar:
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            images = [open_rgb(pair.output, pair.where) for pair in chunk]
            chunk_records = [
                evaluate_pair(pair, image, ocr=ocr, tolerance=tolerance, low=low, high=high)
                for pair, image in zip(chunk, images)
            ]
            if clip_scorer is not None:
                for record, score in zip(chunk_records, clip_scorer(images, [pair.prompt for pair in chunk])):
                    record["clip_score"] = score
            records.extend(chunk_records)
            bar.update(len(chunk))
    return records


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def summarize(records: Sequence[dict], diversity_overall: float | None = None) -> dict:
    """Means over images for edge and CLIP scores; text metrics pooled over all lines, as AnyText reports them;
    ``diversity`` is the overall value of ``diversity()`` when it was measured."""
    lines = [line for record in records for line in record.get("lines", [])]
    return {
        "images": len(records),
        "text_lines": len(lines),
        "edge_f1": _mean(r.get("edge_f1") for r in records),
        "edge_precision": _mean(r.get("edge_precision") for r in records),
        "edge_recall": _mean(r.get("edge_recall") for r in records),
        "sentence_accuracy": _mean(float(line["correct"]) for line in lines),
        "ned": _mean(line["ned"] for line in lines),
        "clip_score": _mean(r.get("clip_score") for r in records),
        "diversity": diversity_overall,
    }


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def metrics_markdown(report: dict) -> str:
    """``metrics.md``: the summary, then one row per image."""
    summary = report["summary"]
    out = [
        "# Evaluation",
        "",
        f"Source: `{report.get('source', '')}`; edge tolerance {report.get('tolerance')} px.",
        "",
    ]
    out += [
        "| metric | value |",
        "|---|---|",
        f"| images | {summary['images']} |",
        f"| text lines | {summary['text_lines']} |",
    ]
    out += [f"| {label} | {_fmt(summary.get(key))} |" for key, label in METRIC_LABELS.items()]
    out += diversity_markdown(report.get("diversity"))
    out += [
        "",
        "## Per image",
        "",
        "| id | edge F1 | sentence acc. | NED | CLIP | read / expected |",
        "|---|---|---|---|---|---|",
    ]
    for record in report["images"]:
        reads = "; ".join(f"{line['predicted']} / {line['target']}" for line in record.get("lines", []))
        out.append(
            f"| {_cell(record['id'])} | {_fmt(record['edge_f1'])} | {_fmt(record['sentence_accuracy'])} | "
            f"{_fmt(record['ned'])} | {_fmt(record['clip_score'], 2)} | {_cell(reads) or '-'} |"
        )
    return "\n".join(out) + "\n"


def diversity_markdown(result: dict | None) -> list[str]:
    """The per-control diversity table of ``metrics.md`` (nothing when diversity was not measured)."""
    if not result:
        return []
    out = ["", f"## Diversity per control ({result['measure']}; mean over pairs of seeds)", ""]
    if not result["per_control"]:
        return out + ["No control has two or more images: generate with --num_images_per_prompt 2 or more."]
    out += ["| control | prompt | images | diversity |", "|---|---|---|---|"]
    for group in result["per_control"]:
        out.append(
            f"| {_cell(Path(group['control']).name or '-')} | {_cell(group['prompt'][:60])} | {group['images']} | "
            f"{_fmt(group['diversity'])} |"
        )
    return out + [f"| **overall** ({result['controls']} controls) | | | {_fmt(result['overall'])} |"]


def compare_reports(
    report_a: dict, report_b: dict, label_a: str, label_b: str, sources: tuple[str, str] | None = None
) -> dict:
    """Side by side: summary metrics of A and B with B - A, and per-image edge F1 / NED for ids in both."""
    summary = []
    for key, label in {"images": "images", "text_lines": "text lines", **METRIC_LABELS}.items():
        a, b = report_a["summary"].get(key), report_b["summary"].get(key)
        delta = b - a if isinstance(a, (int, float)) and isinstance(b, (int, float)) else None
        summary.append({"metric": label, "key": key, "a": a, "b": b, "delta": delta})
    by_id_b = {record["id"]: record for record in report_b["images"]}
    images = []
    for record_a in report_a["images"]:
        record_b = by_id_b.get(record_a["id"])
        if record_b is None:
            continue
        images.append(
            {
                "id": record_a["id"],
                "edge_f1_a": record_a.get("edge_f1"),
                "edge_f1_b": record_b.get("edge_f1"),
                "ned_a": record_a.get("ned"),
                "ned_b": record_b.get("ned"),
            }
        )
    return {
        "labels": [label_a, label_b],
        "sources": list(sources or (label_a, label_b)),
        "summary": summary,
        "images": images,
        "diversity_per_control": _compare_diversity(report_a.get("diversity"), report_b.get("diversity")),
    }


def _compare_diversity(result_a: dict | None, result_b: dict | None) -> list[dict]:
    """Per-control diversity of A and B for the controls (file name and prompt) both measured."""
    if not result_a or not result_b:
        return []

    def by_control(result: dict) -> dict:
        return {(Path(g["control"]).name, g["prompt"]): g["diversity"] for g in result["per_control"]}

    values_b = by_control(result_b)
    return [
        {"control": control, "prompt": prompt, "diversity_a": value, "diversity_b": values_b[(control, prompt)]}
        for (control, prompt), value in by_control(result_a).items()
        if (control, prompt) in values_b
    ]


def comparison_markdown(comparison: dict) -> str:
    label_a, label_b = comparison["labels"]
    source_a, source_b = comparison.get("sources", comparison["labels"])
    out = ["# Comparison", "", f"A = `{label_a}` ({source_a}), B = `{label_b}` ({source_b}).", ""]
    out += [f"| metric | {_cell(label_a)} | {_cell(label_b)} | B - A |", "|---|---|---|---|"]
    for row in comparison["summary"]:
        out.append(f"| {row['metric']} | {_fmt(row['a'])} | {_fmt(row['b'])} | {_fmt(row['delta'])} |")
    if comparison["images"]:
        out += [
            "",
            "## Per image (ids in both)",
            "",
            "| id | edge F1 A | edge F1 B | NED A | NED B |",
            "|---|---|---|---|---|",
        ]
        for row in comparison["images"]:
            out.append(
                f"| {_cell(row['id'])} | {_fmt(row['edge_f1_a'])} | {_fmt(row['edge_f1_b'])} | {_fmt(row['ned_a'])} | {_fmt(row['ned_b'])} |"
            )
    if comparison.get("diversity_per_control"):
        out += ["", "## Diversity per control (in both)", "", "| control | prompt | A | B |", "|---|---|---|---|"]
        for row in comparison["diversity_per_control"]:
            out.append(
                f"| {_cell(row['control'])} | {_cell(row['prompt'][:60])} | {_fmt(row['diversity_a'])} | "
                f"{_fmt(row['diversity_b'])} |"
            )
    return "\n".join(out) + "\n"
