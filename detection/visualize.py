"""Drawing detections on images (for the report and tools/demo.py)."""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

__all__ = ["draw_detections"]


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
