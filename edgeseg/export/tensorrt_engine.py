"""tensorrt-jetson, the device side: build a TensorRT engine from a tensorrt-jetson artefact and run it, ON the
Jetson. Needs TensorRT (JetPack) and cuda-python only: no torch, no onnx, no edgeseg export stack.

On the Jetson (JetPack's TensorRT Python package and ``cuda-python``)::

    edgeseg build-engine ART [--timing-cache FILE] [--workspace MB]

parses model.onnx with TensorRT's OnnxParser, builds ``model.engine`` (FP16 flag for fp16; INT8 flag alone for
the QDQ graph, explicit quantization, its float parts in fp32 as in the CPU check; TF32 off for fp32) with a
batch 1..8 optimization profile, writes the sidecar ``model.engine.json`` (TensorRT, CUDA, L4T/JetPack, GPU, compute capability, precision, sha256 of the ONNX and
of the engine; the plan file itself is TensorRT's bytes only), then runs the golden input and reports PASS/FAIL.
The runner (:func:`engine_runner`; ``edgeseg.export.load_runner`` with device None or "GPU") refuses an engine
whose sidecar does not match the running TensorRT version and compute capability, or the model.onnx beside it.

The TensorRT/CUDA code paths cannot run on the export machine and are not covered by its tests.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from edgeseg.errors import EdgesegError
from edgeseg.fileio import file_sha256, write_atomic
from edgeseg.tolerances import GOLDEN

INPUT, OUTPUT = "input", "logits"
ENGINE, SIDECAR = "model.engine", "model.engine.json"
GOLDEN_INPUT, GOLDEN_OUTPUT = "golden_input.npy", "golden_output.npy"
SIDECAR_FORMAT = "edgeseg-tensorrt-engine"
MAX_BATCH = 8  # the engine's optimization profile: batch 1 (opt) .. 8 (the parity gate's batch)
NO_TENSORRT = ("TensorRT is not installed here (`import tensorrt` failed): build and run engines on the Jetson, "
               "where JetPack provides it (sudo apt install python3-libnvinfer; in a venv use "
               "--system-site-packages)")

# BuilderFlag names per precision. int8 sets only INT8: the float parts the quantizer left (norms, gating) stay
# fp32, the numerics the CPU parity check measured.
BUILDER_FLAGS = {"fp32": (), "fp16": ("FP16",), "int8": ("INT8",)}


def read_artefact_config(folder: Path) -> dict:
    """config.json of a tensorrt-jetson artefact folder; another target's artefact is an EdgesegError."""
    from edgeseg.export import read_config
    from edgeseg.targets import get_target

    config = read_config(folder)
    if get_target(config["target"]).backend != "tensorrt":
        raise EdgesegError(f"{folder} is a {config['target']} artefact, not a TensorRT (tensorrt-jetson) one")
    return config



def _import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise EdgesegError(NO_TENSORRT) from None
    if not hasattr(trt, "Builder"):  # the PyPI placeholder package
        raise EdgesegError(NO_TENSORRT)
    return trt


def _import_cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError:
            raise EdgesegError("running a TensorRT engine needs cuda-python (for CUDA memory and streams): pip "
                               "install cuda-python==<the JetPack CUDA major version>.*") from None
    return cudart


def _cuda(result):
    """Unpack a cuda-python call's (error, value...) tuple; a CUDA error becomes an EdgesegError."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise EdgesegError(f"CUDA error {err}")
    return values[0] if len(values) == 1 else values


def l4t_release(path: str | os.PathLike = "/etc/nv_tegra_release") -> str | None:
    """The L4T release from /etc/nv_tegra_release ("# R36 (release), REVISION: 4.0, ..." -> "R36.4.0");
    None off a Jetson."""
    try:
        first = Path(path).read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    fields = [f.strip() for f in first.lstrip("# ").split(",")]
    major = fields[0].split()[0] if fields and fields[0] else ""
    revision = next((f.split(":", 1)[1].strip() for f in fields if f.upper().startswith("REVISION:")), None)
    if not major.startswith("R"):
        return first.strip() or None
    return f"{major}.{revision}" if revision else major


def _jetpack_version() -> str | None:
    if not shutil.which("dpkg-query"):
        return None
    try:
        done = subprocess.run(["dpkg-query", "--showformat=${Version}", "--show", "nvidia-jetpack"],
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (done.stdout.strip() or None) if done.returncode == 0 else None


def running_versions(trt=None, cudart=None) -> dict:
    """What an engine is tied to on this device: TensorRT, CUDA, GPU and compute capability, L4T/JetPack."""
    trt = trt or _import_tensorrt()
    cudart = cudart or _import_cudart()
    runtime = _cuda(cudart.cudaRuntimeGetVersion())
    device = _cuda(cudart.cudaGetDevice())
    props = _cuda(cudart.cudaGetDeviceProperties(device))
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return {"tensorrt": trt.__version__, "cuda_runtime": f"{runtime // 1000}.{runtime % 1000 // 10}",
            "gpu": name.rstrip("\x00"), "compute_capability": f"{props.major}.{props.minor}",
            "l4t": l4t_release(), "jetpack": _jetpack_version(), "machine": platform.machine()}


def check_engine_sidecar(sidecar: dict, running: dict, *, onnx_sha256: str | None = None,
                         engine_sha256: str | None = None, engine: str = ENGINE) -> None:
    """Refuse an engine that this device cannot trust: built by another TensorRT version or for another compute
    capability (TensorRT plans are tied to both), from another model.onnx, or changed since it was built."""
    if sidecar.get("format") != SIDECAR_FORMAT:
        raise EdgesegError(f"{engine}: its sidecar is not an edgeseg engine record; rebuild with `edgeseg "
                           "build-engine`")
    built = (sidecar.get("tensorrt"), sidecar.get("compute_capability"))
    here = (running.get("tensorrt"), running.get("compute_capability"))
    if built != here:
        raise EdgesegError(f"{engine} was built with TensorRT {built[0]} for compute capability {built[1]}, but this "
                           f"device runs TensorRT {here[0]} with compute capability {here[1]}; engines are tied to "
                           "both: rebuild it here with `edgeseg build-engine`")
    if onnx_sha256 is not None and sidecar.get("onnx_sha256") != onnx_sha256:
        raise EdgesegError(f"{engine} was built from another model.onnx (sha256 {str(sidecar.get('onnx_sha256'))[:12]}"
                           f"..., this one is {onnx_sha256[:12]}...): rebuild it with `edgeseg build-engine`")
    if engine_sha256 is not None and sidecar.get("engine_sha256") != engine_sha256:
        raise EdgesegError(f"{engine} does not match the sha256 in its sidecar (changed or copied half-way); "
                           "rebuild it with `edgeseg build-engine`")


def build_engine(artefact: str | os.PathLike, timing_cache: str | os.PathLike | None = None,
                 workspace_mb: int | None = None) -> dict:
    """Build model.engine + model.engine.json from a tensorrt-jetson artefact on this (Jetson) device, then run
    its golden check. Returns the sidecar dict (``golden_check`` holds PASS/FAIL and the numbers).

    Not runnable without TensorRT and a CUDA GPU; not covered by the export machine's tests.
    """
    folder = Path(artefact)
    if not folder.is_dir():
        raise EdgesegError(f"{folder} is not an artefact folder (make one with `edgeseg export --target "
                           "tensorrt-jetson`)")
    config = read_artefact_config(folder)
    if workspace_mb is not None and workspace_mb < 1:
        raise EdgesegError(f"--workspace must be at least 1 MB, got {workspace_mb}")
    trt = _import_tensorrt()
    cudart = _import_cudart()
    running = running_versions(trt, cudart)
    onnx_path = folder / config["artefact"]
    precision = config["precision"]
    size = config["input_contract"]["size"]

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # TensorRT 8.x needs the explicit-batch flag; 10.x has only explicit batch (the flag is deprecated there).
    explicit = getattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH", None)
    flags = 1 << int(explicit) if explicit is not None and int(trt.__version__.split(".")[0]) < 10 else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EdgesegError(f"TensorRT {trt.__version__} cannot parse {onnx_path}: {errors}")
    build_config = builder.create_builder_config()
    if workspace_mb is not None:
        build_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    for flag in BUILDER_FLAGS[precision]:
        build_config.set_flag(getattr(trt.BuilderFlag, flag))
    if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        build_config.clear_flag(trt.BuilderFlag.TF32)  # on by default on Ampere (Orin): fp32 means fp32 here
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT, (1, 3, size, size), (1, 3, size, size), (MAX_BATCH, 3, size, size))
    build_config.add_optimization_profile(profile)
    cache_path = Path(timing_cache) if timing_cache is not None else None
    if cache_path is not None:
        cache = build_config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
        build_config.set_timing_cache(cache, ignore_mismatch=False)

    t0 = time.perf_counter()
    plan = builder.build_serialized_network(network, build_config)
    build_s = time.perf_counter() - t0
    if plan is None:
        raise EdgesegError(f"TensorRT {trt.__version__} failed to build an engine from {onnx_path} (see its log "
                           "above)")
    if cache_path is not None:
        write_atomic(cache_path, bytes(build_config.get_timing_cache().serialize()))
    engine_bytes = bytes(plan)
    sidecar = {
        "format": SIDECAR_FORMAT, "format_version": 1, "engine": ENGINE, **running,
        "precision": precision, "builder_flags": list(BUILDER_FLAGS[precision]) + (
            ["no TF32"] if precision == "fp32" else []),
        "workspace_mb": workspace_mb, "timing_cache": cache_path.name if cache_path else None,
        "profile": {"input": {"min": [1, 3, size, size], "opt": [1, 3, size, size],
                              "max": [MAX_BATCH, 3, size, size]}},
        "onnx": onnx_path.name, "onnx_sha256": file_sha256(onnx_path),
        "engine_sha256": hashlib.sha256(engine_bytes).hexdigest(),
        "build_s": round(build_s, 1), "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    # the sidecar first: an engine never lies next to a record of another build without its sha256 failing
    write_atomic(folder / SIDECAR, (json.dumps(sidecar, indent=2) + "\n").encode())
    write_atomic(folder / ENGINE, engine_bytes)
    sidecar["golden_check"] = golden_check(engine_runner(folder, config, trt, cudart), folder, precision)
    write_atomic(folder / SIDECAR, (json.dumps(sidecar, indent=2) + "\n").encode())
    return sidecar


def golden_check(runner, folder: Path, precision: str) -> dict:
    """Run golden_input.npy and compare with golden_output.npy within :data:`edgeseg.tolerances.GOLDEN`."""
    try:
        x, want = np.load(folder / GOLDEN_INPUT), np.load(folder / GOLDEN_OUTPUT)
    except OSError:
        raise EdgesegError(f"{folder} has no {GOLDEN_INPUT}/{GOLDEN_OUTPUT}; export it again") from None
    got = np.asarray(runner(x), np.float32)
    if got.shape != want.shape:
        raise EdgesegError(f"engine output shape {got.shape} != golden output shape {want.shape}")
    tol = GOLDEN[precision]
    diff = float(np.abs(got - want).max())
    agreement = float(((got > 0) == (want > 0)).mean())
    passed = agreement >= tol.min_mask_agreement and (tol.max_abs_logit_diff is None or diff <= tol.max_abs_logit_diff)
    return {"passed": bool(passed), "max_abs_logit_diff": diff, "mask_agreement": agreement, "tolerance": asdict(tol)}


def engine_runner(folder: Path, config: dict, trt=None, cudart=None):
    """The engine on the Jetson's GPU through TensorRT's own API and cuda-python (no pycuda, no torch): one CUDA
    stream, device buffers grown on demand, name-based I/O (TensorRT >= 8.5, i.e. JetPack 5.1+).

    Not runnable without TensorRT and a CUDA GPU; not covered by the export machine's tests.
    """
    import weakref

    trt = trt or _import_tensorrt()
    cudart = cudart or _import_cudart()
    engine_path, sidecar_path = folder / ENGINE, folder / SIDECAR
    if not engine_path.is_file() or not sidecar_path.is_file():
        raise EdgesegError(f"{folder} has no {ENGINE} + {SIDECAR} yet: build them on this device with "
                           f"`edgeseg build-engine {folder}`")
    engine_bytes = engine_path.read_bytes()
    check_engine_sidecar(json.loads(sidecar_path.read_text()), running_versions(trt, cudart),
                         onnx_sha256=file_sha256(folder / config["artefact"]),
                         engine_sha256=hashlib.sha256(engine_bytes).hexdigest(), engine=str(engine_path))
    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(engine_bytes)
    if engine is None:
        raise EdgesegError(f"TensorRT {trt.__version__} could not load {engine_path}")
    for name in (INPUT, OUTPUT):
        if engine.get_tensor_dtype(name) != trt.DataType.FLOAT:
            raise EdgesegError(f"{engine_path}: tensor {name!r} is {engine.get_tensor_dtype(name)}, expected float32")
    context = engine.create_execution_context()
    stream = _cuda(cudart.cudaStreamCreate())
    buffers: dict[str, list] = {INPUT: [0, 0], OUTPUT: [0, 0]}  # name -> [device pointer, bytes]
    h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost

    def device_buffer(name: str, nbytes: int) -> int:
        ptr, size = buffers[name]
        if nbytes > size:
            if ptr:
                _cuda(cudart.cudaFree(ptr))
            buffers[name] = [int(_cuda(cudart.cudaMalloc(nbytes))), nbytes]
        return buffers[name][0]

    def run_batch(x: np.ndarray) -> np.ndarray:
        context.set_input_shape(INPUT, tuple(x.shape))
        y = np.empty(tuple(context.get_tensor_shape(OUTPUT)), np.float32)
        d_in, d_out = device_buffer(INPUT, x.nbytes), device_buffer(OUTPUT, y.nbytes)
        context.set_tensor_address(INPUT, d_in)
        context.set_tensor_address(OUTPUT, d_out)
        _cuda(cudart.cudaMemcpyAsync(d_in, x.ctypes.data, x.nbytes, h2d, stream))
        if not context.execute_async_v3(int(stream)):
            raise EdgesegError(f"TensorRT failed to run {engine_path}")
        _cuda(cudart.cudaMemcpyAsync(y.ctypes.data, d_out, y.nbytes, d2h, stream))
        _cuda(cudart.cudaStreamSynchronize(stream))
        return y

    def run(x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, np.float32)
        return np.concatenate([run_batch(x[i:i + MAX_BATCH]) for i in range(0, len(x), MAX_BATCH)])

    def release(buffers=buffers, stream=stream):
        for ptr, _ in buffers.values():
            if ptr:
                cudart.cudaFree(ptr)
        cudart.cudaStreamDestroy(stream)

    weakref.finalize(run, release)
    run.keep_alive = (runtime, engine, context)  # the engine must outlive the context
    run.effective = {"device": "GPU", "tensorrt": trt.__version__, "engine": ENGINE,
                     "precision": config["precision"]}
    return run
