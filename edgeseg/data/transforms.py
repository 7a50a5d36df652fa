"""Training augmentation with OpenCV, applied identically to image, mask and boundary map.

Unlike the seed code (one rotation angle drawn for the whole run, SPEC B §1), every sample draws its own
flip, rotation, scale and colour jitter from a generator seeded by (seed, epoch, index), so runs are
reproducible and a resumed run sees the same samples it would have seen.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass
class Augment:
    hflip: float = 0.5  # probabilities
    vflip: float = 0.5
    rotate: float = 20.0  # max |angle| in degrees
    scale: tuple[float, float] = (0.85, 1.2)
    brightness: float = 0.2  # max relative change
    contrast: float = 0.2
    saturation: float = 0.2
    seed: int = 0
    epoch: int = 0

    def rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng((self.seed, self.epoch, index))

    def __call__(self, img: np.ndarray, mask: np.ndarray, bnd: np.ndarray, index: int = 0):
        """img (S, S, 3) uint8, mask/bnd (S, S) uint8 -> the same, transformed."""
        r = self.rng(index)
        if r.random() < self.hflip:
            img, mask, bnd = img[:, ::-1], mask[:, ::-1], bnd[:, ::-1]
        if r.random() < self.vflip:
            img, mask, bnd = img[::-1], mask[::-1], bnd[::-1]
        angle = r.uniform(-self.rotate, self.rotate)
        scale = r.uniform(*self.scale)
        h, w = mask.shape
        m = cv2.getRotationMatrix2D((w / 2 - 0.5, h / 2 - 0.5), angle, scale)
        # Same border mode for all three so the labels stay aligned with the (reflected) image content.
        warp = dict(dsize=(w, h), borderMode=cv2.BORDER_REFLECT_101)
        img = cv2.warpAffine(np.ascontiguousarray(img), m, flags=cv2.INTER_LINEAR, **warp)
        mask = cv2.warpAffine(np.ascontiguousarray(mask), m, flags=cv2.INTER_NEAREST, **warp)
        bnd = cv2.warpAffine(np.ascontiguousarray(bnd), m, flags=cv2.INTER_NEAREST, **warp)
        return self._colour(img, r), mask, bnd

    def _colour(self, img: np.ndarray, r: np.random.Generator) -> np.ndarray:
        x = img.astype(np.float32)
        x *= 1.0 + r.uniform(-self.brightness, self.brightness)
        mean = x.mean()
        x = (x - mean) * (1.0 + r.uniform(-self.contrast, self.contrast)) + mean
        grey = x.mean(axis=2, keepdims=True)
        x = (x - grey) * (1.0 + r.uniform(-self.saturation, self.saturation)) + grey
        return np.clip(x, 0, 255).astype(np.uint8)
