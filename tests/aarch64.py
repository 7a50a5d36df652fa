"""Test infrastructure: run .tflite artefacts on an emulated Raspberry Pi (aarch64 Debian bookworm, Python 3.11,
LiteRT) on x86, for tests/test_aarch64_emulation.py. Not part of the edgeseg package.

    python tests/aarch64.py setup        # build the sysroot once (root, network: Debian + PyPI)
    python tests/aarch64.py check        # smoke test: platform, numpy, ai_edge_litert, XNNPACK

The sysroot lives in ``$EDGESEG_AARCH64_ROOT`` (default ``$EDGESEG_CACHE/aarch64``, i.e.
``~/.cache/edgeseg/aarch64``) and is built idempotently (a stamp records what it was built with; a lock
serialises concurrent builders; a failed build leaves nothing half-made behind):

1. host tools: ``qemu-user-static`` and ``debootstrap`` (apt-installed when missing and we are root);
2. ``debootstrap --foreign --variant=minbase --include=python3`` of arm64 bookworm from the host's apt
   mirror, then ``dpkg -x`` of every downloaded .deb instead of the second stage (which would run the
   maintainer scripts under qemu: ~11 min instead of ~1 min); Python 3.11.2, as Raspberry Pi OS bookworm;
3. ``pip install --target <root>/opt/litert --platform manylinux_..._aarch64`` of ai-edge-litert and numpy
   (every manylinux tag from 2014 to 2_36 is listed: pip does not expand them, and ai-edge-litert 2.3.0 ships
   only ``manylinux_2_27_aarch64``);
4. a fake CPU for the ``cpuinfo`` library that XNNPACK initialises from: ``/proc/cpuinfo`` of a Cortex-A72
   (Pi 4) or Cortex-A76 (Pi 5) and ``/sys/devices/system/cpu/{possible,present,online}``, as plain files in
   the sysroot. Without them XNNPACK is silently skipped; with the host's /sys the process segfaults.

Models then run under ``qemu-aarch64-static -L <root>`` (no chroot, no binfmt, no mounts), with the CPU
pinned (``-cpu`` and ``QEMU_CPU``): qemu 7.2's default ``max`` CPU advertises SVE/SME, and XNNPACK's int8
kernels then give wrong results. :func:`run_tflite_aarch64` feeds the artefact's raw input tensors and
returns its raw outputs, which are bit-identical to x86 LiteRT for int8 and fp32 (tests/test_aarch64_emulation.py).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

__all__ = ["sysroot_dir", "ensure_sysroot", "sysroot_ready", "run_tflite_aarch64", "CPUS"]

SUITE = "bookworm"
WHEELS = ("ai-edge-litert==2.3.0", "numpy==2.4.6")
MANYLINUX_TAGS = ("manylinux2014_aarch64", *(f"manylinux_2_{v}_aarch64" for v in range(17, 37)), "linux_aarch64")
STAMP = ".edgeseg-aarch64.json"
FORMAT = 1

_A72_FEATURES = "fp asimd evtstrm crc32 cpuid"
_A76_FEATURES = ("fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop "
                 "asimddp")
# qemu -cpu name -> (/proc/cpuinfo part number, feature line)
CPUS = {"cortex-a72": ("0xd08", _A72_FEATURES), "cortex-a76": ("0xd0b", _A76_FEATURES)}
N_FAKE_CPUS = 4
KERNELS = ("xnnpack", "builtin", "reference")


def sysroot_dir() -> Path:
    explicit = os.environ.get("EDGESEG_AARCH64_ROOT")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("EDGESEG_CACHE", Path.home() / ".cache" / "edgeseg")) / "aarch64"


def _want() -> dict:
    return {"format": FORMAT, "suite": SUITE, "wheels": list(WHEELS)}


def sysroot_ready(root: Path | None = None) -> bool:
    root = Path(root) if root is not None else sysroot_dir()
    try:
        return json.loads((root / STAMP).read_text()).get("want") == _want()
    except (OSError, ValueError):
        return False


@contextmanager
def _lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _log(msg: str, log) -> None:
    if log is not None:
        log(msg)


def _run(cmd: list[str], log=None, **kw) -> None:
    _log("$ " + " ".join(cmd), log)
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-20:])
        raise RuntimeError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")


def _host_tools(log=None) -> None:
    missing = [pkg for tool, pkg in (("qemu-aarch64-static", "qemu-user-static"), ("debootstrap", "debootstrap"))
               if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists()]
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise RuntimeError(f"missing host tools {missing}: install them (Debian/Ubuntu: "
                           f"sudo apt-get install -y {' '.join(missing)}) or run the setup as root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    _run(["apt-get", "update", "-q"], log, env=env)
    _run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing], log, env=env)


def _debian_mirror() -> str:
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    if sources.is_file():
        for line in sources.read_text().splitlines():
            if line.startswith("URIs:") and "security" not in line:
                return line.split()[1]
    legacy = Path("/etc/apt/sources.list")
    if legacy.is_file():
        for line in legacy.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "deb" and "security" not in parts[1]:
                return parts[1] if not parts[1].startswith("[") else parts[2]
    return "http://deb.debian.org/debian"


def _fake_cpu_files(root: Path, cpu: str) -> None:
    part, features = CPUS[cpu]
    block = (f"processor\t: {{i}}\nBogoMIPS\t: 108.00\nFeatures\t: {features}\nCPU implementer\t: 0x41\n"
             f"CPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: {part}\nCPU revision\t: 3\n\n")
    (root / "proc").mkdir(exist_ok=True)
    (root / "proc" / "cpuinfo").write_text("".join(block.format(i=i) for i in range(N_FAKE_CPUS)))
    cpu_dir = root / "sys" / "devices" / "system" / "cpu"
    cpu_dir.mkdir(parents=True, exist_ok=True)
    for name in ("possible", "present", "online"):
        (cpu_dir / name).write_text(f"0-{N_FAKE_CPUS - 1}\n")


def ensure_sysroot(root: Path | None = None, log=print) -> Path:
    """Build the emulated Raspberry Pi sysroot if it is not there yet (see module docstring). Idempotent."""
    root = Path(root) if root is not None else sysroot_dir()
    if sysroot_ready(root):
        _host_tools(log)  # the sysroot is cached, qemu is a host package: re-install it if it went away
        return root
    with _lock(root.parent / f".{root.name}.lock"):
        if sysroot_ready(root):
            return root
        t0 = time.perf_counter()
        _host_tools(log)
        if os.geteuid() != 0:
            raise RuntimeError("building the aarch64 sysroot needs root (debootstrap); run "
                               "`sudo python tests/aarch64.py setup` once")
        partial = root.with_name(root.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        try:
            debootstrap = shutil.which("debootstrap") or "/usr/sbin/debootstrap"
            _run([debootstrap, "--arch=arm64", "--variant=minbase", "--foreign", "--include=python3", SUITE,
                  str(partial), _debian_mirror()], log)
            archives = partial / "var" / "cache" / "apt" / "archives"
            debs = sorted(archives.glob("*.deb"))
            _log(f"dpkg -x {len(debs)} packages", log)
            for deb in debs:
                _run(["dpkg-deb", "-x", str(deb), str(partial)])
                deb.unlink()
            plat = [a for tag in MANYLINUX_TAGS for a in ("--platform", tag)]
            env = {k: v for k, v in os.environ.items() if k not in ("PIP_CONSTRAINT", "PIP_REQUIRE_VIRTUALENV")}
            _run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-compile",
                  "--target", str(partial / "opt" / "litert"), *plat, "--only-binary=:all:", "--python-version",
                  "3.11", "--implementation", "cp", "--abi", "cp311", *WHEELS], log, env=env)
            _fake_cpu_files(partial, "cortex-a72")
            info = _smoke(partial, "cortex-a72")
            (partial / STAMP).write_text(json.dumps({"want": _want(), "built_s": round(time.perf_counter() - t0, 1),
                                                     "smoke": info}, indent=2))
            shutil.rmtree(root, ignore_errors=True)
            partial.rename(root)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
            (partial.parent / f".{partial.name}.run.lock").unlink(missing_ok=True)
        _log(f"aarch64 sysroot ready in {root} ({time.perf_counter() - t0:.0f} s)", log)
    return root


def _qemu() -> str:
    found = shutil.which("qemu-aarch64-static")
    if found is None:
        raise RuntimeError("qemu-aarch64-static not found: run `python tests/aarch64.py setup` "
                           "(Debian/Ubuntu package qemu-user-static)")
    return found


def _emulated(root: Path, cpu: str, args: list[str], timeout: float, threads_env: int = 1):
    if cpu not in CPUS:
        raise ValueError(f"cpu must be one of {sorted(CPUS)} (a pinned Pi core; qemu's default 'max' CPU "
                         f"advertises SVE/SME and XNNPACK's int8 path then computes wrong results), got {cpu!r}")
    env = {"QEMU_CPU": cpu, "PYTHONPATH": str(root / "opt" / "litert"), "PYTHONNOUSERSITE": "1",
           "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": str(threads_env), "LC_ALL": "C.UTF-8",
           "PATH": "/usr/bin:/bin", "HOME": "/tmp"}
    cmd = [_qemu(), "-cpu", cpu, "-L", str(root), str(root / "usr" / "bin" / "python3.11"), *args]
    # The fake /proc/cpuinfo is one file in the shared sysroot: runs hold a lock while it says ``cpu``.
    with _lock(root.parent / f".{root.name}.run.lock"):
        _fake_cpu_files(root, cpu)
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


_SMOKE = ("import platform, numpy, ai_edge_litert, ai_edge_litert.interpreter, importlib.metadata as md; "
          "print(platform.machine(), platform.python_version(), numpy.__version__, md.version('ai-edge-litert'))")


def _smoke(root: Path, cpu: str) -> dict:
    proc = _emulated(root, cpu, ["-c", _SMOKE], timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"emulated python smoke test failed:\n{proc.stderr[-2000:]}")
    machine, py, npv, litert = proc.stdout.split()
    if machine != "aarch64":
        raise RuntimeError(f"emulated python reports machine {machine!r}, not aarch64")
    return {"machine": machine, "python": py, "numpy": npv, "ai_edge_litert": litert}


_RUNNER = r'''
import sys, time, numpy as np
from ai_edge_litert.interpreter import Interpreter
from ai_edge_litert.interpreter import OpResolverType
model, inp, out, threads, kernels = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
x = np.load(inp)
resolver = {"xnnpack": OpResolverType.AUTO, "builtin": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
            "reference": OpResolverType.BUILTIN_REF}[kernels]
t0 = time.perf_counter()
it = Interpreter(model_path=model, num_threads=threads, experimental_op_resolver_type=resolver)
it.allocate_tensors()
i, o = it.get_input_details()[0], it.get_output_details()[0]
t_load = time.perf_counter() - t0
ys, times = [], []
for frame in x:
    it.set_tensor(i["index"], np.ascontiguousarray(frame[None]))
    t = time.perf_counter(); it.invoke(); times.append(time.perf_counter() - t)
    ys.append(it.get_tensor(o["index"]).copy())
np.save(out, np.concatenate(ys))
print("EDGESEG_TIMES", t_load, " ".join(f"{v:.4f}" for v in times), flush=True)
'''


def run_tflite_aarch64(tflite_path: str | os.PathLike, inputs: np.ndarray, cpu: str = "cortex-a72",
                       threads: int = 1, kernels: str = "xnnpack", root: Path | None = None,
                       timeout: float = 1800.0, info: dict | None = None) -> np.ndarray:
    """Run a .tflite under emulated aarch64 (LiteRT + XNNPACK, CPU pinned to ``cpu``).

    ``inputs``: (N, ...) raw model inputs, i.e. N frames each of the model's input shape without its batch
    dimension of 1, in the model's input dtype (int8 NHWC for an int8 edgeseg artefact; see
    ``load_runner(...).to_model_input``). Returns the N raw outputs stacked along axis 0. ``info``, if
    given, receives timings and whether XNNPACK was active. ``kernels``: "xnnpack" (the default delegate,
    as on a Pi), "builtin" (TFLite's own optimised kernels) or "reference". The sysroot must exist
    (:func:`ensure_sysroot`).
    """
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
    root = Path(root) if root is not None else sysroot_dir()
    if not sysroot_ready(root):
        raise RuntimeError(f"no aarch64 sysroot at {root}: build it once with "
                           "`python tests/aarch64.py setup` (root; Debian + PyPI access)")
    inputs = np.asarray(inputs)
    # Host paths that do not exist inside the sysroot, so that qemu's -L lookup falls through to the host.
    with tempfile.TemporaryDirectory(prefix="edgeseg-aarch64-") as tmp:
        tmp = Path(tmp)
        if (root / tmp.relative_to("/")).exists():
            raise RuntimeError(f"{tmp} also exists inside the sysroot; qemu -L would redirect it")
        shutil.copyfile(tflite_path, tmp / "model.tflite")
        np.save(tmp / "in.npy", inputs)
        (tmp / "run.py").write_text(_RUNNER)
        t0 = time.perf_counter()
        proc = _emulated(root, cpu, [str(tmp / "run.py"), str(tmp / "model.tflite"), str(tmp / "in.npy"),
                                     str(tmp / "out.npy"), str(int(threads)), kernels], timeout=timeout)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"emulated aarch64 run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        out = np.load(tmp / "out.npy")
    if info is not None:
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("EDGESEG_TIMES")), "EDGESEG_TIMES 0")
        vals = line.split()[1:]
        info.update({"cpu": cpu, "threads": threads, "wall_s": round(wall, 2), "load_s": float(vals[0]),
                     "invoke_s": [float(v) for v in vals[1:]],
                     "xnnpack": "XNNPACK delegate" in proc.stderr, "stderr": proc.stderr[-2000:]})
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cmd = argv[0] if argv else "setup"
    root = sysroot_dir()
    if cmd == "setup":
        ensure_sysroot(root)
        print(json.dumps(json.loads((root / STAMP).read_text()), indent=2))
    elif cmd == "check":
        if not sysroot_ready(root):
            print(f"no sysroot at {root}; run setup first", file=sys.stderr)
            return 1
        for cpu in CPUS:
            print(cpu, json.dumps(_smoke(root, cpu)))
    else:
        print("usage: python tests/aarch64.py [setup|check]", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
