"""Training augmentation with OpenCV, applied identically to image, mask and boundary map (and, when given, a
continuous map such as cached teacher logits: same geometry, no colour jitter).

Unlike the seed code (one rotation angle drawn for the whole run), every sample draws its own
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

    def __call__(self, img: np.ndarray, mask: np.ndarray, bnd: np.ndarray, index: int = 0,
                 extra: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
        """img (S, S, 3) uint8, mask/bnd (S, S) uint8 -> the same, transformed.

        ``extra``, an optional continuous (S, S) float32 map (e.g. teacher logits), follows the same flips and warp
        with linear interpolation but no colour jitter, and is returned as a 4th item. It draws nothing from the
        generator, so img, mask and bnd are the same with or without it.
        """
        r = self.rng(index)
        maps = [img, mask, bnd] + ([extra] if extra is not None else [])
        if r.random() < self.hflip:
            maps = [a[:, ::-1] for a in maps]
        if r.random() < self.vflip:
            maps = [a[::-1] for a in maps]
        angle = r.uniform(-self.rotate, self.rotate)
        scale = r.uniform(*self.scale)
        h, w = mask.shape
        m = cv2.getRotationMatrix2D((w / 2 - 0.5, h / 2 - 0.5), angle, scale)
        # Same border mode for all maps so the labels stay aligned with the (reflected) image content; labels are
        # nearest-neighbour so they stay binary, the image and the continuous extra map linear.
        interp = (cv2.INTER_LINEAR, cv2.INTER_NEAREST, cv2.INTER_NEAREST, cv2.INTER_LINEAR)
        maps = [cv2.warpAffine(np.ascontiguousarray(a), m, dsize=(w, h), flags=f, borderMode=cv2.BORDER_REFLECT_101)
                for a, f in zip(maps, interp)]
        return (self._colour(maps[0], r), *maps[1:])

    def _colour(self, img: np.ndarray, r: np.random.Generator) -> np.ndarray:
        x = img.astype(np.float32)
        x *= 1.0 + r.uniform(-self.brightness, self.brightness)
        mean = x.mean()
        x = (x - mean) * (1.0 + r.uniform(-self.contrast, self.contrast)) + mean
        grey = x.mean(axis=2, keepdims=True)
        x = (x - grey) * (1.0 + r.uniform(-self.saturation, self.saturation)) + grey
        return np.clip(x, 0, 255).astype(np.uint8)
