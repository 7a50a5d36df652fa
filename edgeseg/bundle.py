"""Verified bundles for embedded units: pack, verify offline, self-test on the device. No torch import.

    edgeseg bundle ART/ --out unit.tar.gz     # artefact + config + parity.json + golden I/O + manifest.json
    edgeseg verify unit.tar.gz                # every sha256 and the manifest; any changed byte -> exit 2
    edgeseg selftest unit.tar.gz --target openvino-cpu   # on the device: verify, load, run the golden input

``manifest.json`` lists the sha256 of every other file, the target, precision, runtime versions, calibration
hash, checkpoint hash and edgeseg version. Unpacking accepts only plain files and folders under the bundle's
own directory (no absolute paths, no ``..``, no links or devices).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

import cv2
import numpy as np

from edgeseg import __version__
from edgeseg.errors import EdgesegError
from edgeseg.fileio import atomic_path

MANIFEST = "manifest.json"
BUNDLE_FORMAT = "edgeseg-bundle"
GOLDEN_INPUT, GOLDEN_OUTPUT = "golden/input.png", "golden/logits.npy"
# Self-test tolerances per precision: max |logit difference| (None: not checked) and minimum mask agreement.
# int8 kernels may round differently on another CPU, so int8 is judged on the mask only.
TOLERANCE = {"fp32": (1e-3, 0.999), "fp16": (5e-2, 0.999), "int8": (None, 0.995)}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_bundle(artefact: str | os.PathLike, out: str | os.PathLike, golden_rgb: np.ndarray) -> Path:
    """Pack an exported artefact folder with a golden frame and its expected output into ``out``.

    Args:
        artefact: the folder written by ``edgeseg export``.
        out: the ``.tar.gz`` to write (atomically).
        golden_rgb: one RGB uint8 frame (any size); it is stored at network size, and its logits are computed
            here with the artefact's own runtime.
    """
    from edgeseg.contract import InputContract, resize_image
    from edgeseg.export import load_runner, read_config

    folder = Path(artefact)
    config = read_config(folder)
    if not (folder / "parity.json").is_file():
        raise EdgesegError(f"{folder} has no parity.json; only artefacts that passed their parity gate are bundled")
    contract = InputContract.from_dict(config["input_contract"])
    rgb = resize_image(golden_rgb, contract.size)
    logits = load_runner(folder)(contract.preprocess(rgb)).astype(np.float32)
    files = {name: (folder / name).read_bytes() for name in [*config["model_files"], "config.json", "parity.json"]}
    ok, png = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    files[GOLDEN_INPUT] = png.tobytes()
    buf = io.BytesIO()
    np.save(buf, logits)
    files[GOLDEN_OUTPUT] = buf.getvalue()
    manifest = {
        "format": BUNDLE_FORMAT, "format_version": 1,
        "target": config["target"], "precision": config["precision"], "model": config["model"],
        "artefact": config["artefact"], "runtime_versions": config.get("runtime_versions", {}),
        "calibration": config.get("calibration"), "checkpoint_sha256": config["checkpoint"]["sha256"],
        "edgeseg_version": __version__, "golden": {"input": GOLDEN_INPUT, "output": GOLDEN_OUTPUT,
                                                   "tolerance": TOLERANCE[config["precision"]]},
        "files": {name: _sha256(data) for name, data in sorted(files.items())},
    }
    files[MANIFEST] = json.dumps(manifest, indent=2).encode()
    return _write_tar(Path(out), files)


def _write_tar(out: Path, files: dict[str, bytes]) -> Path:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EdgesegError(f"cannot write bundle {out}: {e.strerror}") from None
    with atomic_path(out) as tmp, tarfile.open(tmp, mode="w:gz") as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    return out


def read_bundle(path: str | os.PathLike) -> tuple[dict, dict[str, bytes]]:
    """Read and fully verify a bundle in memory. Returns (manifest, files). Raises EdgesegError on any
    unsafe member, missing or extra file, or hash mismatch."""
    path = Path(path)
    if not path.is_file():
        raise EdgesegError(f"bundle {path} does not exist")
    files: dict[str, bytes] = {}
    try:
        with tarfile.open(path, mode="r:gz") as tar:
            for member in tar.getmembers():
                _check_member(path, member)
                if member.isfile():
                    files[member.name] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        raise EdgesegError(f"{path} is truncated or not a bundle archive ({type(e).__name__}); copy it again") from None
    if MANIFEST not in files:
        raise EdgesegError(f"{path} has no {MANIFEST}; it is not an edgeseg bundle")
    try:
        manifest = json.loads(files.pop(MANIFEST))
    except json.JSONDecodeError:
        raise EdgesegError(f"{path}: {MANIFEST} is not valid JSON (tampered?)") from None
    if manifest.get("format") != BUNDLE_FORMAT or not isinstance(manifest.get("files"), dict):
        raise EdgesegError(f"{path}: {MANIFEST} is not an edgeseg bundle manifest")
    listed, present = set(manifest["files"]), set(files)
    if listed - present:
        raise EdgesegError(f"{path}: {sorted(listed - present)[0]} is listed in the manifest but missing")
    if present - listed:
        raise EdgesegError(f"{path}: {sorted(present - listed)[0]} is not listed in the manifest (added?)")
    for name, digest in manifest["files"].items():
        if _sha256(files[name]) != digest:
            raise EdgesegError(f"{path}: {name} does not match its sha256 in the manifest; refusing a modified bundle")
    return manifest, files


def _check_member(path: Path, member: tarfile.TarInfo) -> None:
    p = PurePosixPath(member.name)
    if p.is_absolute() or ".." in p.parts or member.name.startswith(("/", "\\")):
        raise EdgesegError(f"{path}: member {member.name!r} would unpack outside the bundle folder; refusing")
    if not (member.isfile() or member.isdir()):
        raise EdgesegError(f"{path}: member {member.name!r} is a link or special file; refusing")


def manifest_sha256(path: str | os.PathLike) -> str:
    """sha256 of the verified bundle's manifest, to compare with a value published for the unit."""
    with tarfile.open(path, mode="r:gz") as tar:
        return _sha256(tar.extractfile(MANIFEST).read())


def unpack(files: dict[str, bytes], dest: Path) -> Path:
    """Write verified files under ``dest`` (names already checked by :func:`read_bundle`)."""
    for name, data in files.items():
        target = (dest / name).resolve()
        if not str(target).startswith(str(dest.resolve()) + os.sep):
            raise EdgesegError(f"member {name!r} would unpack outside {dest}")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return dest


def selftest(path: str | os.PathLike, expect_target: str | None = None) -> dict:
    """Verify, unpack to a temp folder, load with the runtime, run the golden input, compare."""
    from edgeseg.contract import InputContract
    from edgeseg.export import load_runner

    manifest, files = read_bundle(path)
    if expect_target is not None and manifest["target"] != expect_target:
        raise EdgesegError(f"{path} was bundled for target {manifest['target']}; this device's loader is for {expect_target}. "
                           f"Export and bundle for {expect_target} instead")
    with tempfile.TemporaryDirectory() as tmp:
        folder = unpack(files, Path(tmp))
        config = json.loads(files["config.json"])
        contract = InputContract.from_dict(config["input_contract"])
        bgr = cv2.imdecode(np.frombuffer(files[manifest["golden"]["input"]], np.uint8), cv2.IMREAD_COLOR)
        got = load_runner(folder)(contract.preprocess(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)))
        want = np.load(io.BytesIO(files[manifest["golden"]["output"]]))
    max_diff, min_agree = manifest["golden"]["tolerance"]
    diff = float(np.abs(got - want).max())
    agree = float(((got > 0) == (want > 0)).mean())
    passed = agree >= min_agree and (max_diff is None or diff <= max_diff)
    return {"passed": passed, "target": manifest["target"], "precision": manifest["precision"],
            "max_abs_logit_diff": diff, "mask_agreement": agree, "tolerance": {"max_abs": max_diff,
                                                                                  "min_agreement": min_agree}}
