"""The on-device profile harness: runtime-only import path, JSON last line, end-to-end video timing, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import cv2
import pytest

from edgeseg.export import export
from edgeseg.models.authors import import_released

HEADLINE = {"p50_ms", "p90_ms", "p99_ms", "fps", "threads", "target", "precision", "device"}


@pytest.fixture(scope="module")
def artefact(tmp_path_factory, authors_weights, data_root):
    d = tmp_path_factory.mktemp("art")
    ckpt = import_released("ultraseg-130k", authors_weights, d / "authors.pt")
    return export(ckpt, "onnx", d / "onnx", parity_split="pranet-test-cvc-clinicdb", data_root=data_root).path


@pytest.fixture(scope="module")
def clip(tmp_path_factory, data_root):
    path = tmp_path_factory.mktemp("video") / "cvc.avi"
    frames = [cv2.imread(str(data_root / "cvc-clinicdb" / "images" / f"{i}.jpg")) for i in range(20, 30)]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25.0, frames[0].shape[1::-1])
    for f in frames:
        writer.write(f)
    writer.release()
    return path


def test_profile_never_imports_torch(artefact, clip):
    code = ("import sys\nfrom edgeseg.cli import main\nsys.argv = ['edgeseg', 'profile', sys.argv[1], '--runs', '5', "
            "'--warmup', '2', '--end-to-end', sys.argv[2]]\ntry:\n    main()\nexcept SystemExit as e:\n"
            "    assert not e.code, e.code\nprint('TORCH_LOADED' if 'torch' in sys.modules else 'NO_TORCH')\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code, str(artefact), str(clip)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == "NO_TORCH"
    record = json.loads(lines[-2])  # the profile's JSON line
    assert HEADLINE <= set(record)
    assert record["end_to_end"]["frames"] == 10 and record["end_to_end"]["p50_ms"] >= record["p50_ms"] * 0.5


def test_json_is_the_last_stdout_line_and_runs_are_counted(cli, artefact):
    code, out, err = cli("profile", artefact, "--runs", "7", "--warmup", "1", "--threads", "1", "--pin-core", "0")
    assert code == 0, err
    record = json.loads(out.strip().splitlines()[-1])
    assert HEADLINE <= set(record) and record["model_only"]["n"] == 7 and record["threads"] == 1
    assert record["target"] == "onnx" and record["precision"] == "fp32" and record["pinned_core"] == 0
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
