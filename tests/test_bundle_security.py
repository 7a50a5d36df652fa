"""Bundle hardening, as an attacker would probe it: only artefacts that passed parity and only files inside the
artefact folder are packed; archives are read strictly (one gzip stream, regular files only, no duplicates, no
trailing data); manifests, config.json and parity.json have one strict schema; signatures (Ed25519) prove who
made a bundle; the self-test tolerance comes from the code; unpack never clobbers."""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import stat
import tarfile

import numpy as np
import pytest
from _helpers import one_line_error, run_main

from edgeseg.export import export


@pytest.fixture(scope="module")
def artefact(tmp_path_factory, authors_ckpt, data_root):
    """An onnx fp32 artefact, its parity gate run on 4 real frames."""
    d = tmp_path_factory.mktemp("sec")
    ids = (data_root / "splits" / "pranet-test-cvc-clinicdb.txt").read_text().split()[:4]
    (d / "split.txt").write_text("\n".join(ids) + "\n")
    return export(authors_ckpt, "onnx", d / "onnx", parity_split=str(d / "split.txt"), data_root=data_root).path


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    assert run_main("keygen", "--out", d / "unit") == 0
    assert run_main("keygen", "--out", d / "other") == 0
    return d


@pytest.fixture(scope="module")
def unsigned(artefact, data_root, tmp_path_factory):
    path = tmp_path_factory.mktemp("b") / "unit.tar.gz"
    assert run_main("bundle", artefact, "--out", path, "--data-root", data_root) == 0
    return path


@pytest.fixture(scope="module")
def signed(artefact, data_root, keys, tmp_path_factory):
    path = tmp_path_factory.mktemp("b") / "signed.tar.gz"
    assert run_main("bundle", artefact, "--out", path, "--data-root", data_root, "--sign", keys / "unit") == 0
    return path


# --- archive helpers -------------------------------------------------------------------------------------------

def _members(path) -> dict[str, bytes]:
    with tarfile.open(path, "r:gz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def _tar(files, extra=(), fmt=tarfile.USTAR_FORMAT) -> bytes:
    """An uncompressed tar of ``files`` (a dict, or a list of (name, bytes) pairs) plus raw TarInfos."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:", format=fmt) as tar:
        for name, data in (files.items() if isinstance(files, dict) else files):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.size else None)
    return buf.getvalue()


def _write(path, files, extra=(), fmt=tarfile.USTAR_FORMAT):
    path.write_bytes(gzip.compress(_tar(files, extra, fmt)))
    return path


def _rehash(files: dict[str, bytes], edit=None, raw_manifest: bytes | None = None) -> dict[str, bytes]:
    """What an attacker without the key can do: edit files and the manifest, then recompute every sha256."""
    import hashlib

    files = dict(files)
    manifest = json.loads(files["manifest.json"])
    manifest["files"] = {n: hashlib.sha256(d).hexdigest() for n, d in files.items()
                         if n not in ("manifest.json", "manifest.sig")}
    if edit is not None:
        edit(manifest)
    files["manifest.json"] = raw_manifest if raw_manifest is not None else json.dumps(manifest).encode()
    return files


def _copy_artefact(artefact, tmp_path, name="art"):
    dest = tmp_path / name
    shutil.copytree(artefact, dest)
    return dest


def _edit_json(path, edit):
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


# --- bundle: parity gate and files inside the artefact folder -----------------------------------------------------

def test_rejected_artefact_is_refused(cli, artefact, data_root, tmp_path):
    art = _copy_artefact(artefact, tmp_path, "onnx.rejected")
    code, _, err = cli("bundle", art, "--out", tmp_path / "u.tar.gz", "--data-root", data_root)
    one_line_error(code, err, "rejected by its parity gate")
    assert not (tmp_path / "u.tar.gz").exists()


def test_parity_over_budget_is_refused(cli, artefact, data_root, tmp_path):
    art = _copy_artefact(artefact, tmp_path)
    _edit_json(art / "parity.json", lambda p: p.update(delta=p["budget"] + 0.01))
    code, _, err = cli("bundle", art, "--out", tmp_path / "u.tar.gz", "--data-root", data_root)
    one_line_error(code, err, "failed its parity gate")
    assert not (tmp_path / "u.tar.gz").exists()


def test_parity_over_image_budget_is_refused(cli, artefact, data_root, tmp_path):
    art = _copy_artefact(artefact, tmp_path)
    _edit_json(art / "parity.json", lambda p: p.update(worst_image_drop=p["image_budget"] + 0.01))
    code, _, err = cli("bundle", art, "--out", tmp_path / "u.tar.gz", "--data-root", data_root)
    one_line_error(code, err, "failed its parity gate", "worst_image_drop", "over image budget")
    assert not (tmp_path / "u.tar.gz").exists()


@pytest.mark.parametrize("case, edit, needle", [
    ("not json", "{oops", "not valid JSON"),
    ("image budget negative", lambda p: p.update(image_budget=-1), "'image_budget' must be a number >= 0"),
    ("a list", [], "not a JSON object"),
    ("delta a string", lambda p: p.update(delta="0.0"), "'delta' must be a number"),
    ("delta NaN", lambda p: p.update(delta=float("nan")), "not valid JSON"),
    ("no budget", lambda p: p.pop("budget"), "has no 'budget'"),
    ("ids not a list", lambda p: p.update(ids="cvc-clinicdb/100"), "'ids' must be"),
    ("ids of numbers", lambda p: p.update(ids=[1, 2]), "'ids' must be"),
    ("another precision", lambda p: p.update(precision="int8"), "records precision 'int8'"),
])
def test_bad_parity_json_is_one_line(cli, artefact, data_root, tmp_path, case, edit, needle):
    art = _copy_artefact(artefact, tmp_path)
    if callable(edit):
        _edit_json(art / "parity.json", edit)
    else:
        (art / "parity.json").write_text(edit if isinstance(edit, str) else json.dumps(edit))
    code, _, err = cli("bundle", art, "--out", tmp_path / "u.tar.gz", "--data-root", data_root)
    one_line_error(code, err, needle)


@pytest.mark.parametrize("case, edit, needle", [
    ("model_files a string", lambda c: c.update(model_files="model.onnx"), "'model_files' is missing or not a list"),
    ("model_files numbers", lambda c: c.update(model_files=[1]), "'model_files' must list file names"),
    ("no target", lambda c: c.pop("target"), "'target' is missing"),
    ("bad contract", lambda c: c.update(input_contract="x"), "'input_contract' is missing or not a JSON object"),
    ("contract mean not numbers", lambda c: c["input_contract"].update(mean="abc"),
     "'input_contract' is not a valid input contract"),
    ("artefact outside model_files", lambda c: c.update(artefact="other.onnx"), "not in model_files"),
])
def test_bad_config_json_is_one_line(cli, artefact, data_root, tmp_path, case, edit, needle):
    art = _copy_artefact(artefact, tmp_path)
    _edit_json(art / "config.json", edit)
    code, _, err = cli("bundle", art, "--out", tmp_path / "u.tar.gz", "--data-root", data_root)
    one_line_error(code, err, needle)


@pytest.mark.parametrize("name", ["/etc/hostname", "../outside.txt", "sub/../../outside.txt", "config.json"])
def test_only_files_inside_the_artefact_are_packed(cli, artefact, data_root, tmp_path, name):
    art = _copy_artefact(artefact, tmp_path)
    (tmp_path / "outside.txt").write_text("secret")
    (art / "sub").mkdir()
    _edit_json(art / "config.json", lambda c: c["model_files"].append(name))
    code, _, err = cli("bundle", art, "--out", tmp_path / "u.tar.gz", "--data-root", data_root)
    one_line_error(code, err)
    assert not (tmp_path / "u.tar.gz").exists()


def test_symlinked_model_file_is_refused(cli, artefact, data_root, tmp_path):
    art = _copy_artefact(artefact, tmp_path)
    (tmp_path / "elsewhere.onnx").write_bytes((art / "model.onnx").read_bytes())
    (art / "model.onnx").unlink()
    (art / "model.onnx").symlink_to(tmp_path / "elsewhere.onnx")
    code, _, err = cli("bundle", art, "--out", tmp_path / "u.tar.gz", "--data-root", data_root)
    one_line_error(code, err, "symbolic link")


def test_bad_out_is_one_line(cli, artefact, data_root, tmp_path):
    (tmp_path / "folder").mkdir()
    code, _, err = cli("bundle", artefact, "--out", tmp_path / "folder", "--data-root", data_root)
    one_line_error(code, err, "is a folder")
    (tmp_path / "file").write_text("x")
    code, _, err = cli("bundle", artefact, "--out", tmp_path / "file" / "u.tar.gz", "--data-root", data_root)
    one_line_error(code, err, "cannot write the output file", "is a file, not a folder")
    assert (tmp_path / "file").read_text() == "x" and list((tmp_path / "folder").iterdir()) == []
    art = _copy_artefact(artefact, tmp_path)
    code, _, err = cli("bundle", art, "--out", art / "model.onnx", "--data-root", data_root)
    one_line_error(code, err, "inside the artefact folder")
    assert (art / "model.onnx").read_bytes() == (artefact / "model.onnx").read_bytes()


# --- verify: strict archive reading ------------------------------------------------------------------------------

def _verify(cli, path, *args):
    return cli("verify", path, *args)


def test_duplicate_member_is_refused(cli, unsigned, tmp_path):
    files = _members(unsigned)
    pairs = [("model.onnx", b"evil model"), *files.items()]  # a naive reader keeps the last copy
    code, _, err = _verify(cli, _write(tmp_path / "dup.tar.gz", pairs))
    one_line_error(code, err, "appears twice")


@pytest.mark.parametrize("tail, needle", [
    (b"\0" * 1024, "trailing data"),
    (b"garbage", "trailing data"),
    (gzip.compress(b"more"), "second gzip stream"),
])
def test_trailing_data_and_second_gzip_stream_are_refused(cli, unsigned, tmp_path, tail, needle):
    path = tmp_path / "tail.tar.gz"
    path.write_bytes(unsigned.read_bytes() + tail)
    code, _, err = _verify(cli, path)
    one_line_error(code, err, needle)


def test_second_tar_after_the_end_of_archive_is_refused(cli, unsigned, tmp_path):
    files = _members(unsigned)
    raw = _tar(files) + _tar({"hidden.sh": b"#!/bin/sh\nrm -rf /\n"})
    path = tmp_path / "hidden.tar.gz"
    path.write_bytes(gzip.compress(raw))
    code, _, err = _verify(cli, path)
    one_line_error(code, err, "data after its last member")


@pytest.mark.parametrize("kind", [tarfile.DIRTYPE, tarfile.CONTTYPE])
def test_member_types_other_than_regular_files_are_refused(cli, unsigned, tmp_path, kind):
    """Folder entries (the format needs none) and 'contiguous' files, which tarfile reads as regular files;
    links and devices are covered in test_bundle.py."""
    files = _members(unsigned)
    info = tarfile.TarInfo("golden/extra" if kind == tarfile.CONTTYPE else "golden")
    info.type = kind
    if kind == tarfile.CONTTYPE:
        info.size = 1
        files = _rehash({**files, "golden/extra": b"x"})
        del files["golden/extra"]
    code, _, err = _verify(cli, _write(tmp_path / "t.tar.gz", files, extra=[info]))
    one_line_error(code, err, "not a regular file")


def test_pax_extension_headers_are_refused(cli, unsigned, tmp_path):
    """A name (or size) carried by an extension header is read differently by different tar readers."""
    files = _members(unsigned)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            if name == "model.onnx":
                info.name, info.pax_headers = "decoy.onnx", {"path": "model.onnx"}
            tar.addfile(info, io.BytesIO(data))
    path = tmp_path / "pax.tar.gz"
    path.write_bytes(gzip.compress(buf.getvalue()))
    code, _, err = _verify(cli, path)
    one_line_error(code, err, "extension headers")


@pytest.mark.parametrize("name", [".hidden", "a\\b", "golden/ x.png", "golden", "MODEL.ONNX", "sub/./x"])
def test_odd_or_clashing_names_are_refused(cli, unsigned, tmp_path, name):
    """Listed in a re-hashed manifest, so only the name policy can refuse them."""
    files = _rehash({**_members(unsigned), name: b"x"})
    code, _, err = _verify(cli, _write(tmp_path / "n.tar.gz", files))
    one_line_error(code, err)
    assert "refusing" in err or "must be" in err


# --- verify: one strict manifest schema ---------------------------------------------------------------------------

@pytest.mark.parametrize("case, edit, needle", [
    ("files value a number", lambda m: m["files"].update({"model.onnx": 123}), "'files' must be"),
    ("files value a list", lambda m: m["files"].update({"model.onnx": ["ab"]}), "'files' must be"),
    ("files a list", lambda m: m.update(files=list(m["files"])), "'files' must be"),
    ("no golden", lambda m: m.pop("golden"), "has no 'golden'"),
    ("tolerance a string", lambda m: m["golden"].update(tolerance="loose"), "'tolerance' must be"),
    ("tolerance of three", lambda m: m["golden"].update(tolerance=[1e-3, 0.9, 1]), "'tolerance' must be"),
    ("tolerance negative", lambda m: m["golden"].update(tolerance=[-1, 0.9]), "'tolerance' must be"),
    ("agreement over 1", lambda m: m["golden"].update(tolerance=[1e-3, 2]), "'tolerance' must be"),
    ("target a number", lambda m: m.update(target=5), "'target' must be"),
    ("unknown precision", lambda m: m.update(precision="fp64"), "'precision' must be"),
    ("unknown key", lambda m: m.update(extra=1), "unknown key 'extra'"),
    ("golden output not a file", lambda m: m["golden"].update(output="nope.npy"), "is not among its files"),
    ("format version 2", lambda m: m.update(format_version=2), "'format_version' must be"),
    ("precision disagrees with config.json", lambda m: m.update(precision="int8"), "inconsistent bundle"),
])
def test_bad_manifest_schema_is_one_line(cli, unsigned, tmp_path, case, edit, needle):
    files = _rehash(_members(unsigned), edit)
    code, _, err = _verify(cli, _write(tmp_path / "m.tar.gz", files))
    one_line_error(code, err, needle)


@pytest.mark.parametrize("raw, needle", [
    (b'{"format": "\x80"}', "not valid JSON"),
    (b"[" * 100000 + b"]" * 100000, "not valid JSON"),
    ("duplicate", "duplicate keys"),
    (b"[]", "not an edgeseg bundle manifest"),
])
def test_malformed_manifest_json_is_one_line(cli, unsigned, tmp_path, raw, needle):
    if raw == "duplicate":  # a reader keeping the last 'precision' sees int8 (mask-only self-test)
        good = _rehash(_members(unsigned))["manifest.json"]
        raw = good.replace(b'"precision": "fp32"', b'"precision": "fp32", "precision": "int8"')
        assert raw != good
    files = _rehash(_members(unsigned), raw_manifest=raw)
    code, _, err = _verify(cli, _write(tmp_path / "j.tar.gz", files))
    one_line_error(code, err, needle)


def test_config_in_bundle_may_not_point_outside(cli, unsigned, tmp_path):
    files = _members(unsigned)
    config = json.loads(files["config.json"])
    config["artefact"] = "../../model.onnx"
    files = _rehash({**files, "config.json": json.dumps(config).encode()},
                    lambda m: m.update(artefact="../../model.onnx"))
    code, _, err = _verify(cli, _write(tmp_path / "c.tar.gz", files))
    one_line_error(code, err, "'artefact' must be a file name")


def test_failed_parity_record_in_bundle_is_refused(cli, unsigned, tmp_path):
    files = _members(unsigned)
    parity = json.loads(files["parity.json"])
    parity["delta"] = parity["budget"] + 0.5
    files = _rehash({**files, "parity.json": json.dumps(parity).encode()})
    code, _, err = _verify(cli, _write(tmp_path / "p.tar.gz", files))
    one_line_error(code, err, "failed its parity gate")


# --- selftest: the tolerance comes from the code -----------------------------------------------------------------

def test_loosened_tolerance_cannot_hide_a_changed_output(cli, unsigned, tmp_path):
    files = _members(unsigned)
    want = np.load(io.BytesIO(files["golden/logits.npy"]))
    buf = io.BytesIO()
    np.save(buf, -want)  # every mask pixel flipped: a different model's answer
    files = _rehash({**files, "golden/logits.npy": buf.getvalue()},
                    lambda m: m["golden"].update(tolerance=[1e9, 0]))
    path = _write(tmp_path / "loose.tar.gz", files)
    code, out, _ = cli("selftest", path)
    assert code == 1 and out.startswith("FAIL onnx fp32") and "'max_abs': 0.001" in out
    code, out, _ = cli("verify", path)
    assert code == 0 and "unsigned: integrity only" in out  # integrity holds: anyone can re-hash


def test_manifest_tolerance_only_tightens():
    from edgeseg.bundle import effective_tolerance
    from edgeseg.tolerances import SELFTEST

    fp32 = SELFTEST["fp32"]
    assert effective_tolerance("fp32", [1e9, 0]) == (fp32.max_abs_logit_diff, fp32.min_mask_agreement)
    assert effective_tolerance("fp32", [1e-6, 1.0]) == (1e-6, 1.0)
    assert effective_tolerance("int8", [None, 0.0]) == (None, SELFTEST["int8"].min_mask_agreement)
    assert effective_tolerance("int8", [0.5, 0.999]) == (0.5, 0.999)


# --- signatures --------------------------------------------------------------------------------------------------

def test_keygen_writes_a_private_0600_pem_and_never_overwrites(cli, keys):
    private, public = keys / "unit", keys / "unit.pub"
    assert private.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert public.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    before = private.read_bytes(), public.read_bytes()
    code, _, err = cli("keygen", "--out", private)
    one_line_error(code, err, "refusing to overwrite")
    assert (private.read_bytes(), public.read_bytes()) == before
    assert not [p for p in keys.iterdir() if p.name.startswith(".")]


def test_signed_bundle_verifies_with_its_key(cli, signed, unsigned, keys):
    assert "manifest.sig" in _members(signed)
    code, out, _ = cli("verify", signed, "--pubkey", keys / "unit.pub")
    assert code == 0 and "verified 5 files" in out and "signature ok" in out
    code, out, _ = cli("verify", signed)
    assert code == 0 and "signature not checked" in out
    code, out, _ = cli("verify", unsigned)
    assert code == 0 and "unsigned: integrity only" in out
    code, out, _ = cli("selftest", signed, "--target", "onnx", "--pubkey", keys / "unit.pub")
    assert code == 0 and out.startswith("PASS onnx fp32") and "signature ok" in out


def test_unsigned_bundle_is_refused_when_a_key_is_given(cli, unsigned, signed, keys, tmp_path):
    code, _, err = cli("verify", unsigned, "--pubkey", keys / "unit.pub")
    one_line_error(code, err, "unsigned")
    stripped = {n: d for n, d in _members(signed).items() if n != "manifest.sig"}
    code, _, err = cli("selftest", _write(tmp_path / "s.tar.gz", stripped), "--pubkey", keys / "unit.pub")
    one_line_error(code, err, "unsigned")


def test_changed_model_with_rehashed_manifest_is_refused_with_a_key(cli, signed, keys, tmp_path):
    files = _members(signed)
    model = bytearray(files["model.onnx"])
    model[len(model) // 2] ^= 1
    path = _write(tmp_path / "evil.tar.gz", _rehash({**files, "model.onnx": bytes(model)}))
    for command in ("verify", "selftest", "unpack"):
        extra = [tmp_path / "out"] if command == "unpack" else []
        code, _, err = cli(command, path, *extra, "--pubkey", keys / "unit.pub")
        one_line_error(code, err, "signature does not match")
    assert not (tmp_path / "out").exists()


def test_bundle_signed_by_another_key_is_refused(cli, artefact, data_root, keys, tmp_path):
    path = tmp_path / "other.tar.gz"
    code, _, err = cli("bundle", artefact, "--out", path, "--data-root", data_root, "--sign", keys / "other")
    assert code == 0, err
    code, _, err = cli("verify", path, "--pubkey", keys / "unit.pub")
    one_line_error(code, err, "signed by another key")


@pytest.mark.parametrize("sig, needle", [
    (b"not json", "not valid JSON"),
    (b'{"format": "edgeseg-bundle-signature"}', "has no"),
])
def test_malformed_signature_is_one_line(cli, signed, keys, tmp_path, sig, needle):
    files = {**_members(signed), "manifest.sig": sig}
    code, _, err = cli("verify", _write(tmp_path / "s.tar.gz", files), "--pubkey", keys / "unit.pub")
    one_line_error(code, err, needle)


def test_wrong_key_files_are_one_line(cli, artefact, signed, keys, tmp_path):
    code, _, err = cli("verify", signed, "--pubkey", keys / "unit")
    one_line_error(code, err, "private key")
    code, _, err = cli("bundle", artefact, "--out", tmp_path / "u.tar.gz", "--sign", keys / "unit.pub")
    one_line_error(code, err, "public key")
    code, _, err = cli("verify", signed, "--pubkey", tmp_path / "missing.pub")
    one_line_error(code, err, "missing.pub")
    (tmp_path / "junk.pub").write_text("junk")
    code, _, err = cli("verify", signed, "--pubkey", tmp_path / "junk.pub")
    one_line_error(code, err, "not a PEM public key")


# --- unpack ------------------------------------------------------------------------------------------------------

def test_unpack_writes_only_the_manifests_files(cli, signed, keys, tmp_path):
    dest = tmp_path / "unit"
    code, out, err = cli("unpack", signed, dest, "--pubkey", keys / "unit.pub")
    assert code == 0, err
    written = {str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()}
    members = _members(signed)
    assert written == set(members)
    assert all((dest / n).read_bytes() == d for n, d in members.items())
    assert [p.name for p in tmp_path.iterdir()] == ["unit"]  # no temp folder left behind
    (tmp_path / "empty").mkdir()
    code, _, err = cli("unpack", signed, tmp_path / "empty")
    assert code == 0, err


def test_unpack_never_clobbers(cli, unsigned, tmp_path):
    dest = tmp_path / "busy"
    dest.mkdir()
    (dest / "config.json").write_text("mine")
    code, _, err = cli("unpack", unsigned, dest)
    one_line_error(code, err, "not an empty folder")
    assert [p.name for p in dest.iterdir()] == ["config.json"] and (dest / "config.json").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    code, _, err = cli("unpack", unsigned, tmp_path / "file")
    one_line_error(code, err, "not an empty folder")


def test_unpack_of_a_bad_bundle_writes_nothing(cli, unsigned, tmp_path):
    files = _members(unsigned)
    path = _write(tmp_path / "bad.tar.gz", {**files, "model.onnx": b"changed"})
    code, _, err = cli("unpack", path, tmp_path / "out")
    one_line_error(code, err, "does not match its sha256")
    assert os.listdir(tmp_path) == ["bad.tar.gz"]
