"""OCR: detect and recognise text lines -> 4-point quads, strings and scores.

Two backends behind one interface (``read``, ``read_batch``, ``recognize``):
RapidOCR (default; the PP-OCRv4 ONNX models ship inside the ``rapidocr-onnxruntime``
wheel, so it works offline) and PaddleOCR (2.x or 3.x, from local model folders).
Images go in as RGB ``uint8`` arrays; both engines want BGR, converted here.
"""

from __future__ import annotations

import importlib.metadata
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ..errors import SkingenError

BACKENDS = ("rapidocr", "paddle")


@dataclass
class TextLine:
    """One text line: ``quad`` is 4 ``[x, y]`` points clockwise from top-left, in image pixels."""

    quad: list[list[float]]
    text: str
    score: float


def as_quad(points) -> np.ndarray:
    """``points`` as a float32 ``(4, 2)`` array; anything else is a user error."""
    quad = np.asarray(points, dtype=np.float32)
    if quad.shape != (4, 2):
        raise SkingenError(f"a text box must be 4 [x, y] points, got shape {quad.shape}: {points!r}")
    return quad


def quad_size(points) -> tuple[float, float]:
    """(width, height) of a quad: width along the top/bottom edges, height along the left/right ones."""
    q = as_quad(points)
    width = max(np.linalg.norm(q[1] - q[0]), np.linalg.norm(q[2] - q[3]))
    height = max(np.linalg.norm(q[3] - q[0]), np.linalg.norm(q[2] - q[1]))
    return float(width), float(height)


def crop_quad(image: np.ndarray, quad) -> np.ndarray:
    """Cut a 4-point box out of ``image`` as an upright rectangle (perspective warp).

    The output's width runs along the quad's top edge, so a rotated line comes out
    horizontal, reading left to right, whatever its angle.
    """
    src = as_quad(quad)
    width, height = quad_size(src)
    width, height = max(1, round(width)), max(1, round(height))
    dst = np.array([[0, 0], [width, 0], [width, height], [0, height]], dtype=np.float32)
    matrix = cv2.getPerspectiveTransform(src, dst)
    return cv2.warpPerspective(
        np.ascontiguousarray(image), matrix, (width, height), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REPLICATE
    )


def to_bgr(image_rgb: np.ndarray) -> np.ndarray:
    """An RGB, RGBA or grey ``uint8`` array as 3-channel BGR, the order OpenCV-based engines expect."""
    image = np.asarray(image_rgb)
    if image.dtype != np.uint8:
        raise SkingenError(f"expected a uint8 image, got {image.dtype} (convert to 0-255 uint8 first)")
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise SkingenError(f"expected an RGB image of shape (H, W, 3), got {image.shape}")
    return cv2.cvtColor(image, cv2.COLOR_RGBA2BGR if image.shape[2] == 4 else cv2.COLOR_RGB2BGR)


def _text_line(points, text, score) -> TextLine:
    """An engine's result in plain Python values (engines give numpy arrays and numbers; rows are JSON)."""
    return TextLine([[float(x), float(y)] for x, y in as_quad(points)], str(text), float(score))


def _recognized(text, score) -> tuple[str, float]:
    return str(text), float(score)


def _existing_path(value, flag: str) -> str | None:
    if value is None:
        return None
    path = Path(value)
    if not path.exists():
        raise SkingenError(f"{flag} {path}: not found; pass an existing local model path")
    return str(path)


class OCRBackend(ABC):
    """The interface every backend implements; ``read_batch`` loops ``read`` unless a backend batches."""

    @abstractmethod
    def read(self, image_rgb: np.ndarray) -> list[TextLine]:
        """Detect and recognise every text line of one RGB image."""

    @abstractmethod
    def recognize(self, crops: Sequence[np.ndarray]) -> list[tuple[str, float]]:
        """Recognise text lines already cut out (RGB crops, e.g. from ``crop_quad``): ``(text, score)`` each."""

    def read_batch(self, images: Sequence[np.ndarray]) -> list[list[TextLine]]:
        return [self.read(image) for image in images]


class RapidOCRBackend(OCRBackend):
    """RapidOCR (PP-OCRv4 det + rec as ONNX); by default the models inside its wheel."""

    def __init__(
        self,
        det_model_path: str | None = None,
        rec_model_path: str | None = None,
        cls_model_path: str | None = None,
        use_angle_cls: bool = True,
        det_thresh: float = 0.3,
        det_box_thresh: float = 0.5,
        text_score: float = 0.5,
        num_threads: int = -1,
    ):
        try:
            from rapidocr_onnxruntime import RapidOCR
        except ImportError:
            raise SkingenError(
                "the rapidocr backend needs rapidocr-onnxruntime: pip install rapidocr-onnxruntime"
            ) from None
        options = {
            "det_thresh": det_thresh,
            "det_box_thresh": det_box_thresh,
            "text_score": text_score,
            "use_cls": use_angle_cls,
            "intra_op_num_threads": num_threads,
        }
        # RapidOCR fills in its bundled model for any path left out.
        for key, value, flag in (
            ("det_model_path", det_model_path, "--det_model_path"),
            ("rec_model_path", rec_model_path, "--rec_model_path"),
            ("cls_model_path", cls_model_path, "--cls_model_path"),
        ):
            if value is not None:
                options[key] = _existing_path(value, flag)
        self.engine = RapidOCR(**options)

    def read(self, image_rgb: np.ndarray) -> list[TextLine]:
        result, _elapsed = self.engine(to_bgr(image_rgb))
        return [_text_line(quad, text, score) for quad, text, score in result or []]

    def recognize(self, crops: Sequence[np.ndarray]) -> list[tuple[str, float]]:
        if not crops:
            return []
        results, _elapsed = self.engine.text_rec([to_bgr(crop) for crop in crops])
        return [_recognized(*res[:2]) for res in results]


def lines_from_paddle_result(page) -> list[TextLine]:
    """One image's PaddleOCR result -> TextLines.

    PaddleOCR 3.x gives a dict-like ``OCRResult`` with ``rec_polys``, ``rec_texts``,
    ``rec_scores``; 2.x gives ``[[quad, (text, score)], ...]`` (or ``None`` when no text).
    """
    if page is None:
        return []
    if hasattr(page, "keys") and "rec_texts" in page:
        return [_text_line(*result) for result in zip(page["rec_polys"], page["rec_texts"], page["rec_scores"])]
    return [_text_line(quad, text, score) for quad, (text, score) in page]


def texts_from_paddle_recognition(results) -> list[tuple[str, float]]:
    """Recognition-only results -> ``(text, score)``: 3.x ``{"rec_text", "rec_score"}`` items or 2.x pairs."""
    pairs = []
    for res in results:
        paddle3 = hasattr(res, "keys") and "rec_text" in res
        pairs.append(_recognized(res["rec_text"], res["rec_score"]) if paddle3 else _recognized(*res))
    return pairs


class PaddleOCRBackend(OCRBackend):
    """PaddleOCR from local inference-model folders (there is no model hub offline)."""

    def __init__(
        self,
        det_model_dir: str | None = None,
        rec_model_dir: str | None = None,
        use_angle_cls: bool = False,
        lang: str = "ch",
        device: str | None = None,
    ):
        try:
            import paddleocr
        except ImportError:
            raise SkingenError(
                "--ocr_backend paddle needs PaddleOCR: pip install paddleocr paddlepaddle "
                "(paddlepaddle-gpu on CUDA machines); offline it cannot download its models, so also pass "
                "--det_model_dir and --rec_model_dir with local inference-model folders "
                "(or use the default --ocr_backend rapidocr, which works offline)"
            ) from None
        self.det_model_dir = _existing_path(det_model_dir, "--det_model_dir")
        self.rec_model_dir = _existing_path(rec_model_dir, "--rec_model_dir")
        self.use_angle_cls = use_angle_cls
        self.device = device
        self.major_version = int(importlib.metadata.version("paddleocr").split(".")[0])
        self._recognizer = None
        if self.major_version >= 3:
            # Page-level preprocessing would move boxes off the original image's pixels: keep it off.
            self.engine = paddleocr.PaddleOCR(
                text_detection_model_dir=self.det_model_dir,
                text_recognition_model_dir=self.rec_model_dir,
                use_textline_orientation=use_angle_cls,
                use_doc_orientation_classify=False,
                use_doc_unwarping=False,
                lang=None if (self.det_model_dir or self.rec_model_dir) else lang,
                device=device,
            )
        else:
            self.engine = paddleocr.PaddleOCR(
                det_model_dir=self.det_model_dir,
                rec_model_dir=self.rec_model_dir,
                use_angle_cls=use_angle_cls,
                lang=lang,
                show_log=False,
            )

    def read(self, image_rgb: np.ndarray) -> list[TextLine]:
        return self.read_batch([image_rgb])[0]

    def read_batch(self, images: Sequence[np.ndarray]) -> list[list[TextLine]]:
        bgr = [to_bgr(image) for image in images]
        if self.major_version >= 3:
            return [lines_from_paddle_result(page) for page in self.engine.predict(bgr)]
        return [lines_from_paddle_result(self.engine.ocr(image, cls=self.use_angle_cls)[0]) for image in bgr]

    def recognize(self, crops: Sequence[np.ndarray]) -> list[tuple[str, float]]:
        if not crops:
            return []
        bgr = [to_bgr(crop) for crop in crops]
        if self.major_version >= 3:
            if self._recognizer is None:
                from paddleocr import TextRecognition

                self._recognizer = TextRecognition(model_dir=self.rec_model_dir, device=self.device)
            return texts_from_paddle_recognition(self._recognizer.predict(bgr))
        return texts_from_paddle_recognition([self.engine.ocr(crop, det=False, cls=False)[0][0] for crop in bgr])


def get_ocr(backend: str = "rapidocr", **options) -> OCRBackend:
    """An OCR engine by name: ``rapidocr`` (default, offline) or ``paddle``; options go to its constructor."""
    if backend == "rapidocr":
        return RapidOCRBackend(**options)
    if backend == "paddle":
        return PaddleOCRBackend(**options)
    raise SkingenError(f"unknown OCR backend {backend!r}; choose one of {', '.join(BACKENDS)}")
