"""Bundles: pack, verify offline (any changed byte refused), self-test on the device, safe unpacking."""

from __future__ import annotations

import io
import tarfile

import pytest

from edgeseg.export import export


@pytest.fixture(scope="module")
def artefact(tmp_path_factory, authors_ckpt, data_root):
    d = tmp_path_factory.mktemp("art")
    return export(authors_ckpt, "onnx", d / "onnx", parity_split="pranet-test-cvc-clinicdb", data_root=data_root).path


@pytest.fixture
def bundle(cli, artefact, data_root, tmp_path):
    code, out, err = cli("bundle", artefact, "--out", tmp_path / "unit.tar.gz", "--data-root", data_root)
    assert code == 0, err
    return tmp_path / "unit.tar.gz"


def _members(path):
    with tarfile.open(path, "r:gz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def _repack(path, files, extra=()):
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)


def test_bundle_holds_everything_and_selftest_passes(cli, bundle):
    names = set(_members(bundle))
    assert {"model.onnx", "config.json", "parity.json", "manifest.json", "golden/input.png", "golden/logits.npy"} <= names
    code, out, _ = cli("verify", bundle)
    assert code == 0 and "verified 5 files" in out and "unsigned: integrity only" in out
    code, out, _ = cli("selftest", bundle, "--target", "onnx")
    assert code == 0 and out.startswith("PASS onnx fp32")


def test_any_changed_byte_is_refused(cli, bundle, tmp_path):
    files = _members(bundle)
    model = bytearray(files["model.onnx"])
    model[len(model) // 2] ^= 1
    _repack(tmp_path / "tampered.tar.gz", {**files, "model.onnx": bytes(model)})
    code, _, err = cli("verify", tmp_path / "tampered.tar.gz")
    assert code == 2 and "model.onnx does not match its sha256" in err
    code, _, err = cli("selftest", tmp_path / "tampered.tar.gz")
    assert code == 2 and "model.onnx" in err
    _repack(tmp_path / "added.tar.gz", {**files, "extra.bin": b"1"})
    code, _, err = cli("verify", tmp_path / "added.tar.gz")
    assert code == 2 and "extra.bin is not listed" in err
    data = bundle.read_bytes()
    (tmp_path / "cut.tar.gz").write_bytes(data[: len(data) // 2])
    code, _, err = cli("verify", tmp_path / "cut.tar.gz")
    assert code == 2 and "truncated" in err
    code, _, err = cli("verify", bundle, "--manifest-sha256", "0" * 64)
    assert code == 2 and "manifest sha256" in err


@pytest.mark.parametrize("name, kind", [("../evil.sh", tarfile.REGTYPE), ("/etc/evil", tarfile.REGTYPE),
                                        ("link", tarfile.SYMTYPE), ("hard", tarfile.LNKTYPE),
                                        ("fifo", tarfile.FIFOTYPE), ("tty", tarfile.CHRTYPE)])
def test_unsafe_members_are_refused(cli, bundle, tmp_path, name, kind):
    info = tarfile.TarInfo(name)
    info.type = kind
    if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
        info.linkname = "/etc/passwd"
    elif kind == tarfile.REGTYPE:
        info.size = 1
    _repack(tmp_path / "evil.tar.gz", _members(bundle), extra=[info])
    code, _, err = cli("verify", tmp_path / "evil.tar.gz")
    assert code == 2 and "refusing" in err
    assert not (tmp_path.parent / "evil.sh").exists()


def test_another_targets_loader_refuses_the_bundle(cli, bundle):
    code, _, err = cli("selftest", bundle, "--target", "openvino-cpu")
    assert code == 2 and "bundled for target onnx" in err and "openvino-cpu" in err
