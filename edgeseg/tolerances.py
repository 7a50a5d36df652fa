"""Every numeric tolerance edgeseg judges with, in one table: the parity gate's budgets, the device-side checks
(bundle self-test, TensorRT golden check), the exactness of the export preparation and the agreement expected
between runtimes. Code and tests read these names; nothing restates a number.

    >>> from edgeseg.tolerances import PARITY
    >>> PARITY["int8"].max_delta
    0.005
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

__all__ = ["Budget", "OutputCheck", "PARITY", "SELFTEST", "GOLDEN", "FLOAT64_RTOL", "FLOAT32_RTOL", "RUNTIME_F32",
           "DICE_TIE"]


@dataclass(frozen=True)
class Budget:
    """The parity gate's bounds of one precision, against PyTorch on the same real frames."""
    max_delta: float        # mDice loss (override with --max-delta)
    max_image_drop: float   # Dice loss of the worst single frame (override with --max-image-drop)


@dataclass(frozen=True)
class OutputCheck:
    """An artefact's output against a stored reference output on the same input."""
    max_abs_logit_diff: float | None  # None: not checked (int8 kernels may round differently on another CPU)
    min_mask_agreement: float         # fraction of pixels whose mask (logit > 0) agrees


# The parity gate. A boundary that moves by a pixel or two on a small polyp costs int8 up to ~0.1 Dice on that frame
# (measured on the shipped models); a frame whose polyp is lost or doubled costs far more.
PARITY = MappingProxyType({
    "fp32": Budget(max_delta=0.001, max_image_drop=0.02),
    "fp16": Budget(max_delta=0.003, max_image_drop=0.05),
    "int8": Budget(max_delta=0.005, max_image_drop=0.25),
})

# `edgeseg selftest` on the device: the bundle's runtime on its golden input against the logits recorded at
# bundling. A manifest can only tighten these.
SELFTEST = MappingProxyType({
    "fp32": OutputCheck(1e-3, 0.999),
    "fp16": OutputCheck(5e-2, 0.999),
    "int8": OutputCheck(None, 0.995),
})

# The TensorRT engine on the Jetson against golden_output.npy from ONNX Runtime on the export CPU. Chosen from
# CPU runtime comparisons on the authors' UltraSeg-130K (|logits| up to ~25): OpenVINO f16 differs from ONNX
# Runtime by up to ~0.2 with mask agreement > 0.9997 per frame. Not measured on a Jetson.
GOLDEN = MappingProxyType({
    "fp32": OutputCheck(0.05, 0.999),
    "fp16": OutputCheck(1.0, 0.995),
    "int8": OutputCheck(None, 0.98),
})

# The export preparation (BN folds, fused blocks, export-only rewrites) is exact algebra: in float64 its logits
# differ from the model's by rounding only, at most this times max(1, max |logit|).
FLOAT64_RTOL = 1e-9
# ... and in float32 by float32 rounding, at most this times max(1, max |logit|).
FLOAT32_RTOL = 3e-5
# Two float32 runtimes (or one runtime on two CPUs) running the same float32 model: at most this times
# max(1, max |logit|).
RUNTIME_F32 = 1e-5

# mDice differences below this are ties in a comparison of models (parity frames cannot resolve them).
DICE_TIE = 1e-3
