"""Drawing detections on images (for the report and tools/demo.py)."""
from __future__ import annotations

from typing import Any, Sequence

import cv2
import numpy as np

from .calibration import DEFAULT_PROBABILITY_THRESHOLD

__all__ = ["draw_detections", "shown_detections"]


def _colour(label: int) -> tuple[int, int, int]:
    # A fixed, well-spread colour per class (golden-angle hues), independent of any RNG.
    hue = int((label * 137.508) % 180)
    hsv = np.uint8([[[hue, 200, 255]]])
    r, g, b = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0]
    return int(r), int(g), int(b)


def draw_detections(image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, scores: np.ndarray,
                    classes: Sequence[str], score_threshold: float = 0.0) -> np.ndarray:
    """A copy of an RGB uint8 image [H, W, 3] with the detections scoring above the threshold
    drawn as labelled rectangles (internal boxes)."""
    out = np.ascontiguousarray(image.copy())
    thickness = max(1, round(max(out.shape[:2]) / 400))
    for box, label, score in zip(np.asarray(boxes), np.asarray(labels), np.asarray(scores)):
        if score < score_threshold:
            continue
        x1, y1, x2, y2 = (int(round(v)) for v in box)
        colour = _colour(int(label))
        cv2.rectangle(out, (x1, y1), (max(x1, x2 - 1), max(y1, y2 - 1)), colour, thickness)
        text = f"{classes[int(label)]} {score:.2f}"
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.4 * thickness, thickness)
        ty = max(th + base, y1)
        cv2.rectangle(out, (x1, ty - th - base), (x1 + tw, ty), colour, -1)
        cv2.putText(out, text, (x1, ty - base), cv2.FONT_HERSHEY_SIMPLEX, 0.4 * thickness, (0, 0, 0), thickness,
                    cv2.LINE_AA)
    return out


def shown_detections(dets: Any, probability: float = DEFAULT_PROBABILITY_THRESHOLD,
                     score: float | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """Which detections to show a user, and the number to print by each.

    Calibrated probabilities at or above ``probability`` (the objects the detector believes more
    likely than not); raw SVM scores at or above ``score`` when it is given or when the model
    has no calibration (then 0 by default).

    Returns:
        (bool mask [M], values [M] to print, a caption such as "probability >= 0.5").
    """
    if score is None and dets.probabilities is not None:
        return dets.probabilities >= probability, dets.probabilities, f"probability >= {probability:g}"
    t = 0.0 if score is None else score
    return dets.scores >= t, dets.scores, f"SVM score >= {t:g}"
