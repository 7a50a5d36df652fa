"""Hostile input on the artefact side, through the CLI: damaged model files and config.json in profile,
predict and bundle; output paths that cannot be written; timing options that cannot be honoured. Each is one
'error: ...' line with exit code 2, refused before any work, and nothing is left half-written.

One ONNX and one OpenVINO fp32 export of the authors' UltraSeg-130K (16 parity frames) serve the whole module;
every case damages its own copy. The TFLite cases need no converter: a .tflite that no runtime could load is
the point, so the copy gets a damaged flatbuffer in place of the model.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from edgeseg.errors import EdgesegError
from edgeseg.export import export, read_config
from edgeseg.fileio import file_sha256
from _helpers import one_line_error

REPO = Path(__file__).resolve().parents[1]

pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory, authors_ckpt, data_root, parity16):
    d = tmp_path_factory.mktemp("art")
    return {t: export(authors_ckpt, t, d / t, parity_split=str(parity16), data_root=data_root).path
            for t in ("onnx", "openvino-cpu")}


@pytest.fixture(scope="module")
def frame(data_root):
    return data_root / "cvc-clinicdb" / "images" / "40.jpg"


def _copy(src, dest):
    shutil.copytree(src, dest)
    return dest


def _edit_json(path, **changes):
    obj = json.loads(path.read_text())
    obj.update(changes)
    path.write_text(json.dumps(obj))


def _cut(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _tflite(art, dest):
    """The ONNX artefact dressed as a tflite-rpi one, with a flatbuffer that is only a header and a few bytes."""
    _copy(art, dest)
    (dest / "model.onnx").unlink()
    (dest / "model.tflite").write_bytes(b"\x1c\x00\x00\x00TFL3" + bytes(40))
    _edit_json(dest / "config.json", target="tflite-rpi", backend="tflite", artefact="model.tflite",
               model_files=["model.tflite"], model_sha256={"model.tflite": file_sha256(dest / "model.tflite")},
               backend_config={})
    _edit_json(dest / "parity.json", target="tflite-rpi")
    return dest


# (case, source artefact, damage, file the message names)
DAMAGE = [
    ("ov-bin-deleted", "openvino-cpu", lambda d: (d / "model.bin").unlink(), "model.bin"),
    ("ov-bin-cut", "openvino-cpu", lambda d: _cut(d / "model.bin"), "model.bin"),
    ("ov-bin-empty", "openvino-cpu", lambda d: _cut(d / "model.bin", 0), "model.bin"),
    ("ov-xml-cut", "openvino-cpu", lambda d: _cut(d / "model.xml"), "model.xml"),
    ("ov-xml-deleted", "openvino-cpu", lambda d: (d / "model.xml").unlink(), "model.xml"),
    ("onnx-cut", "onnx", lambda d: _cut(d / "model.onnx"), "model.onnx"),
    ("onnx-garbage", "onnx", lambda d: (d / "model.onnx").write_bytes(b"not a protobuf" * 100), "model.onnx"),
    ("tflite-cut", "onnx", None, "model.tflite"),
    ("tflite-garbage", "onnx", lambda d: (d / "model.tflite").write_bytes(bytes(200)), "model.tflite"),
]


@pytest.mark.parametrize("recorded", [True, False], ids=["sha256-recorded", "older-artefact"])
@pytest.mark.parametrize("case, source, damage, name", DAMAGE, ids=[c[0] for c in DAMAGE])
def test_damaged_model_files(cli, artefacts, frame, tmp_path, case, source, damage, name, recorded):
    """With the model files' sha256 in config.json a change is caught before any runtime reads the file; an
    artefact without them (exported by an older edgeseg) is caught by the runtime's own checks."""
    art = tmp_path / case
    if name.endswith(".tflite"):
        _tflite(artefacts[source], art)
    else:
        _copy(artefacts[source], art)
    if not recorded:
        config = json.loads((art / "config.json").read_text())
        config.pop("model_sha256", None)
        (art / "config.json").write_text(json.dumps(config))
    if damage is not None:
        damage(art)
    out = tmp_path / "out"
    for args in (["profile", art, "--runs", "2", "--warmup", "1", "--out", out / "p.json"],
                 ["predict", art, frame, "--out", out / "pred"],
                 ["bundle", art, "--out", out / "unit.tar.gz", "--golden", frame]):
        code, _, err = cli(*args)
        one_line_error(code, err, case, name)
    assert not out.exists()  # nothing written, not even the output folder


def test_changed_model_file_fails_its_recorded_sha256(cli, artefacts, tmp_path):
    art = _copy(artefacts["onnx"], tmp_path / "onnx")
    data = bytearray((art / "model.onnx").read_bytes())
    data[-1] ^= 1  # one bit: a runtime might well load it
    (art / "model.onnx").write_bytes(bytes(data))
    one_line_error(*cli("profile", art)[::2], "model.onnx", "sha256", "export it again")


def test_runtime_failure_names_the_files_and_says_export_again(cli, artefacts, tmp_path):
    art = _copy(artefacts["openvino-cpu"], tmp_path / "ov")
    _edit_json(art / "config.json", model_sha256=None)
    _cut(art / "model.bin")
    code, _, err = cli("profile", art)
    one_line_error(code, err, "model.bin", "model.xml", "Incorrect weights", "export it again")
    with pytest.raises(EdgesegError) as info:
        from edgeseg.export import load_runner

        load_runner(art / "model.xml")
    assert info.value.__cause__ is not None  # EDGESEG_DEBUG=1 shows the runtime's own exception


def _drop(key):
    def change(config):
        del config[key]
    return change


def _set(**values):
    def change(config):
        config.update(values)
    return change


def _nested(outer, key, value):
    def change(config):
        config[outer][key] = value
    return change


# (case, change to the parsed config.json or raw text, words of the message)
CONFIGS = [
    ("truncated", "cut", ["config.json"]),
    ("not-an-object", "[1, 2]", ["config.json", "not an edgeseg artefact config"]),
    ("binary", b"\xff\xfe\x00garbage", ["config.json"]),
    ("no-input-contract", _drop("input_contract"), ["config.json", "input_contract", "export it again"]),
    ("target-not-a-string", _set(target=5), ["config.json", "target"]),
    ("unknown-target", _set(target="onnx-gpu"), ["config.json", "onnx-gpu"]),
    ("bad-precision", _set(precision="int4"), ["config.json", "int4"]),
    ("artefact-missing-from-list", _set(artefact="other.onnx"), ["config.json", "other.onnx"]),
    ("path-escape", _set(model_files=["model.onnx", "../../outside.bin"]), ["config.json", "model_files"]),
    ("model-files-not-a-list", _set(model_files="model.onnx"), ["config.json", "model_files"]),
    ("contract-size-zero", _nested("input_contract", "size", 0), ["config.json", "input_contract"]),
    ("contract-mean-not-numbers", _nested("input_contract", "mean", "abc"), ["config.json", "input_contract"]),
    ("contract-not-an-object", _set(input_contract=[256]), ["config.json", "input_contract"]),
    ("input-shape", _nested("input", "shape", 4), ["config.json", "input.shape"]),
    ("newer-format", _set(format_version=99), ["config.json", "upgrade edgeseg"]),
    ("no-checkpoint-hash", _set(checkpoint={}), ["config.json", "checkpoint.sha256"]),
    ("hashes-not-an-object", _set(model_sha256=["x"]), ["config.json", "model_sha256"]),
]


@pytest.mark.parametrize("case, change, words", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_damaged_config(cli, artefacts, frame, tmp_path, case, change, words):
    art = _copy(artefacts["onnx"], tmp_path / case)
    path = art / "config.json"
    if change == "cut":
        _cut(path)
    elif isinstance(change, (str, bytes)):
        path.write_bytes(change.encode() if isinstance(change, str) else change)
    else:
        config = json.loads(path.read_text())
        change(config)
        path.write_text(json.dumps(config))
    out = tmp_path / "out"
    for args in (["profile", art, "--runs", "2", "--warmup", "1"],
                 ["predict", art, frame, "--out", out / "pred"]):
        code, _, err = cli(*args)
        one_line_error(code, err, case, *words)
    assert not out.exists()
    with pytest.raises(EdgesegError):
        read_config(art)


def test_openvino_config_without_compile_properties(cli, artefacts, tmp_path):
    art = _copy(artefacts["openvino-cpu"], tmp_path / "ov")
    config = json.loads((art / "config.json").read_text())
    del config["backend_config"]["compile"]
    (art / "config.json").write_text(json.dumps(config))
    one_line_error(*cli("profile", art)[::2], "config.json", "backend_config.compile")


def test_intact_artefacts_still_open(artefacts):
    for art in artefacts.values():
        assert read_config(art)["format"] == "edgeseg-artefact"


# Output paths: `afile` is an existing file, `adir` an existing folder. Each is refused before any work
# (loading a model, evaluating, exporting), naming its option.
def _outputs(ckpt, art, frame, split, data_root, afile, adir):
    return [
        (["export", ckpt, "--target", "onnx", "--parity-split", split, "--data-root", data_root,
          "--out", afile], "--out"),
        (["export", ckpt, "--target", "onnx", "--parity-split", split, "--data-root", data_root,
          "--out", afile / "art"], "--out"),
        (["predict", art, frame, "--out", afile], "--out"),
        (["predict", art, frame, "--out", afile / "pred"], "--out"),
        (["benchmark", ckpt, "--targets", "onnx", "--data-root", data_root, "--out", afile], "--out"),
        (["benchmark", ckpt, "--targets", "onnx", "--data-root", data_root, "--out", afile / "b"], "--out"),
        (["profile", art, "--runs", "2", "--out", adir], "--out"),
        (["profile", art, "--runs", "2", "--out", afile / "p.json"], "--out"),
        (["evaluate", ckpt, "--split", split, "--data-root", data_root, "--json", adir], "--json"),
        (["evaluate", ckpt, "--split", split, "--data-root", data_root, "--json", afile / "m.json"], "--json"),
        (["evaluate", ckpt, "--split", split, "--data-root", data_root, "--overlays", afile], "--overlays"),
        (["evaluate", ckpt, "--split", split, "--data-root", data_root, "--overlays", afile / "ov"],
         "--overlays"),
    ]


@pytest.mark.parametrize("index", range(12))
def test_output_paths_that_cannot_be_written(cli, artefacts, authors_ckpt, frame, parity16, data_root, tmp_path,
                                             index):
    afile, adir = tmp_path / "afile", tmp_path / "adir"
    afile.write_text("keep me")
    adir.mkdir()
    args, option = _outputs(authors_ckpt, artefacts["onnx"], frame, parity16, data_root, afile, adir)[index]
    code, _, err = cli(*args)
    one_line_error(code, err, option, str(afile if "afile" in str(args[-1]) else adir))
    assert afile.read_text() == "keep me" and list(adir.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "afile"]  # no temp or partial files


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only folder")
def test_output_in_a_read_only_folder(cli, artefacts, frame, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        one_line_error(*cli("predict", artefacts["onnx"], frame, "--out", locked / "pred")[::2], "--out",
                       "permission")
        one_line_error(*cli("profile", artefacts["onnx"], "--out", locked / "p.json")[::2], "--out", "permission")
    finally:
        locked.chmod(0o700)


def test_check_output_creates_nothing(tmp_path):
    from edgeseg.fileio import check_output

    assert check_output(tmp_path / "a" / "b" / "c.json") == tmp_path / "a" / "b" / "c.json"
    assert check_output(tmp_path / "x" / "y", "folder") == tmp_path / "x" / "y"
    assert list(tmp_path.iterdir()) == []


# Timing options: refused before the artefact is even opened (profile: the artefact here is damaged, so any
# later check would report the damage instead) and before any export (benchmark).
TIMING = [(["--runs", "0"], "--runs"), (["--warmup", "-1"], "--warmup"), (["--duration", "0"], "--duration"),
          (["--duration", "nan"], "--duration"), (["--threads", "-1"], "--threads"),
          (["--threads", "0"], "--threads"), (["--pin-core", "4096"], "--pin-core 4096"),
          (["--pin-core", "-1"], "--pin-core -1")]


@pytest.mark.parametrize("args, needle", TIMING, ids=[" ".join(a) for a, _ in TIMING])
def test_profile_timing_options_checked_first(cli, artefacts, tmp_path, args, needle):
    art = _copy(artefacts["onnx"], tmp_path / "art")
    _cut(art / "model.onnx")
    one_line_error(*cli("profile", art, *args)[::2], needle)


@pytest.mark.parametrize("args, needle", TIMING, ids=[" ".join(a) for a, _ in TIMING])
def test_benchmark_timing_options_checked_before_any_export(cli, authors_ckpt, data_root, tmp_path, args,
                                                             needle):
    out = tmp_path / "bench"
    code, _, err = cli("benchmark", authors_ckpt, "--targets", "onnx", "--data-root", data_root, "--out", out,
                       *args)
    one_line_error(code, err, needle)
    assert not out.exists()


def test_benchmark_reexports_a_damaged_artefact(monkeypatch, artefacts, authors_ckpt, tmp_path):
    """A reused artefact folder whose model file was damaged is exported again, not reported as timed."""
    from edgeseg import benchmark

    folder = _copy(artefacts["onnx"], tmp_path / "onnx-fp32")
    sha = file_sha256(authors_ckpt)
    assert benchmark._reusable(folder, sha)
    _cut(folder / "model.onnx")
    assert not benchmark._reusable(folder, sha)
    (folder / "parity.json").write_text("{")
    assert not benchmark._reusable(folder, sha)


def test_outputs_blocked_by_a_file_are_one_line(cli, tmp_path, authors_weights, data_root):
    """Every writer creates its folders through one helper: a file where a folder must go is one line, exit 2
    (predict's masks/ folder, import-weights' folder)."""
    out = tmp_path / "pred"
    out.mkdir()
    (out / "masks").write_text("not a folder")
    image = data_root / "cvc-clinicdb" / "images" / "1.jpg"
    code, _, err = cli("predict", REPO / "edgeseg" / "weights" / "ultraseg-108k-pranet.pt", image, "--out", out)
    one_line_error(code, err, "masks", "a file of that name is in the way")
    assert (out / "masks").read_text() == "not a folder"
    (tmp_path / "afile").write_text("x")
    code, _, err = cli("import-weights", "ultraseg-130k", authors_weights, "--out", tmp_path / "afile" / "w.pt")
    one_line_error(code, err, "afile")


def test_a_file_given_as_an_artefact_says_what_an_artefact_is(cli, tmp_path):
    bundle = tmp_path / "unit.tar.gz"
    bundle.write_bytes(b"\x1f\x8b not really")
    one_line_error(*cli("profile", bundle)[::2], "unit.tar.gz", "not an artefact folder", "edgeseg unpack")
    # predict takes a checkpoint too: a lone file is read as one, and refused as one
    one_line_error(*cli("predict", bundle, tmp_path, "--out", tmp_path / "p")[::2], "unit.tar.gz",
                   "not a PyTorch checkpoint")
