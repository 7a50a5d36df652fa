"""Latency measurement of a runner: warm-up, timed runs, percentiles, system facts. No torch import: this
module runs on devices that only have a runtime installed.

The statistics are computed from ``time.perf_counter_ns`` around each call; a run is marked throttled when
the platform exposes throttling flags (Raspberry Pi ``vcgencmd get_throttled``) and they are set.
"""

from __future__ import annotations

import math
import os
import platform
import resource
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from edgeseg.errors import EdgesegError


@dataclass
class LatencyStats:
    n: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    std_ms: float
    min_ms: float
    fps: float  # 1000 / mean

    @classmethod
    def from_ns(cls, samples_ns: list[int]) -> "LatencyStats":
        ms = np.asarray(samples_ns, dtype=np.float64) / 1e6
        p50, p90, p99 = np.percentile(ms, [50, 90, 99])
        return cls(len(ms), float(p50), float(p90), float(p99), float(ms.max()), float(ms.mean()),
                   float(ms.std()), float(ms.min()), float(1000.0 / ms.mean()))


@dataclass
class Timing:
    """Model-only timing of one runner."""

    first_ms: float  # the first inference (lazy allocation, JIT, caches)
    stats: LatencyStats
    peak_rss_mb: float
    throttled: bool | None  # None: the platform does not tell
    samples_ms: list[float] = field(default_factory=list)


MAX_THREADS = 1024  # a sanity bound on --threads; runtimes take a C int


def check_timing_options(runs: int | None = None, warmup: int | None = None, duration_s: float | None = None,
                         threads: int | None = None, pin_core: int | None = None) -> None:
    """Refuse timing options that cannot be honoured, before anything is loaded or exported (None: the
    default). Shared by ``profile`` and ``benchmark``."""
    if runs is not None and runs < 1:
        raise EdgesegError(f"--runs must be at least 1, got {runs}")
    if warmup is not None and warmup < 0:
        raise EdgesegError(f"--warmup must be 0 or more, got {warmup}")
    if duration_s is not None and not (math.isfinite(duration_s) and duration_s > 0):
        raise EdgesegError(f"--duration must be a number of seconds above 0, got {duration_s}")
    check_threads(threads, "the target's default")
    _check_core(pin_core)


def check_threads(threads: int | None, default: str) -> None:
    """Refuse a ``--threads`` outside [1, MAX_THREADS]; ``default`` says what leaving it out gives."""
    if threads is not None and not 1 <= threads <= MAX_THREADS:
        raise EdgesegError(f"--threads must be between 1 and {MAX_THREADS}, got {threads} (leave it out for "
                           f"{default})")


def _check_core(core: int | None) -> None:
    if core is None:
        return
    available = sorted(os.sched_getaffinity(0))
    if core not in available:
        raise EdgesegError(f"--pin-core {core} is not available here; cores: {', '.join(map(str, available))}")


def pin_to_core(core: int | None) -> None:
    """Pin this process to one core (``os.sched_setaffinity``); refuse a core that does not exist."""
    if core is None:
        return
    _check_core(core)
    os.sched_setaffinity(0, {core})


def time_runner(run: Callable[[], object], warmup: int, runs: int, duration_s: float | None = None) -> Timing:
    """Call ``run`` ``warmup`` times, then ``runs`` times (or until ``duration_s`` has passed, at least once)."""
    if runs < 1 and not duration_s:
        raise EdgesegError("--runs must be at least 1 (or give --duration)")
    if warmup < 0:
        raise EdgesegError("--warmup must be >= 0")
    before = throttle_flags()
    t0 = time.perf_counter_ns()
    run()
    first_ms = (time.perf_counter_ns() - t0) / 1e6
    for _ in range(max(0, warmup - 1)):
        run()
    samples: list[int] = []
    deadline = time.perf_counter() + duration_s if duration_s else None
    while (len(samples) < runs if deadline is None else time.perf_counter() < deadline) or not samples:
        t = time.perf_counter_ns()
        run()
        samples.append(time.perf_counter_ns() - t)
    after = throttle_flags()
    throttled = None if after is None else bool(after) or (before is not None and bool(before))
    return Timing(first_ms, LatencyStats.from_ns(samples), peak_rss_mb(), throttled, [s / 1e6 for s in samples])


def peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def throttle_flags() -> int | None:
    """Raspberry Pi: the ``vcgencmd get_throttled`` bit field (0 = never throttled); None elsewhere."""
    if not shutil.which("vcgencmd"):
        return None
    try:
        out = subprocess.run(["vcgencmd", "get_throttled"], capture_output=True, text=True, timeout=5).stdout
        return int(out.strip().split("=")[1], 16)
    except (OSError, subprocess.TimeoutExpired, IndexError, ValueError):
        return None


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def cpu_model(cpuinfo: str | None = None) -> str | None:
    """The CPU's name from /proc/cpuinfo (or the text ``cpuinfo``): its "model name" (x86, most ARM kernels),
    else the board's "Model" or the SoC's "Hardware" line (Raspberry Pi kernels without "model name"), else
    ``platform.processor()``. Never x86's numeric "model" field."""
    if cpuinfo is None:
        cpuinfo = _read("/proc/cpuinfo") or ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and value.strip():
            fields.setdefault(key.strip(), value.strip())
    name = next((fields[k] for k in ("model name", "Model", "Hardware") if k in fields), None)
    return name or platform.processor() or None


def system_info(core: int | None = None) -> dict:
    """CPU model, governor, frequency, Jetson power model: whatever this platform exposes."""
    cpu = cpu_model()
    c = core if core is not None else 0
    freq = _read(f"/sys/devices/system/cpu/cpu{c}/cpufreq/scaling_cur_freq")
    info = {
        "machine": platform.machine(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "governor": _read(f"/sys/devices/system/cpu/cpu{c}/cpufreq/scaling_governor"),
        "freq_mhz": int(freq) / 1000 if freq and freq.isdigit() else None,
        "python": platform.python_version(),
        "jetson_nvpmodel": None,
    }
    if shutil.which("nvpmodel"):
        try:
            info["jetson_nvpmodel"] = subprocess.run(["nvpmodel", "-q"], capture_output=True, text=True,
                                                     timeout=5).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            pass
    return info


def profile_artefact(path: str | os.PathLike, threads: int | None = None, pin_core: int | None = None,
                     warmup: int | None = None, runs: int | None = None, duration_s: float | None = None,
                     end_to_end: str | os.PathLike | None = None, device: str | None = None) -> dict:
    """Load an exported artefact with its own runtime and time it. Returns one flat-ish JSON-able dict whose
    headline keys are ``p50_ms, p90_ms, p99_ms, fps, threads, target, precision, device`` (model only)."""
    from edgeseg.contract import InputContract
    from edgeseg.export import make_runner, open_artefact
    from edgeseg.targets import get_target

    check_timing_options(runs, warmup, duration_s, threads, pin_core)
    if end_to_end is not None and not Path(end_to_end).exists():
        raise EdgesegError(f"--end-to-end {end_to_end} does not exist")
    folder, config = open_artefact(path)  # config.json and the model files checked
    target = get_target(config["target"])
    warmup = target.profile.warmup if warmup is None else warmup
    runs = target.profile.runs if runs is None else runs
    pin_to_core(pin_core)
    contract = InputContract.from_dict(config["input_contract"])
    t0 = time.perf_counter()
    runner = make_runner(folder, config, device=device, threads=threads)
    load_ms = (time.perf_counter() - t0) * 1000
    if getattr(runner, "effective", {}).get("f16") == "emulated":
        raise EdgesegError(f"{folder} runs in f16, which edgeseg only emulates on a CPU (for the parity check); "
                           "its latency would say nothing about the device: profile it on the device")
    rgb = np.random.default_rng(0).integers(0, 256, (contract.size, contract.size, 3), dtype=np.uint8)
    x = contract.preprocess(rgb)
    timing = time_runner(lambda: runner(x), warmup, runs, duration_s)
    effective = dict(getattr(runner, "effective", {}))
    result = {
        **{k: getattr(timing.stats, k) for k in ("p50_ms", "p90_ms", "p99_ms")}, "fps": timing.stats.fps,
        "threads": threads or target.profile.threads, "target": target.id, "precision": config["precision"],
        "device": effective.get("device", device or target.device),
        "model_only": asdict(timing.stats), "first_inference_ms": timing.first_ms, "load_compile_ms": load_ms,
        "peak_rss_mb": timing.peak_rss_mb, "throttled": timing.throttled, "pinned_core": pin_core,
        "model": config["model"], "runtime": effective, "system": system_info(pin_core),
        "samples_ms": timing.samples_ms,
    }
    if end_to_end is not None:
        result["end_to_end"] = _end_to_end(runner, contract, Path(end_to_end))
    return result


def _end_to_end(runner, contract, source: Path) -> dict:
    """decode -> preprocess -> infer -> threshold + overlay over every frame of a video or image folder."""
    from edgeseg.predict import frames_of, predict_frames

    frames, release = frames_of(source)
    try:
        timings = [p.timings for p in predict_frames(runner, contract, frames)]
    finally:
        release()
    if not timings:
        raise EdgesegError(f"{source} has no readable frames")
    stats = LatencyStats.from_ns([int(t["total_ms"] * 1e6) for t in timings])
    stages = {k: float(np.median([t[k] for t in timings])) for k in ("decode_ms", "preprocess_ms", "infer_ms", "post_ms")}
    return {"source": str(source), "frames": len(timings), **asdict(stats), "median_stage_ms": stages}
