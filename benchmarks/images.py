"""Synthetic photo-like images shared by the benchmarks (nothing is downloaded)."""
from __future__ import annotations

import cv2
import numpy as np


def flower_like(rng: np.random.Generator, size: int = 512) -> np.ndarray:
    """Photo-like statistics (what sets JPEG size and decode cost): multi-scale colour fields + noise.

    At 512x512 and JPEG quality 95 these encode to about 120 KB, like the Flower competition's
    512x512 images.
    """
    img = np.zeros((size, size, 3), np.float32)
    for cells, amp in ((4, 90), (16, 40), (64, 25)):
        field = rng.normal(0, 1, (cells, cells, 3)).astype(np.float32)
        img += amp * cv2.resize(field, (size, size), interpolation=cv2.INTER_CUBIC)
    img += rng.normal(0, 6, (size, size, 3)).astype(np.float32)
    return np.clip(img + 128, 0, 255).astype(np.uint8)
