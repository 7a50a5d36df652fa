"""The input contract: the one preprocessing function shared by training, evaluation, calibration and every
runtime. numpy + OpenCV only (no torch), so that device-side code can import it.

Contract: RGB, bilinear resize to ``size`` x ``size``, float32 in [0, 1], then the model's
mean/std if it declares them (default none), NCHW. Mask = foreground logit > 0 (probability > 0.5).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class InputContract:
    size: int = 256  # square network input, a multiple of 32
    mean: tuple[float, float, float] | None = None  # applied after /255; None = no normalisation
    std: tuple[float, float, float] | None = None
    threshold: float = 0.5  # on the sigmoid probability (== logit > 0 at 0.5)
    colour: str = "RGB"
    layout: str = "NCHW"
    scale: float = 1.0 / 255.0
    resize: str = "bilinear"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "InputContract":
        d = dict(d)
        for key in ("mean", "std"):
            if d.get(key) is not None:
                d[key] = tuple(float(v) for v in d[key])
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    def preprocess(self, rgb: np.ndarray) -> np.ndarray:
        """One RGB uint8 frame (H, W, 3) -> network input (1, 3, size, size) float32."""
        return self.normalise(resize_image(rgb, self.size))[None]

    def normalise(self, rgb_resized: np.ndarray) -> np.ndarray:
        """RGB uint8 (S, S, 3) already at network size -> (3, S, S) float32."""
        x = rgb_resized.astype(np.float32) * np.float32(self.scale)
        if self.mean is not None:
            x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(x.transpose(2, 0, 1))


def resize_image(rgb: np.ndarray, size: int) -> np.ndarray:
    return cv2.resize(rgb, (size, size), interpolation=cv2.INTER_LINEAR)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Binary masks are resized with nearest neighbour so they stay binary."""
    return cv2.resize(mask, (size, size), interpolation=cv2.INTER_NEAREST)
