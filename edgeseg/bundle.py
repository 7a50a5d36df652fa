"""Verified, optionally signed bundles for embedded units: pack, verify offline, unpack, self-test. No torch.

    edgeseg keygen --out keys/unit-signing             # keys/unit-signing (private, 0600) + keys/unit-signing.pub
    edgeseg bundle ART/ --out unit.tar.gz --sign keys/unit-signing
    edgeseg verify unit.tar.gz --pubkey keys/unit-signing.pub
    edgeseg unpack unit.tar.gz DIR --pubkey keys/unit-signing.pub   # verify, then write only the manifest's files
    edgeseg selftest unit.tar.gz --target openvino-cpu --pubkey keys/unit-signing.pub

Format. A bundle is one gzip stream holding one tar archive of regular files only (no folders, links, devices,
pax/GNU extension headers, duplicate names or data after the end-of-archive blocks):

* ``manifest.json``: the target, precision, model, runtime versions, calibration hash, checkpoint hash, edgeseg
  version, the golden input/output, and ``files``: the sha256 of every other member;
* the files it lists: the artefact's ``model_files``, ``config.json``, ``parity.json``, ``golden/input.png``
  (one frame at network size) and ``golden/logits.npy`` (its logits computed by the artefact's own runtime);
* ``manifest.sig`` (signed bundles only): an Ed25519 signature of ``SIGNATURE_CONTEXT + manifest.json bytes``.
  As the manifest hashes every file, the signature covers the whole bundle.

Reading is strict, and every check runs before any file is used: the gzip stream is decompressed fully (its CRC
checked, a second stream or trailing bytes refused), the tar layout is walked block by block, member names must
be plain relative paths (letters, digits, ``._+-``, no ``..``, no hidden names, no two names equal but for case),
JSON is parsed without duplicate keys or NaN, and the manifest, config.json and parity.json are checked against
strict schemas and against each other. Without ``--pubkey`` a bundle is checked for integrity only (anyone can
re-hash a manifest); with it, an unsigned or wrongly signed bundle is refused.

Keys are PEM files: the private key PKCS#8 (unencrypted, written 0600), the public key SubjectPublicKeyInfo;
``keygen`` never overwrites a key. The self-test tolerance is :data:`edgeseg.tolerances.SELFTEST` of the bundle's
precision; the manifest's tolerance can only tighten it.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import shutil
import stat
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import cv2
import numpy as np
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgeseg import __version__
from edgeseg.errors import EdgesegError
from edgeseg.export.parity import failure, passed
from edgeseg.fileio import atomic_path, check_output, current_umask, default_file_mode, make_folder, write_atomic
from edgeseg.tolerances import SELFTEST, OutputCheck

MANIFEST, SIGNATURE = "manifest.json", "manifest.sig"
BUNDLE_FORMAT, BUNDLE_FORMAT_VERSION = "edgeseg-bundle", 1
SIGNATURE_FORMAT = "edgeseg-bundle-signature"
SIGNATURE_CONTEXT = b"edgeseg-bundle-signature-v1\0"  # signed: this prefix + the manifest bytes
GOLDEN_INPUT, GOLDEN_OUTPUT = "golden/input.png", "golden/logits.npy"
RESERVED = (MANIFEST, SIGNATURE, "config.json", "parity.json", GOLDEN_INPUT, GOLDEN_OUTPUT)
MAX_BYTES = 1 << 30      # largest bundle, compressed or not: refuses decompression bombs
MAX_MEMBERS = 1000
_BLOCK = 512
_NAME_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- keys ---------------------------------------------------------------------------------------------------

def public_key_path(key: str | os.PathLike) -> Path:
    """Where ``keygen --out KEY`` puts the public key: ``KEY.pub``."""
    return Path(f"{key}.pub")


def key_fingerprint(public_key: Ed25519PublicKey) -> str:
    """sha256 of the raw 32-byte public key: how messages name a key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return _sha256(raw)


def generate_key(out: str | os.PathLike) -> tuple[Path, Path, str]:
    """Write a new Ed25519 key pair: ``out`` (PKCS#8 PEM, mode 0600) and ``out.pub`` (PEM). Refuses to
    overwrite either file. Returns (private path, public path, fingerprint)."""
    private, public = Path(out), public_key_path(out)
    if private.name.endswith(".pub"):
        raise EdgesegError(f"--out {private} names the private key; drop the .pub (the public key goes to KEY.pub)")
    for p in (private, public):
        if os.path.lexists(p):
            raise EdgesegError(f"{p} exists; refusing to overwrite a key (choose another --out)")
    make_folder(private.parent, f"the folder of {private}")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    write_atomic(private, pem, mode=0o600, overwrite=False)
    try:
        write_atomic(public, pub, overwrite=False)
    except EdgesegError:
        private.unlink()
        raise
    return private, public, key_fingerprint(key.public_key())


def load_private_key(path: str | os.PathLike) -> Ed25519PrivateKey:
    """The Ed25519 private key in PEM file ``path`` (as ``keygen`` writes it)."""
    data = _read_key_file(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise EdgesegError(f"{path} is an encrypted private key; edgeseg signs with unencrypted keys "
                           "(`edgeseg keygen`), kept 0600 on the signing host") from None
    except (ValueError, UnsupportedAlgorithm):
        hint = " (that is a public key; --sign takes the private key)" if b"PUBLIC KEY-----" in data else ""
        raise EdgesegError(f"{path} is not a PEM private key{hint}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise EdgesegError(f"{path} is not an Ed25519 key; make one with `edgeseg keygen`")
    return key


def load_public_key(path: str | os.PathLike) -> Ed25519PublicKey:
    """The Ed25519 public key in PEM file ``path`` (``KEY.pub`` from ``keygen``)."""
    data = _read_key_file(path)
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        hint = " (that is a private key; pass KEY.pub)" if b"PRIVATE KEY-----" in data else ""
        raise EdgesegError(f"{path} is not a PEM public key{hint}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise EdgesegError(f"{path} is not an Ed25519 public key; make a key pair with `edgeseg keygen`")
    return key


def _read_key_file(path: str | os.PathLike) -> bytes:
    path = Path(path)
    try:
        if not path.is_file() or path.stat().st_size > 64 * 1024:
            raise EdgesegError(f"key {path} is not a key file")
        return path.read_bytes()
    except OSError as e:
        raise EdgesegError(f"cannot read key {path}: {e.strerror or e}") from None


# --- strict JSON and schemas ------------------------------------------------------------------------------------

def _loads(data: bytes, what: str):
    """JSON without duplicate keys, NaN or Infinity; any defect is an EdgesegError naming ``what``."""
    def no_duplicates(pairs):
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            raise ValueError("duplicate key")
        return dict(pairs)

    def no_constant(name):
        raise ValueError(name)

    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=no_duplicates, parse_constant=no_constant)
    except (ValueError, RecursionError):
        raise EdgesegError(f"{what} is not valid JSON (or has duplicate keys, NaN or Infinity)") from None


def _is_str(v) -> bool:
    return isinstance(v, str) and 0 < len(v) <= 4096


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_sha256(v) -> bool:
    return isinstance(v, str) and _SHA256.fullmatch(v) is not None


def _is_tolerance(v) -> bool:
    return (isinstance(v, list) and len(v) == 2 and (v[0] is None or (_is_num(v[0]) and v[0] >= 0))
            and _is_num(v[1]) and 0 <= v[1] <= 1)


def _is_versions(v) -> bool:
    return isinstance(v, dict) and all(_is_str(k) and (v_ is None or isinstance(v_, str)) for k, v_ in v.items())


def _is_names(v) -> bool:
    return (isinstance(v, list) and 0 < len(v) <= MAX_MEMBERS and len(set(v)) == len(v)
            and all(_is_name(n) for n in v))


def _is_name(name) -> bool:
    """A member name: a plain relative POSIX path of at most 100 characters (one ustar name field) and 8 parts,
    each ``[A-Za-z0-9_][A-Za-z0-9._+-]*`` (so no ``..``, ``.``, hidden names, empty parts, backslashes or
    absolute paths)."""
    return (isinstance(name, str) and len(name) <= 100 and name.count("/") < 8
            and all(_NAME_PART.fullmatch(part) for part in name.split("/")))


_MANIFEST_SCHEMA = {
    "format": (lambda v: v == BUNDLE_FORMAT, f"the string {BUNDLE_FORMAT!r}"),
    "format_version": (lambda v: type(v) is int and v == BUNDLE_FORMAT_VERSION, f"{BUNDLE_FORMAT_VERSION}"),
    "target": (_is_str, "a target id"),
    "precision": (lambda v: v in SELFTEST, " | ".join(SELFTEST)),
    "model": (_is_str, "a model name"),
    "artefact": (_is_name, "a file name"),
    "runtime_versions": (_is_versions, "an object of package -> version"),
    "calibration": (lambda v: v is None or isinstance(v, dict), "null or an object"),
    "checkpoint_sha256": (_is_sha256, "a sha256 hex digest"),
    "edgeseg_version": (_is_str, "a version string"),
    "golden": (lambda v: isinstance(v, dict), "an object"),
    "files": (lambda v: isinstance(v, dict) and 0 < len(v) <= MAX_MEMBERS
              and all(_is_name(k) and _is_sha256(h) for k, h in v.items()),
              "an object of file name -> sha256 hex digest"),
}
_GOLDEN_SCHEMA = {
    "input": (_is_name, "a file name"),
    "output": (_is_name, "a file name"),
    "tolerance": (_is_tolerance, "[max |logit diff| (a number >= 0 or null), min mask agreement (0..1)]"),
}
_PARITY_SCHEMA = {  # the keys the gate decision needs; parity.json has more
    "delta": (_is_num, "a number"),
    "budget": (lambda v: _is_num(v) and v >= 0, "a number >= 0"),
    "precision": (lambda v: v in SELFTEST, " | ".join(SELFTEST)),
    "target": (_is_str, "a target id"),
    "ids": (lambda v: isinstance(v, list) and all(_is_str(i) for i in v), "a list of frame ids"),
    "worst_image_drop": (_is_num, "a number"),
}
_PARITY_OPTIONAL = {"image_budget": (lambda v: _is_num(v) and v >= 0, "a number >= 0")}


def _check_schema(doc, schema: dict, what: str, optional: dict | None = None, exact: bool = False) -> dict:
    if not isinstance(doc, dict):
        raise EdgesegError(f"{what} is not a JSON object")
    for key, (ok, desc) in schema.items():
        if key not in doc:
            raise EdgesegError(f"{what} has no {key!r}")
        if not ok(doc[key]):
            raise EdgesegError(f"{what}: {key!r} must be {desc}")
    for key, (ok, desc) in (optional or {}).items():
        if key in doc and not ok(doc[key]):
            raise EdgesegError(f"{what}: {key!r} must be {desc}")
    extra = sorted(set(doc) - set(schema) - set(optional or {}))
    if exact and extra:
        raise EdgesegError(f"{what} has an unknown key {extra[0]!r}")
    return doc


def check_config(config, what: str) -> dict:
    """config.json of an artefact to bundle: the artefact schema (:func:`edgeseg.export.check_config`), plus
    what a bundle needs of it: model files with bundle member names, none of them a bundle's own file."""
    from edgeseg.export import check_config as check_artefact_config

    check_artefact_config(config, what)
    if not _is_names(config["model_files"]):
        raise EdgesegError(f"{what}: 'model_files' must be a list of distinct plain file names")
    if not _is_sha256(config["checkpoint"]["sha256"]):
        raise EdgesegError(f"{what}: 'checkpoint.sha256' is not a sha256 hex digest")
    reserved = sorted(set(config["model_files"]) & set(RESERVED))
    if reserved:
        raise EdgesegError(f"{what}: model_files may not name {reserved[0]!r} (a bundle's own file)")
    return config


def check_parity(parity, config: dict, what: str) -> dict:
    """parity.json of an artefact that passed its gate (its own target and precision, delta within budget)."""
    _check_schema(parity, _PARITY_SCHEMA, what, _PARITY_OPTIONAL)
    for key in ("target", "precision"):
        if parity[key] != config[key]:
            raise EdgesegError(f"{what} records {key} {parity[key]!r}, but config.json says {config[key]!r}")
    if not passed(parity):
        raise EdgesegError(f"{what}: the artefact failed its parity gate ({failure(parity)}); only artefacts that "
                           "passed are bundled")
    return parity


def check_manifest(manifest, what: str) -> dict:
    """The one schema of a bundle manifest: exact keys, types, file names and cross-references."""
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise EdgesegError(f"{what} is not an edgeseg bundle manifest")
    _check_schema(manifest, _MANIFEST_SCHEMA, what, exact=True)
    _check_schema(manifest["golden"], _GOLDEN_SCHEMA, f"{what}: golden", exact=True)
    files = manifest["files"]
    _check_names(files, what)
    for name in (MANIFEST, SIGNATURE):
        if name in files:
            raise EdgesegError(f"{what}: files may not list {name}")
    needed = {"config.json": "config.json", "parity.json": "parity.json", "artefact": manifest["artefact"],
              "golden input": manifest["golden"]["input"], "golden output": manifest["golden"]["output"]}
    for role, name in needed.items():
        if name not in files:
            raise EdgesegError(f"{what}: the {role} {name!r} is not among its files")
    return manifest


def _check_names(names, what: str) -> None:
    """Names that can all be written into one folder: none equal but for case, none a folder of another."""
    folded = {n.casefold() for n in names}
    if len(folded) != len(names):
        raise EdgesegError(f"{what}: two file names differ only in case; refusing")
    for n in folded:
        parents = PurePosixPath(n).parents
        clash = next((str(p) for p in parents if str(p) in folded), None)
        if clash:
            raise EdgesegError(f"{what}: {clash!r} is both a file and a folder; refusing")


# --- packing ------------------------------------------------------------------------------------------------

def read_artefact(artefact: str | os.PathLike) -> tuple[dict, dict]:
    """config.json and parity.json of an artefact folder that may be bundled: it passed its parity gate (not
    ``*.rejected``, delta within budget) and both files have the expected schema."""
    config, parity, _ = _load_artefact(Path(artefact))
    return config, parity


def _load_artefact(folder: Path) -> tuple[dict, dict, dict[str, bytes]]:
    """(config, parity, the bytes of every file to pack), each file read once, so what is checked is what is
    packed."""
    if folder.name.endswith(".rejected"):
        raise EdgesegError(f"{folder} was rejected by its parity gate; only artefacts that passed are bundled")
    if not folder.is_dir():
        raise EdgesegError(f"{folder} is not an artefact folder")
    raw = {"config.json": _read_inside(folder, "config.json")}
    config = check_config(_loads(raw["config.json"], f"{folder}/config.json"), f"{folder}/config.json")
    if not os.path.lexists(folder / "parity.json"):
        raise EdgesegError(f"{folder} has no parity.json; only artefacts that passed their parity gate are bundled")
    raw["parity.json"] = _read_inside(folder, "parity.json")
    parity = check_parity(_loads(raw["parity.json"], f"{folder}/parity.json"), config, f"{folder}/parity.json")
    raw.update({name: _read_inside(folder, name) for name in config["model_files"]})
    return config, parity, raw


def _read_inside(folder: Path, name: str) -> bytes:
    """The bytes of the regular file ``folder/name``: refuses names that leave the folder, symlinks (at any
    level) and anything but a regular file."""
    if not _is_name(name):
        raise EdgesegError(f"{folder}: {name!r} is not a plain file name inside the artefact folder; refusing")
    path = folder / name
    try:
        for p in [*reversed(PurePosixPath(name).parents[:-1]), PurePosixPath(name)]:
            mode = os.lstat(folder / p).st_mode
            if stat.S_ISLNK(mode):
                raise EdgesegError(f"{folder}: {p} is a symbolic link; only regular files inside the artefact "
                                   "folder are bundled")
        if not stat.S_ISREG(mode):
            raise EdgesegError(f"{folder}: {name} is not a regular file")
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise EdgesegError(f"{folder}: {name} is missing") from None
    except OSError as e:
        raise EdgesegError(f"cannot read {path}: {e.strerror or e}") from None


def check_out(out: str | os.PathLike) -> Path:
    """A bundle path that can be written (not a folder or special file, its folder writable). Checked before
    any work; creates nothing."""
    out = check_output(out, "file")
    if os.path.lexists(out) and not out.is_file():
        raise EdgesegError(f"--out {out} exists and is not a regular file; refusing to replace it")
    return out


def make_bundle(artefact: str | os.PathLike, out: str | os.PathLike, golden_rgb: np.ndarray,
                key: Ed25519PrivateKey | None = None) -> Path:
    """Pack an exported artefact folder with a golden frame and its expected output into ``out``.

    Args:
        artefact: the folder written by ``edgeseg export`` (it must have passed its parity gate).
        out: the ``.tar.gz`` to write (atomically).
        golden_rgb: one RGB uint8 frame (any size); it is stored at network size, and its logits are computed
            here with the artefact's own runtime.
        key: sign the manifest with this Ed25519 key (a ``manifest.sig`` member); None: unsigned.
    """
    from edgeseg.contract import InputContract, resize_image
    from edgeseg.export import load_runner

    folder = Path(artefact)
    out = check_out(out)
    config, _, files = _load_artefact(folder)
    if folder.resolve() in out.resolve().parents:
        raise EdgesegError(f"--out {out} is inside the artefact folder {folder}; write the bundle elsewhere")
    contract = InputContract.from_dict(config["input_contract"])
    rgb = resize_image(golden_rgb, contract.size)
    logits = load_runner(folder)(contract.preprocess(rgb)).astype(np.float32)
    ok, png = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise EdgesegError("cannot encode the golden frame as PNG")
    files[GOLDEN_INPUT] = png.tobytes()
    buf = io.BytesIO()
    np.save(buf, logits, allow_pickle=False)
    files[GOLDEN_OUTPUT] = buf.getvalue()
    manifest = {
        "format": BUNDLE_FORMAT, "format_version": BUNDLE_FORMAT_VERSION,
        "target": config["target"], "precision": config["precision"], "model": config["model"],
        "artefact": config["artefact"], "runtime_versions": config.get("runtime_versions", {}),
        "calibration": config.get("calibration"), "checkpoint_sha256": config["checkpoint"]["sha256"],
        "edgeseg_version": __version__, "golden": {"input": GOLDEN_INPUT, "output": GOLDEN_OUTPUT,
                                                   "tolerance": _tolerance(SELFTEST[config["precision"]])},
        "files": {name: _sha256(data) for name, data in sorted(files.items())},
    }
    check_manifest(manifest, f"the manifest for {folder}")
    files[MANIFEST] = json.dumps(manifest, indent=2).encode()
    if key is not None:
        files[SIGNATURE] = _signature(key, files[MANIFEST])
    return _write_tar(out, files)


def _signature(key: Ed25519PrivateKey, manifest_bytes: bytes) -> bytes:
    import base64

    sig = key.sign(SIGNATURE_CONTEXT + manifest_bytes)
    return json.dumps({"format": SIGNATURE_FORMAT, "format_version": 1, "algorithm": "ed25519",
                       "public_key_sha256": key_fingerprint(key.public_key()),
                       "signature": base64.b64encode(sig).decode()}, indent=2).encode()


def _write_tar(out: Path, files: dict[str, bytes]) -> Path:
    with atomic_path(out) as tmp:
        with tarfile.open(tmp, mode="w:gz", format=tarfile.USTAR_FORMAT) as tar:
            for name, data in sorted(files.items()):
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = len(data), 0o644, 0
                tar.addfile(info, io.BytesIO(data))
    return out


# --- reading ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Bundle:
    """A fully verified bundle, in memory."""
    path: Path
    manifest: dict
    manifest_bytes: bytes
    files: dict[str, bytes]       # exactly the manifest's files, each matching its sha256
    signature: bytes | None       # the manifest.sig member, if any
    authenticity: str             # one line for the operator: signature checked, not checked, or unsigned

    @property
    def manifest_sha256(self) -> str:
        return _sha256(self.manifest_bytes)


def read_bundle(path: str | os.PathLike, pubkey: Ed25519PublicKey | None = None) -> Bundle:
    """Read and fully verify a bundle in memory.

    With ``pubkey``, the bundle must carry a valid signature by that key; without, an unsigned bundle is checked
    for integrity only. Raises EdgesegError on anything but a well-formed, consistent, unmodified bundle.
    """
    path = Path(path)
    members = _read_members(path)
    if MANIFEST not in members:
        raise EdgesegError(f"{path} has no {MANIFEST}; it is not an edgeseg bundle")
    manifest_bytes, signature = members.pop(MANIFEST), members.pop(SIGNATURE, None)
    authenticity = _check_signature(path, manifest_bytes, signature, pubkey)
    manifest = check_manifest(_loads(manifest_bytes, f"{path}: {MANIFEST}"), f"{path}: {MANIFEST}")
    listed, present = set(manifest["files"]), set(members)
    if listed - present:
        raise EdgesegError(f"{path}: {sorted(listed - present)[0]} is listed in the manifest but missing")
    if present - listed:
        raise EdgesegError(f"{path}: {sorted(present - listed)[0]} is not listed in the manifest (added?)")
    for name, digest in manifest["files"].items():
        if _sha256(members[name]) != digest:
            raise EdgesegError(f"{path}: {name} does not match its sha256 in the manifest; refusing a modified bundle")
    config = check_config(_loads(members["config.json"], f"{path}: config.json"), f"{path}: config.json")
    for key in ("target", "precision", "model", "artefact"):
        if config[key] != manifest[key]:
            raise EdgesegError(f"{path}: the manifest says {key} {manifest[key]!r} but config.json says "
                               f"{config[key]!r}; refusing an inconsistent bundle")
    missing = sorted(set(config["model_files"]) - listed)
    if missing:
        raise EdgesegError(f"{path}: config.json's model file {missing[0]!r} is not in the bundle")
    check_parity(_loads(members["parity.json"], f"{path}: parity.json"), config, f"{path}: parity.json")
    return Bundle(path, manifest, manifest_bytes, members, signature, authenticity)


def _check_signature(path: Path, manifest_bytes: bytes, signature: bytes | None,
                     pubkey: Ed25519PublicKey | None) -> str:
    import base64
    import binascii

    if signature is None:
        if pubkey is not None:
            raise EdgesegError(f"{path} is unsigned; refusing it (--pubkey requires a bundle signed with that key)")
        return "unsigned: integrity only"
    sig = _check_schema(_loads(signature, f"{path}: {SIGNATURE}"), {
        "format": (lambda v: v == SIGNATURE_FORMAT, repr(SIGNATURE_FORMAT)),
        "format_version": (lambda v: type(v) is int and v == 1, "1"),
        "algorithm": (lambda v: v == "ed25519", "'ed25519'"),
        "public_key_sha256": (_is_sha256, "a sha256 hex digest"),
        "signature": (lambda v: isinstance(v, str) and len(v) == 88, "a base64 Ed25519 signature"),
    }, f"{path}: {SIGNATURE}", exact=True)
    try:
        raw = base64.b64decode(sig["signature"], validate=True)
    except (binascii.Error, ValueError):
        raise EdgesegError(f"{path}: {SIGNATURE}: 'signature' is not base64") from None
    signer = sig["public_key_sha256"]
    if pubkey is None:
        return f"signed by key sha256 {signer[:16]}; signature not checked (pass --pubkey KEY.pub to check it)"
    expected = key_fingerprint(pubkey)
    if signer != expected:
        raise EdgesegError(f"{path} is signed by another key (sha256 {signer[:16]}), not the given one "
                           f"(sha256 {expected[:16]}); refusing")
    try:
        pubkey.verify(raw, SIGNATURE_CONTEXT + manifest_bytes)
    except InvalidSignature:
        raise EdgesegError(f"{path}: the signature does not match the manifest; refusing a modified bundle") from None
    return f"signature ok (Ed25519 key sha256 {expected[:16]})"


def _read_members(path: Path) -> dict[str, bytes]:
    """The members of a bundle archive, parsed strictly (see the module docstring)."""
    try:
        if not path.is_file():
            raise EdgesegError(f"bundle {path} does not exist or is not a file")
        if path.stat().st_size > MAX_BYTES:
            raise EdgesegError(f"{path} is larger than {MAX_BYTES >> 20} MiB; not a bundle")
        data = path.read_bytes()
    except OSError as e:
        raise EdgesegError(f"cannot read bundle {path}: {e.strerror or e}") from None
    raw = _gunzip(path, data)
    try:
        with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tar:
            infos = tar.getmembers()
    except (tarfile.TarError, EOFError, ValueError, UnicodeError) as e:
        raise EdgesegError(f"{path} is not a bundle archive ({type(e).__name__}); copy it again") from None
    if len(infos) > MAX_MEMBERS:
        raise EdgesegError(f"{path} has more than {MAX_MEMBERS} members; not a bundle")
    members: dict[str, bytes] = {}
    end = 0
    for m in infos:
        _check_member(path, m, raw, end)
        if m.name in members:
            raise EdgesegError(f"{path}: member {m.name!r} appears twice; refusing")
        members[m.name] = raw[m.offset_data:m.offset_data + m.size]
        end = m.offset_data + -(-m.size // _BLOCK) * _BLOCK
    rest = raw[end:]
    if len(rest) < 2 * _BLOCK or rest.count(0) != len(rest):
        raise EdgesegError(f"{path} has data after its last member (or no end-of-archive blocks); refusing")
    _check_names(list(members), str(path))
    return members


def _gunzip(path: Path, data: bytes) -> bytes:
    """The one gzip stream that must make up all of ``data`` (CRC and length checked, size capped)."""
    d = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    out = bytearray()
    pending = data
    try:
        while not d.eof:
            chunk = d.decompress(pending, 1 << 20)
            pending = d.unconsumed_tail
            out += chunk
            if len(out) > MAX_BYTES:
                raise EdgesegError(f"{path} unpacks to more than {MAX_BYTES >> 20} MiB; not a bundle")
            if not chunk and not pending:
                break
    except zlib.error:
        raise EdgesegError(f"{path} is not a gzip-compressed bundle (or is corrupted); copy it again") from None
    if not d.eof:
        raise EdgesegError(f"{path} is truncated or not a bundle archive; copy it again")
    if d.unused_data:
        raise EdgesegError(f"{path} has a second gzip stream or trailing data after the bundle; refusing")
    return bytes(out)


def _check_member(path: Path, member: tarfile.TarInfo, raw: bytes, expected_offset: int) -> None:
    """Only regular files, each one plain ustar header followed by its data, back to back from offset 0; a
    folder entry is refused too (the format needs none: folders follow from the file names)."""
    typeflag = raw[member.offset + 156:member.offset + 157]
    if member.offset != expected_offset or member.offset_data != member.offset + _BLOCK:
        raise EdgesegError(f"{path}: member {member.name!r} has extension headers or hidden data; refusing")
    if typeflag not in (b"0", b"\0") or member.type not in (tarfile.REGTYPE, tarfile.AREGTYPE) \
            or member.sparse is not None:
        raise EdgesegError(f"{path}: member {member.name!r} is not a regular file (a folder, link or special "
                           "file); refusing")
    if not _is_name(member.name):
        raise EdgesegError(f"{path}: member name {member.name!r} is not a plain relative file name (absolute, "
                           "'..', hidden or odd characters); refusing")


def manifest_sha256(path: str | os.PathLike) -> str:
    """sha256 of the verified bundle's manifest, to compare with a value published for the unit."""
    return read_bundle(path).manifest_sha256


# --- unpacking and self-test ------------------------------------------------------------------------------------

def _write_tree(files: dict[str, bytes], dest: Path) -> None:
    """Write verified files (names already checked: plain, relative, no clashes) under the folder ``dest``."""
    mode = default_file_mode()
    for name, data in sorted(files.items()):
        target = dest.joinpath(*PurePosixPath(name).parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)


def unpack_bundle(path: str | os.PathLike, dest: str | os.PathLike,
                  pubkey: Ed25519PublicKey | None = None) -> tuple[Bundle, Path]:
    """Verify ``path``, then write its manifest's files plus ``manifest.json`` (and ``manifest.sig``) into the
    new or empty folder ``dest``: built in a temp folder beside it, then renamed, so ``dest`` is either
    complete or untouched. Never writes into a folder that has files."""
    dest = Path(dest)
    try:
        busy = os.path.lexists(dest) and (dest.is_symlink() or not dest.is_dir() or any(dest.iterdir()))
    except OSError as e:
        raise EdgesegError(f"cannot unpack into {dest}: {e.strerror or e}") from None
    if busy:
        raise EdgesegError(f"{dest} exists and is not an empty folder; unpack into a new or empty folder "
                           "(nothing is overwritten)")
    bundle = read_bundle(path, pubkey)
    tmp = None
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp"))
        extra = {MANIFEST: bundle.manifest_bytes, **({SIGNATURE: bundle.signature} if bundle.signature else {})}
        _write_tree({**bundle.files, **extra}, tmp)
        os.chmod(tmp, 0o777 & ~current_umask())
        os.rename(tmp, dest)  # replaces only an empty folder; fails if files appeared there meanwhile
        tmp = None
    except OSError as e:
        raise EdgesegError(f"cannot unpack into {dest}: {e.strerror or e} (nothing was overwritten)") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return bundle, dest


def unpack(files: dict[str, bytes], dest: Path) -> Path:
    """Write verified files under the existing folder ``dest`` (names checked by :func:`read_bundle`)."""
    _write_tree(files, Path(dest))
    return Path(dest)


def _tolerance(check: OutputCheck) -> list:
    """An :class:`~edgeseg.tolerances.OutputCheck` as the manifest's [max |logit diff|, min mask agreement]."""
    return [check.max_abs_logit_diff, check.min_mask_agreement]


def effective_tolerance(precision: str, manifest_tolerance) -> tuple[float | None, float]:
    """The self-test tolerance: :data:`edgeseg.tolerances.SELFTEST` for ``precision``, tightened (never loosened)
    by the manifest's [max |logit diff|, min mask agreement]."""
    code_diff, code_agree = _tolerance(SELFTEST[precision])
    m_diff, m_agree = manifest_tolerance
    if m_diff is None:
        max_diff = code_diff
    else:
        max_diff = float(m_diff) if code_diff is None else min(code_diff, float(m_diff))
    return max_diff, max(code_agree, float(m_agree))


def selftest(path: str | os.PathLike, expect_target: str | None = None,
             pubkey: Ed25519PublicKey | None = None) -> dict:
    """Verify (and check the signature with ``pubkey``), unpack to a temp folder, load with the runtime, run
    the golden input, compare within :func:`effective_tolerance`."""
    from edgeseg.contract import InputContract
    from edgeseg.export import load_runner

    bundle = read_bundle(path, pubkey)
    manifest, files = bundle.manifest, bundle.files
    if expect_target is not None and manifest["target"] != expect_target:
        raise EdgesegError(f"{path} was bundled for target {manifest['target']}; this device's loader is for "
                           f"{expect_target}. Export and bundle for {expect_target} instead")
    config = json.loads(files["config.json"])
    contract = InputContract.from_dict(config["input_contract"])
    bgr = cv2.imdecode(np.frombuffer(files[manifest["golden"]["input"]], np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise EdgesegError(f"{path}: the golden input is not a readable image")
    try:
        want = np.load(io.BytesIO(files[manifest["golden"]["output"]]), allow_pickle=False)
    except (ValueError, OSError, EOFError):
        raise EdgesegError(f"{path}: the golden output is not a .npy array") from None
    with tempfile.TemporaryDirectory() as tmp:
        x = contract.preprocess(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
        got = np.asarray(load_runner(unpack(files, Path(tmp)))(x))
    if want.dtype.kind != "f" or want.shape != got.shape:
        raise EdgesegError(f"{path}: the golden output ({want.dtype}, shape {want.shape}) does not match the model's "
                           f"output (shape {got.shape})")
    max_diff, min_agree = effective_tolerance(manifest["precision"], manifest["golden"]["tolerance"])
    diff = float(np.abs(got - want).max())
    agree = float(((got > 0) == (want > 0)).mean())
    passed = bool(agree >= min_agree and (max_diff is None or diff <= max_diff))
    return {"passed": passed, "target": manifest["target"], "precision": manifest["precision"],
            "max_abs_logit_diff": diff, "mask_agreement": agree,
            "tolerance": {"max_abs": max_diff, "min_agreement": min_agree}, "authenticity": bundle.authenticity}
