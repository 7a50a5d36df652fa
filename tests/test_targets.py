"""The target registry: every targets/*.toml parses, the files are the registry, lookups fail helpfully, and
the registry and CLI work without any optional runtime installed."""

from __future__ import annotations

import inspect
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from edgeseg.errors import EdgesegError
from edgeseg.export import Backend, backend_module
from edgeseg.targets import PRECISIONS, get_target, list_targets, targets_dir

REPO = Path(__file__).resolve().parents[1]
ISSUE_TARGETS = {"onnx", "openvino-cpu", "openvino-igpu", "tflite-rpi", "tensorrt-jetson"}
# Backends whose module may still be missing (the registry already lists their targets).
def test_every_toml_parses_and_the_files_are_the_registry():
    files = sorted(targets_dir().glob("*.toml"))
    assert targets_dir().resolve() == REPO / "targets"  # the packaged path is a symlink to targets/
    for path in files:
        raw = tomllib.loads(path.read_text())
        assert raw["id"] == path.stem
    assert {p.stem for p in files} == {t.id for t in list_targets()} == ISSUE_TARGETS
    assert not [p for p in targets_dir().iterdir() if p.suffix != ".toml"]


@pytest.mark.parametrize("target", list_targets(), ids=lambda t: t.id)
def test_target_rows_are_consistent(target):
    assert target.precision in target.precisions and set(target.precisions) <= set(PRECISIONS)
    assert target.device in ("cpu", "gpu", "npu")
    assert target.artefact.startswith("model.")
    assert target.runtime.packages and target.runtime.install and target.profile.threads >= 1
    assert target.needs_calibration("int8") and not target.needs_calibration("fp16")
    if target.backend == "openvino":
        assert set(target.compile["inference_precision"]) == set(target.precisions)
        assert target.compile["execution_mode"] == "ACCURACY"


@pytest.mark.parametrize("target", list_targets(), ids=lambda t: t.id)
def test_install_hints_name_extras_that_exist(target):
    """Every pip line a target prints names optional-dependency groups that pyproject.toml really has."""
    import re

    extras = set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    assert target.runtime.extra in extras
    for line in (target.runtime.install, target.runtime.device_install):
        named = [e for group in re.findall(r"edgeseg\[([^\]]+)\]", line) for e in group.split(",")]
        assert named and set(named) <= extras, (line, set(named) - extras)


@pytest.mark.parametrize("target", list_targets(), ids=lambda t: t.id)
def test_each_backend_module_is_a_backend(target):
    """Every backend has the Backend protocol's export and load_runner, with its positional parameters."""
    module = backend_module(target)
    for name in ("export", "load_runner"):
        want = list(inspect.signature(getattr(Backend, name)).parameters)[1:]  # without self
        got = [p.name for p in inspect.signature(getattr(module, name)).parameters.values()
               if p.kind is not p.KEYWORD_ONLY]
        assert got == want, (module.__name__, name, got)


def test_unknown_target_suggests_the_nearest():
    with pytest.raises(EdgesegError, match=r"unknown target 'openvino-gpu'\. Did you mean 'openvino-igpu'\?"):
        get_target("openvino-gpu")
    with pytest.raises(EdgesegError, match="Known: onnx, openvino-cpu"):
        get_target("coreml")


def test_precision_resolution():
    t = get_target("openvino-igpu")
    assert t.resolve_precision(None) == "fp16" and t.resolve_precision("int8") == "int8"
    with pytest.raises(EdgesegError, match=r"unknown precision 'fp61'\. Did you mean 'fp16'\?"):
        t.resolve_precision("fp61")
    with pytest.raises(EdgesegError, match="supports fp16, int8, not fp32; targets with fp32: onnx"):
        t.resolve_precision("fp32")


def test_bad_toml_is_refused(tmp_path, monkeypatch):
    import edgeseg.targets as targets

    (tmp_path / "mine.toml").write_text('id = "other"\n')
    monkeypatch.setattr(targets, "targets_dir", lambda: tmp_path)
    with pytest.raises(EdgesegError, match="missing keys"):
        targets.list_targets()
    (tmp_path / "mine.toml").unlink()
    text = (REPO / "targets" / "onnx.toml").read_text()
    (tmp_path / "onnx.toml").write_text("\n".join(l for l in text.splitlines() if not l.startswith("device_install")))
    targets._load.cache_clear()
    with pytest.raises(EdgesegError, match=r"\[runtime\] must have exactly the keys"):
        targets.list_targets()


def test_targets_cli_lists_every_target(cli):
    code, out, _ = cli("targets")
    assert code == 0
    for t in list_targets():
        assert t.id in out
    assert "pip install edgeseg[openvino]" in out


def test_registry_and_help_need_no_optional_runtime():
    # A fresh interpreter in which importing any optional runtime fails.
    blocked = ["onnx", "onnxruntime", "onnxslim", "onnxsim", "openvino", "nncf", "tensorflow", "ai_edge_litert"]
    code = (f"import sys\nfor m in {blocked!r}: sys.modules[m] = None\n"
            "import edgeseg.targets, edgeseg.export, edgeseg.calibration\n"
            "assert len(edgeseg.targets.list_targets()) == 5\n"
            "sys.argv = ['edgeseg', '--help']\nfrom edgeseg.cli import main\nmain()\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "export" in done.stdout and "targets" in done.stdout
    # nor does the light registry import pull in torch
    done = subprocess.run([sys.executable, "-c", "import sys, edgeseg.targets; assert 'torch' not in sys.modules"],
                          capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 0, done.stderr


def test_wheel_ships_targets_calibration_and_the_default_model(tmp_path):
    """A non-editable install has no source tree: the wheel must carry the registry, the default calibration
    manifest and the shipped checkpoint."""
    import zipfile

    done = subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation",
                           "-q", "-w", str(tmp_path)], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = tmp_path.glob("edgeseg-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    want = {f"edgeseg/_targets/{p.name}" for p in (REPO / "targets").glob("*.toml")}
    want |= {f"edgeseg/_calibration/{p.name}" for p in (REPO / "calibration").glob("*.json")}
    want.add("edgeseg/weights/ultraseg-108k-pranet.pt")
    assert len(want) >= 7 and want <= names, sorted(want - names)
