"""InstantID's keypoint image: the 5 face keypoints as coloured dots joined by limbs
(eyes and mouth corners to the nose), on black, at the output size."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255)]
LIMBS = [(0, 2), (1, 2), (3, 2), (4, 2)]


def draw_kps(size: tuple[int, int], kps: np.ndarray, source_size: tuple[int, int] | None = None) -> Image.Image:
    """Keypoints (in `source_size` pixel coordinates) drawn on a black `size` image."""
    width, height = size
    points = np.asarray(kps, dtype=np.float64).copy()
    if source_size is not None:
        points[:, 0] *= width / source_size[0]
        points[:, 1] *= height / source_size[1]
    canvas = Image.new("RGB", size)
    draw = ImageDraw.Draw(canvas)
    stick = max(2, round(min(width, height) / 128))
    for a, b in LIMBS:
        (x0, y0), (x1, y1) = points[a], points[b]
        length = math.hypot(x1 - x0, y1 - y0)
        if length:
            color = tuple(int(c * 0.6) for c in COLORS[a])
            draw.line([(x0, y0), (x1, y1)], fill=color, width=stick * 2)
    for (x, y), color in zip(points, COLORS):
        r = stick * 2
        draw.ellipse([x - r, y - r, x + r, y + r], fill=color)
    return canvas
