"""TFLite / Raspberry Pi backend: torch -> .tflite (fp32, fp16, full int8) with litert-torch, and a runner.

Device-side contract of the artefact: one input ``(1, S, S, 3)`` NHWC (float32 for fp32/fp16, int8 for
int8), one output ``(1, S, S, 1)`` NHWC foreground logits (float32, or int8 for int8). :func:`load_runner`
hides all of that: it takes the edgeseg contract's ``(B, 3, S, S)`` float32 NCHW batch and returns
``(B, 1, S, S)`` float32 logits, so the parity gate scores it with the same ``evaluate_split`` as every
other backend.

Pipeline (:func:`torch_to_tflite`):

1. :func:`~edgeseg.export._tflite_rewrites.prepare_for_tflite` (torch only, see that module) builds an
   export-only inference copy of the model: the fused model every backend gets
   (:func:`edgeseg.export.prepare.prepare`) with TFLite's own rewrites on top, mathematically identical to
   the model (checked in float64 on every export), with no TRANSPOSE-forcing reshapes. TRANSPOSE ops in the
   fp32 graph: 72 -> 0 (UltraSeg-130K and -108K), 85 -> 0 (MicroAUNet).

2. ``torch.export`` of ``NHWCInput(copy)`` (NHWC -> NCHW permute at the input and back at the output, which
   the converter's layout pass cancels) is saved as a ``.pt2`` program and converted by
   ``_litert_worker.py``: litert-torch 0.10.0 for fp32; ai-edge-quantizer ``FLOAT_CASTING`` (fp16 weights,
   fp32 compute) for fp16; ai-edge-quantizer ``static_wi8_ai8`` for int8: per-channel symmetric int8
   weights, per-tensor int8 activations, int8 model input (scale exactly 1/255, zero point -128 under the
   default contract: int8 value = uint8 pixel - 128) and int8 output. Activation ranges are the 10th/90th
   percentiles of per-frame minima/maxima over the calibration frames (the quantizer's own moving average
   under-covers: 98.5 % vs 99.4 % mask agreement on UltraSeg-130K). The GroupNorm statistics
   (``INT16_SCOPES``) are integer too but 16x8: int16 activations with plain min/max ranges, int8 weights,
   and their rsqrt stays int8 (TFLite's int16 RSQRT is not bit-exact between x86 and aarch64); all-int8
   there cost 1.6 points of mDice on the shipped model. Only ops without an int8 kernel in a supported
   runtime would stay float (``INT8_FLOAT_OPS``; none remain after the rewrites); the report lists every
   float and int16 island by op and tensor name.

Measured on the authors' UltraSeg-130K (32 pranet-train frames; int8 calibrated on 48 others), before the
int16 GroupNorm statistics: fp32 100 % mask agreement, max |logit diff| 1.9e-4; fp16 99.994 %, 0.11; all
int8 99.41 %, 14 (mean 0.7), Kvasir test mDice 0.882 -> 0.856, CVC-ClinicDB test 0.856 -> 0.809;
``float_norms=True`` (norm internals float: not full-integer) 0.880 / 0.849.

Environment decision (measured 2026-11 against this project's main environment):
  ``pip install litert-torch==0.10.0 ai-edge-quantizer==0.10.0`` *does* co-install with torch 2.13.0 and
  leaves edgeseg working (typer 0.29.2, rich 15, onnx 1.23.2, openvino 2026.4.1, nncf 3.4.0 import and run,
  ``edgeseg --help`` works), but it downgrades typing_extensions 4.15 -> 4.12.2 (xdsl pins <4.13) and
  pydantic 2.13 -> 2.11.10, pulls jax/transformers (~1.2 GB), and breaks any other package in the same
  environment that needs a newer pydantic (here aws-sam-translator). So conversion runs in a **separate
  interpreter**: ``_litert_worker.py`` is a standalone script (torch + litert only, no edgeseg import),
  started as a subprocess with, in order of preference, ``$EDGESEG_LITERT_PYTHON``; the current
  interpreter if it can import litert_torch and ai_edge_quantizer (a single-environment install is
  therefore also supported); or the venv made by :func:`setup_litert_env` at
  ``$EDGESEG_CACHE/venv-litert-<key>`` (default ``~/.cache/edgeseg/``; one per Python environment, the key
  hashes ``sys.prefix``, since the venv shares that environment's torch and edgeseg). That venv holds only the
  litert stack (~0.94 GB: jaxlib, litert_converter, transformers...) and sees the parent environment's
  site-packages (torch is shared, never reinstalled: pip runs with a ``torch==<installed>`` constraint);
  creating it takes 1-3 min. The **runtime** is ``ai-edge-litert==2.3.0``, which
  installs cleanly into the main environment (it adds backports.strenum and tqdm only); on devices
  ``tflite-runtime`` is accepted as a fallback import (it needs numpy<2 and is slower).
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np

from edgeseg.errors import EdgesegError
from edgeseg.export import installed_version

log = logging.getLogger(__name__)

__all__ = [
    "LITERT_PINS", "RUNTIME_PIN", "INT8_FLOAT_OPS", "INT16_SCOPES", "torch_to_tflite",
    "inspect_tflite", "load_runner", "export", "setup_litert_env", "litert_python", "compare_to_torch",
]

# The conversion stack, exact pins (measured working with torch 2.13.0 CPU, Python 3.11).
LITERT_PINS = ("litert-torch==0.10.0", "ai-edge-quantizer==0.10.0", "ai-edge-litert==2.3.0", "torchao==0.18.0")
RUNTIME_PIN = "ai-edge-litert==2.3.0"
# Ops kept float in the int8 model because a supported runtime lacks an int8 kernel for them. After the
# export rewrites the graphs contain no DIV/SQRT; ai-edge-litert has int8 kernels for everything else used.
INT8_FLOAT_OPS: tuple[str, ...] = ("DIV", "SQRT")
PRECISIONS = ("fp32", "fp16", "int8")
# Tensor-name regex of the norm internals, kept float with ``float_norms=True``.
FLOAT_NORM_SCOPE = ".*(GroupNormExport|FusedChannelLayerNorm).*"
# Tensor-name regexes computed with int16 activations (16x8: int8 weights) in the int8 model: the
# GroupNorm statistics, whose int8 rounding is where full int8 lost its Dice (shipped UltraSeg-108K, 100
# parity frames: all int8 +0.0159; GroupNorm float +0.0034; GroupNorm int16 with these ranges +0.0005).
INT16_SCOPES: tuple[str, ...] = (".*GroupNormExport.*",)
# int8 activation ranges: this percentile of the per-calibration-frame maxima (and 100 - it of the minima).
RANGE_PERCENTILE = 90.0
WORKER = Path(__file__).with_name("_litert_worker.py")


# --------------------------------------------------------------------------------------------------------
# Conversion environment and worker
# --------------------------------------------------------------------------------------------------------


def _cache_dir() -> Path:
    return Path(os.environ.get("EDGESEG_CACHE", Path.home() / ".cache" / "edgeseg"))


def _venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


STAMP = ".edgeseg-litert-ok"  # written last by setup_litert_env: the venv is complete


def default_litert_venv() -> Path:
    """This installation's own conversion venv: one per Python environment (keyed by ``sys.prefix``), because
    the venv shares that environment's torch and edgeseg, so one venv must never serve another environment."""
    key = hashlib.sha256(os.path.realpath(sys.prefix).encode()).hexdigest()[:12]
    return _cache_dir() / f"venv-litert-{key}"


def litert_python() -> str:
    """The interpreter that runs the conversion worker (see the module docstring for the order)."""
    explicit = os.environ.get("EDGESEG_LITERT_PYTHON")
    if explicit:
        return explicit
    if importlib.util.find_spec("litert_torch") and importlib.util.find_spec("ai_edge_quantizer"):
        return sys.executable
    venv = default_litert_venv()
    if _venv_python(venv).is_file() and (venv / STAMP).is_file():
        return str(_venv_python(venv))
    raise ImportError(
        "TFLite conversion needs litert-torch; create its isolated environment once with "
        "`edgeseg setup tflite` "
        f"(a venv at {venv} with {' '.join(LITERT_PINS)}), or point "
        "EDGESEG_LITERT_PYTHON at an interpreter that has them")


def setup_litert_env(venv: str | os.PathLike | None = None, progress=None) -> Path:
    """Create (idempotently) the conversion venv (default: :func:`default_litert_venv`): the litert stack
    only, with the parent environment's site-packages appended to its path so that torch is shared and never
    reinstalled. ``progress(line)`` hears one line per step; pip's own output is kept out of sight and shown
    (its last lines) only when it fails. Returns the venv's python."""
    import site
    import sysconfig

    import torch

    say = progress or (lambda line: None)
    venv = Path(venv) if venv is not None else default_litert_venv()
    py = _venv_python(venv)
    stamp = venv / STAMP
    want = "\n".join(LITERT_PINS) + f"\ntorch=={torch.__version__}\nparent={os.path.realpath(sys.prefix)}\n"
    if py.is_file() and stamp.is_file() and stamp.read_text() == want:
        say(f"the litert conversion environment is ready: {venv}")
        return py
    say(f"creating the litert conversion environment {venv} (once; about 1 GB, a few minutes)")
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    site_dir = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   check=True, capture_output=True, text=True).stdout.strip())
    parents = [p for p in dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"],
                                         *site.getsitepackages()]) if Path(p).is_dir()]
    # Appended after the venv's own site-packages (so its typing_extensions/pydantic win), with the parent's
    # .pth files processed (editable installs keep working).
    (site_dir / "zz_edgeseg_parent_env.pth").write_text(
        "".join(f"import site; site.addsitedir({p!r})\n" for p in parents))
    constraints = venv / "constraints.txt"
    constraints.write_text(f"torch=={torch.__version__}\n")
    cmd = [str(py), "-m", "pip", "install", "--disable-pip-version-check", "-q", "-c", str(constraints),
           *LITERT_PINS]
    say(f"installing {' '.join(LITERT_PINS)} (sharing this environment's torch {torch.__version__})")
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise EdgesegError(f"pip could not install the litert stack into {venv} (exit {done.returncode}): "
                           f"{_last_line(done.stdout + done.stderr, 'pip')}")
    out = subprocess.run([str(py), "-c", "import torch, litert_torch, ai_edge_quantizer; print(torch.__version__)"],
                         check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    if out != torch.__version__:
        raise EdgesegError(f"the litert venv {venv} sees torch {out}, not this environment's {torch.__version__}: "
                           "remove it and run `edgeseg setup tflite` again")
    stamp.write_text(want)
    say(f"ready: {venv}")
    return py


def _input_range(contract) -> list[float]:
    """[lo, hi] of the network input under ``contract``: pixels in [0, 255] times ``scale``, then mean/std."""
    lo, hi = np.zeros(3), np.full(3, 255.0 * contract.scale)
    if contract.mean is not None:
        mean, std = np.asarray(contract.mean, float), np.asarray(contract.std, float)
        lo, hi = (lo - mean) / std, (hi - mean) / std
    return [float(np.minimum(lo, hi).min()), float(np.maximum(lo, hi).max())]


def _run_worker(job: dict, python: str | None) -> dict:
    python = python or litert_python()
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["PYTHONNOUSERSITE"] = "1"
    with tempfile.TemporaryDirectory(prefix="edgeseg-litert-") as tmp:
        job_path = Path(tmp) / "job.json"
        job_path.write_text(json.dumps(job))
        proc = subprocess.run([python, str(WORKER), str(job_path)], capture_output=True, text=True, env=env)
    result = None
    for line in proc.stdout.splitlines():
        if line.startswith("EDGESEG_RESULT "):
            result = json.loads(line[len("EDGESEG_RESULT "):])
    if proc.returncode != 0 or result is None:
        raise EdgesegError(f"TFLite conversion failed (litert worker exit {proc.returncode}): "
                           f"{_last_line(proc.stderr or proc.stdout, f'litert worker (python {python})')}")
    return result


def _last_line(output: str, what: str) -> str:
    """The last non-empty line of a failed subprocess's ``output`` (at most 300 characters) for a one-line error;
    its last 40 lines go to the debug log."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    log.debug("%s output:\n%s", what, "\n".join(lines[-40:]))
    last = lines[-1] if lines else "no output"
    return last if len(last) <= 300 else last[:297] + "..."


# --------------------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------------------


def torch_to_tflite(model, contract, out_path: str | os.PathLike, precision: str = "fp32",
                    calib: np.ndarray | None = None, *, check: np.ndarray | None = None,
                    python: str | None = None, float_norms: bool = False) -> dict:
    """Convert ``model`` to ``out_path`` (.tflite) at ``precision``; returns the report dict.

    ``calib``: (N, 3, S, S) float32 NCHW frames preprocessed with ``contract`` (required for int8; a few
    dozen real frames). ``check``: frames used to verify the export-only rewrite against the original model
    in torch (defaults to two ``calib`` frames, else random): in float64 it must agree to rounding
    (:data:`edgeseg.tolerances.FLOAT64_RTOL`), and the float32 max abs difference is reported.

    ``float_norms`` (int8 only, off by default, a diagnosis aid): keep the GroupNorm / channel-LayerNorm
    internals in float (float islands, listed in the report) instead of int16 / int8. Not a full-integer
    model any more.
    """
    import torch

    from edgeseg.export._tflite_rewrites import NHWCInput, group_scales, prepare_for_tflite

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "int8" and (calib is None or len(calib) == 0):
        raise ValueError("int8 TFLite export needs calibration frames (calib, (N, 3, S, S) float32)")
    size = contract.size
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = model.eval()
    probe = check if check is not None else (calib[:2] if calib is not None else None)
    if probe is not None:
        probe = np.ascontiguousarray(probe, dtype=np.float32)
    # int8-only group equalisation (same maths), from float64 statistics: reproducible on any thread count
    scales = group_scales(copy.deepcopy(model).double(), calib) if precision == "int8" else None
    # The rewrite must be the same maths: prepare compares in float64 (constants folded in float64 too),
    # where only rounding remains (FLOAT64_RTOL, else RuntimeError), and reports the float32 difference
    # that the converter starts from.
    prepared, prep = prepare_for_tflite(model, size, scales, probe)
    example = torch.zeros(1, size, size, 3)
    with torch.no_grad():
        program = torch.export.export(NHWCInput(prepared).eval(), (example,))
    t_prepare = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(prefix="edgeseg-tflite-") as tmp:
        tmp = Path(tmp)
        torch.export.save(program, tmp / "model.pt2")
        job = {"program": str(tmp / "model.pt2"), "out": str(out_path.resolve()), "precision": precision,
               "input_shape": [1, size, size, 3], "calib": None, "float_ops": list(INT8_FLOAT_OPS),
               "input_range": _input_range(contract), "range_percentile": RANGE_PERCENTILE,
               "float_scopes": [FLOAT_NORM_SCOPE] if (float_norms and precision == "int8") else [],
               "int16_scopes": list(INT16_SCOPES) if (precision == "int8" and not float_norms) else []}
        if calib is not None and precision == "int8":
            np.save(tmp / "calib.npy", np.ascontiguousarray(np.asarray(calib, np.float32).transpose(0, 2, 3, 1)))
            job["calib"] = str(tmp / "calib.npy")
        worker = _run_worker(job, python)
    report = {"precision": precision, "path": str(out_path), "size_bytes": out_path.stat().st_size,
              "rewrite_max_abs_diff_fp64": prep["max_abs_diff_fp64"], "rewrite_max_abs_diff_fp32": prep["max_abs_diff"],
              "prepare_s": round(t_prepare, 2), **worker,
              **inspect_tflite(out_path)}
    report["convert_s"] = round(time.perf_counter() - t0, 2)
    return report


# --------------------------------------------------------------------------------------------------------
# Inspection (flatbuffer, no interpreter)
# --------------------------------------------------------------------------------------------------------


def _schema():
    try:
        from ai_edge_litert import schema_py_generated as schema
    except ImportError as e:  # pragma: no cover - the [tflite] extra provides it
        raise ImportError("inspecting .tflite files needs ai-edge-litert: pip install edgeseg[tflite]") from e
    return schema


def inspect_tflite(path: str | os.PathLike) -> dict:
    """Static report of a .tflite: op counts, TRANSPOSE count, I/O dtypes and quantisation, conv weight
    dtypes, and the float and int16 islands (compute ops with float / int16 outputs) of a quantised model."""
    schema = _schema()
    buf = Path(path).read_bytes()
    model = schema.ModelT.InitFromPackedBuf(buf, 0)
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    dtypes = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}

    def opname(op):
        code = model.operatorCodes[op.opcodeIndex]
        return names.get(max(code.builtinCode, code.deprecatedBuiltinCode), f"CUSTOM:{code.customCode}")

    def tname(t):
        return t.name.decode() if isinstance(t.name, bytes) else str(t.name)

    def tinfo(t):
        q = t.quantization
        info = {"name": tname(t), "shape": [int(s) for s in t.shape], "dtype": dtypes[t.type].lower()}
        if q is not None and q.scale is not None and len(q.scale):
            info["scale"] = [float(s) for s in q.scale] if len(q.scale) > 1 else float(q.scale[0])
            info["zero_point"] = ([int(z) for z in q.zeroPoint] if len(q.zeroPoint) > 1
                                  else int(q.zeroPoint[0]))
        return info

    g = model.subgraphs[0]
    ops = [opname(op) for op in g.operators]
    counts = Counter(ops)
    quantised = any(dtypes[t.type] in ("INT8", "UINT8", "INT16") for t in g.tensors)
    weight_dtypes: Counter = Counter()
    float_islands = []
    int16_islands = []
    for op, name in zip(g.operators, ops):
        if name in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV"):
            weight_dtypes[f"{name}:{dtypes[g.tensors[op.inputs[1]].type].lower()}"] += 1
        if name in ("QUANTIZE", "DEQUANTIZE"):
            continue
        outs = [g.tensors[i] for i in op.outputs if i >= 0]
        if outs and all(dtypes[t.type] == "FLOAT32" for t in outs):
            float_islands.append({"op": name, "output": tname(outs[0])})
        if outs and all(dtypes[t.type] == "INT16" for t in outs):
            int16_islands.append({"op": name, "output": tname(outs[0])})
    return {
        "ops": dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))),
        "n_ops": len(ops),
        "transpose_count": counts.get("TRANSPOSE", 0),
        "inputs": [tinfo(g.tensors[i]) for i in g.inputs],
        "outputs": [tinfo(g.tensors[i]) for i in g.outputs],
        "weight_dtypes": dict(weight_dtypes),
        "quantized": bool(quantised),
        "float_islands": float_islands if quantised else [],
        "float_island_ops": dict(Counter(f["op"] for f in float_islands)) if quantised else {},
        "int16_islands": int16_islands,
        "int16_island_ops": dict(Counter(f["op"] for f in int16_islands)),
    }


# --------------------------------------------------------------------------------------------------------
# Runner
# --------------------------------------------------------------------------------------------------------


def _interpreter_class():
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter  # devices with the old runtime (numpy<2)
        except ImportError:
            raise ImportError("running .tflite files needs ai-edge-litert (pip install edgeseg[tflite]) or "
                              "tflite-runtime") from None
    return Interpreter


def load_runner(path: str | os.PathLike, target, device: str | None = None, threads: int | None = None, *,
                kernels: str = "xnnpack") -> Callable[[np.ndarray], np.ndarray]:
    """A numpy logits function for a .tflite made by :func:`torch_to_tflite`.

    (B, 3, S, S) float32 NCHW (the edgeseg contract) -> (B, 1, S, S) float32 logits. NHWC layout and, for an
    int8 model, quantisation of the input / dequantisation of the output with the stored parameters are
    done here. ``threads``: default the target's profile threads. ``device``: only the CPU.
    ``kernels``: "xnnpack" (the default delegate, what a Pi runs), "builtin" (TFLite's own optimised
    kernels) or "reference" (portable integer reference kernels: an int8 model gives the same bits on
    x86 and aarch64). The function also has ``to_model_input``, ``invoke_raw`` and ``from_model_output``
    for raw-tensor comparisons (the tests compare them with an emulated Raspberry Pi).
    """
    if device not in (None, "CPU", "cpu"):
        raise EdgesegError(f"the TFLite runner runs on the CPU, not {device}")
    if kernels not in ("xnnpack", "builtin", "reference"):
        raise ValueError(f"kernels must be xnnpack, builtin or reference, got {kernels!r}")
    threads = threads or target.profile.threads
    cls = _interpreter_class()
    if kernels == "xnnpack":
        interp = cls(model_path=str(path), num_threads=int(threads))
    else:
        resolvers = sys.modules[cls.__module__].OpResolverType
        resolver = {"builtin": resolvers.BUILTIN_WITHOUT_DEFAULT_DELEGATES, "reference": resolvers.BUILTIN_REF}[kernels]
        interp = cls(model_path=str(path), num_threads=int(threads), experimental_op_resolver_type=resolver)
    interp.allocate_tensors()
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    in_nhwc = int(inp["shape"][-1]) == 3
    in_q, out_q = inp["quantization"], out["quantization"]

    def quantise(x: np.ndarray) -> np.ndarray:
        if inp["dtype"] == np.float32:
            return x.astype(np.float32)
        scale, zp = in_q
        info = np.iinfo(inp["dtype"])
        return np.clip(np.round(x / scale) + zp, info.min, info.max).astype(inp["dtype"])

    def dequantise(y: np.ndarray) -> np.ndarray:
        if out["dtype"] == np.float32:
            return y.astype(np.float32)
        scale, zp = out_q
        return ((y.astype(np.float32) - zp) * np.float32(scale)).astype(np.float32)

    def to_model_input(x: np.ndarray) -> np.ndarray:
        """(B, 3, S, S) float32 NCHW -> (B, S, S, 3) raw model inputs (NHWC; int8 for an int8 model)."""
        x = np.asarray(x, np.float32)
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected a (B, 3, S, S) float32 batch, got shape {x.shape}")
        return np.ascontiguousarray(quantise(x.transpose(0, 2, 3, 1) if in_nhwc else x))

    def invoke_raw(raw: np.ndarray) -> np.ndarray:
        """Raw inputs (B, ...) -> raw outputs (B, ...), one frame per invoke."""
        ys = []
        for frame in raw:
            interp.set_tensor(inp["index"], np.ascontiguousarray(frame[None]))
            interp.invoke()
            ys.append(interp.get_tensor(out["index"]).copy())
        return np.concatenate(ys)

    def from_model_output(raw: np.ndarray) -> np.ndarray:
        """Raw outputs (B, S, S, 1) -> (B, 1, S, S) float32 logits (dequantised for an int8 model)."""
        y = dequantise(raw)
        return np.ascontiguousarray(y.transpose(0, 3, 1, 2)) if y.ndim == 4 and y.shape[-1] == 1 else y

    def run(x: np.ndarray) -> np.ndarray:
        return from_model_output(invoke_raw(to_model_input(x)))

    run.to_model_input, run.invoke_raw, run.from_model_output = to_model_input, invoke_raw, from_model_output
    run.input_details, run.output_details = inp, out
    module = cls.__module__.split(".")[0]  # ai_edge_litert, or tflite_runtime on a device that has only that
    # A float16-weight model (fp16) is computed in f32 (its DEQUANTIZE ops expand the weights), on a Pi too:
    # XNNPACK on an emulated Cortex-A76, which has FP16 arithmetic, matches x86 at the fp32 level. Recorded so
    # that parity.json says which arithmetic it checked.
    fp16_weights = any(np.dtype(t["dtype"]) == np.float16 for t in interp.get_tensor_details())
    compute = ("int8" if inp["dtype"] != np.float32 else
               "f32 arithmetic on float16 weights" if fp16_weights else "f32")
    run.effective = {"runtime": module, module: installed_version(module.replace("_", "-"), "unknown"),
                     "threads": int(threads), "kernels": kernels, "input_dtype": np.dtype(inp["dtype"]).name,
                     "output_dtype": np.dtype(out["dtype"]).name, "compute": compute}
    return run


def compare_to_torch(model, runner: Callable[[np.ndarray], np.ndarray], frames: np.ndarray) -> dict:
    """Mask agreement (logit > 0) and max abs logit difference of ``runner`` against ``model`` in torch."""
    import torch

    with torch.no_grad():
        ref = model.eval()(torch.from_numpy(np.ascontiguousarray(frames, np.float32))).numpy()
    got = runner(frames)
    return {"agreement": float(((ref > 0) == (got > 0)).mean()), "max_abs_diff": float(np.abs(ref - got).max()),
            "mean_abs_diff": float(np.abs(ref - got).mean()), "n_frames": int(len(frames))}


# --------------------------------------------------------------------------------------------------------
# Backend interface of edgeseg.export (export(source, request, out_dir), load_runner(path, target))
# --------------------------------------------------------------------------------------------------------


def export(source, request, out_dir: str | os.PathLike) -> tuple[Path, dict]:
    """Backend entry point of the export pipeline: converts ``source.model`` (the checkpoint's model as
    trained: this backend does its own export-only preparation) under ``source.contract`` to
    ``out_dir/<target.artefact>`` at ``request.precision`` (int8 calibrated on ``request.calib``).
    Returns (path, info) where info is the conversion report without the per-op lists."""
    target = request.target
    path = Path(out_dir) / target.artefact
    try:
        litert_python()
    except ImportError as e:
        raise EdgesegError(str(e)) from None
    report = torch_to_tflite(source.model, source.contract, path, request.precision, request.calib)
    info = {k: v for k, v in report.items() if k != "path"}
    for key in ("float_islands", "int16_islands"):
        info[key] = [f"{f['op']}:{f['output']}" for f in report[key]]
    info["layout"] = "NHWC"
    return path, info
