"""The on-device profile harness: runtime-only import path, JSON last line, end-to-end video timing, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import cv2
import pytest

from edgeseg.export import export

HEADLINE = {"p50_ms", "p90_ms", "p99_ms", "fps", "threads", "target", "precision", "device"}


@pytest.fixture(scope="module")
def artefact(tmp_path_factory, authors_ckpt, data_root):
    d = tmp_path_factory.mktemp("art")
    return export(authors_ckpt, "onnx", d / "onnx", parity_split="pranet-test-cvc-clinicdb", data_root=data_root).path


@pytest.fixture(scope="module")
def clip(tmp_path_factory, data_root):
    path = tmp_path_factory.mktemp("video") / "cvc.avi"
    frames = [cv2.imread(str(data_root / "cvc-clinicdb" / "images" / f"{i}.jpg")) for i in range(20, 30)]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25.0, frames[0].shape[1::-1])
    for f in frames:
        writer.write(f)
    writer.release()
    return path


# A device install has no torch: block its import (as pip install edgeseg[runtime-onnx] leaves it) and run
# every device-side command through the CLI entry point.
DEVICE = """
import json, sys
sys.modules["torch"] = None  # `import torch` now raises ModuleNotFoundError, as on a runtime-only install
from edgeseg.cli import main

def run(*args):
    sys.argv = ["edgeseg", *args]
    try:
        main()
    except SystemExit as e:
        return e.code or 0
    return 0

art, clip, frame, work = sys.argv[1:5]
codes = {
    "profile": run("profile", art, "--runs", "5", "--warmup", "2", "--end-to-end", clip),
    "predict": run("predict", art, frame, "--out", work + "/pred"),
    "bundle": run("bundle", art, "--out", work + "/unit.tar.gz", "--golden", frame),
    "verify": run("verify", work + "/unit.tar.gz"),
    "selftest": run("selftest", work + "/unit.tar.gz"),
    "train": run("train", "--epochs", "1", "--out", work + "/run"),
}
print(json.dumps(codes))
"""


def test_device_commands_run_without_torch(artefact, clip, data_root, tmp_path):
    frame = data_root / "cvc-clinicdb" / "images" / "40.jpg"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", DEVICE, str(artefact), str(clip), str(frame), str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    codes = json.loads(lines[-1])
    assert codes == {"profile": 0, "predict": 0, "bundle": 0, "verify": 0, "selftest": 0, "train": 2}, proc.stderr
    record = next(json.loads(line) for line in lines if line.startswith('{"p50_ms"') or '"p50_ms"' in line)
    assert HEADLINE <= set(record)
    assert record["end_to_end"]["frames"] == 10 and record["end_to_end"]["p50_ms"] >= record["p50_ms"] * 0.5
    assert (tmp_path / "pred" / "latency.csv").is_file()
    assert "pip install 'edgeseg[torch]'" in proc.stderr and "Traceback" not in proc.stderr


def test_json_is_the_last_stdout_line_and_runs_are_counted(cli, artefact):
    cores = os.sched_getaffinity(0)
    core = min(cores)  # a core this process may use (CI may run it under taskset)
    try:
        code, out, err = cli("profile", artefact, "--runs", "7", "--warmup", "1", "--threads", "1", "--pin-core", core)
        assert os.sched_getaffinity(0) == {core}
    finally:
        os.sched_setaffinity(0, cores)  # the in-process command pinned the whole test session
    assert code == 0, err
    record = json.loads(out.strip().splitlines()[-1])
    assert HEADLINE <= set(record) and record["model_only"]["n"] == 7 and record["threads"] == 1
    assert record["target"] == "onnx" and record["precision"] == "fp32" and record["pinned_core"] == core
    assert 0 < record["p50_ms"] <= record["p90_ms"] <= record["p99_ms"] <= record["model_only"]["max_ms"]
    assert "p50" in err  # the human table goes to stderr


@pytest.mark.parametrize("args, needle", [
    (["--pin-core", "4096"], "--pin-core 4096"),
    (["--runs", "0"], "--runs"),
])
def test_bad_options(cli, artefact, args, needle):
    code, _, err = cli("profile", artefact, *args)
    assert code == 2 and needle in err and "Traceback" not in err


def test_missing_corrupt_and_runtime_less_artefacts(cli, artefact, tmp_path, monkeypatch):
    code, _, err = cli("profile", tmp_path / "nothing")
    assert code == 2 and "does not exist" in err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    code, _, err = cli("profile", broken)
    assert code == 2 and "not an edgeseg artefact" in err
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as on a device without it
    code, _, err = cli("profile", artefact, "--runs", "1")
    assert code == 2 and "pip install edgeseg[runtime-onnx]" in err


def test_out_writes_the_whole_record(cli, artefact, tmp_path):
    out = tmp_path / "records" / "onnx.json"
    code, stdout, err = cli("profile", artefact, "--runs", "4", "--warmup", "1", "--out", out)
    assert code == 0, err
    record = json.loads(out.read_text())
    assert record["model_only"]["n"] == 4 and len(record["samples_ms"]) == 4
    assert {k: v for k, v in record.items() if k != "samples_ms"} == json.loads(stdout.strip().splitlines()[-1])
    assert [p.name for p in out.parent.iterdir()] == ["onnx.json"]  # no temp file left


X86 = ("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n"
       "model name\t: AMD EPYC 9654 96-Core Processor\n")
PI = ("processor\t: 0\nBogoMIPS\t: 108.00\nCPU part\t: 0xd08\n\nHardware\t: BCM2835\nRevision\t: c03114\n"
      "Model\t\t: Raspberry Pi 4 Model B Rev 1.4\n")


@pytest.mark.parametrize("cpuinfo, name", [(X86, "AMD EPYC 9654 96-Core Processor"),
                                           (PI, "Raspberry Pi 4 Model B Rev 1.4"),
                                           ("processor\t: 0\nmodel\t\t: 17\n", "fallback")],
                         ids=["x86", "raspberry-pi", "no-model-name"])
def test_cpu_is_the_model_name_not_the_model_number(monkeypatch, cpuinfo, name):
    import platform

    from edgeseg import profiling

    real_read = profiling._read
    monkeypatch.setattr(profiling, "_read", lambda p: cpuinfo if p == "/proc/cpuinfo" else real_read(p))
    monkeypatch.setattr(platform, "processor", lambda: "fallback")
    assert profiling.system_info()["cpu"] == name


def test_cpu_on_this_machine():
    from edgeseg.profiling import system_info

    lines = open("/proc/cpuinfo").read().splitlines() if os.path.exists("/proc/cpuinfo") else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.split(":")[0].strip() == "model name"]
    cpu = system_info()["cpu"]
    assert cpu is None or not cpu.isdigit()
    if names:
        assert cpu == names[0]
