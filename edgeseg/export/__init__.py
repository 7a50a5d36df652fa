"""Export a checkpoint for one deployment target, then gate it on parity with PyTorch.

    edgeseg export CKPT --target openvino-cpu --precision int8 --calib calibration/pranet-train-300.json --out art/

Pipeline (the same for every target): validate every input -> prepare (every block in its inference
form, BN folded, logits only, checked in float64) -> ONNX intermediate (opset 17, onnxslim, metadata_props)
-> the target's backend module ``edgeseg.export.<backend>`` -> config.json -> parity on held-out real
frames -> parity.json. Everything is built in a temp folder beside ``--out`` and renamed at the end; an
artefact over its parity budget is kept as ``<out>.rejected`` and :class:`ParityFailure` is raised.

A backend module (``edgeseg.export.<target.backend>``) is a :class:`Backend`: ``export(source, request, out_dir)
-> (model_path, info)`` and ``load_runner(path, target, device=None, threads=None) -> Runner``; nothing else in
the pipeline knows a runtime. A backend reports bad input and failed conversions as :class:`EdgesegError`.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, NoReturn, Protocol, runtime_checkable

from edgeseg import __version__
from edgeseg.errors import EdgesegError
from edgeseg.export.parity import ParityFailure
from edgeseg.fileio import check_output, current_umask, file_sha256
from edgeseg.targets import Target, get_target

if TYPE_CHECKING:
    import numpy as np
    from torch import nn

    from edgeseg.contract import InputContract
    from edgeseg.export.parity import Frames

__all__ = ["export", "load_runner", "open_artefact", "make_runner", "read_config", "check_config", "backend_module",
           "require_runtime", "Backend", "Runner", "Source", "ExportRequest", "ExportResult", "ParityFailure"]

log = logging.getLogger(__name__)
ARTEFACT_FORMAT, ARTEFACT_FORMAT_VERSION = "edgeseg-artefact", 1


# An artefact's logits function: (B, 3, S, S) float32 frames, preprocessed by the input contract -> (B, 1, S, S)
# float32 logits. Runners may carry ``effective`` (what the runtime really ran: threads, precision, ...).
Runner = Callable[["np.ndarray"], "np.ndarray"]


@dataclass(frozen=True)
class Source:
    """What every backend starts from."""
    model: nn.Module        # the checkpoint's model as trained, in eval mode (for backends with their own prep)
    module: nn.Module       # the prepared model (see edgeseg.export.prepare): (B, 3, S, S) -> (B, 1, S, S) logits
    contract: InputContract
    onnx_path: Path         # the simplified ONNX intermediate, with metadata_props
    metadata: dict[str, str]  # edgeseg.* provenance keys, also written into the artefact


@dataclass(frozen=True)
class ExportRequest:
    target: Target
    precision: str
    calib: np.ndarray | None = None   # (N, 3, S, S) float32 calibration inputs for int8, else None
    max_dice_drop: float | None = None
    validation: Frames | None = None  # the parity frames, for accuracy-controlled quantization and golden I/O


@runtime_checkable
class Backend(Protocol):
    """The interface of a backend module; :func:`backend_module` refuses a module without it."""

    def export(self, source: Source, request: ExportRequest, out_dir: Path) -> tuple[Path, dict]:
        """Build ``out_dir/<target.artefact>`` (and its side files); return (model path, backend info for
        config.json's ``backend_config``)."""

    def load_runner(self, path: Path, target: Target, device: str | None = None,
                    threads: int | None = None) -> Runner:
        """The runner of the model file ``path`` on ``device`` (None: the target's own), with ``threads``
        (None: the target's profile threads)."""


@dataclass
class ExportResult:
    path: Path                    # the artefact folder (``<out>`` or ``<out>.rejected``)
    config: dict
    parity: dict
    rejected: bool = False


def backend_module(target: Target) -> Backend:
    """The backend module of ``target``; a planned backend without a module is an EdgesegError."""
    name = f"edgeseg.export.{target.backend}"
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name:
            raise
        raise EdgesegError(f"target {target.id!r}: backend {name} is not implemented in this edgeseg "
                           "version") from None
    if not isinstance(module, Backend):
        raise EdgesegError(f"target {target.id!r}: {name} is not an edgeseg backend (it needs export and "
                           "load_runner)")
    return module


def require_runtime(target: Target) -> None:
    """Refuse early, with the install line, when a package the target's backend needs is missing."""
    for pkg in target.runtime.packages:
        if _missing(pkg):
            raise EdgesegError(f"target {target.id!r} needs the Python package {pkg!r}, which is not "
                               f"installed: {target.runtime.install}")


def _missing(pkg: str) -> bool:
    if pkg in sys.modules:
        return sys.modules[pkg] is None  # a None entry blocks the import
    try:
        return importlib.util.find_spec(pkg) is None
    except (ImportError, ValueError):
        return True


def load_runner(path: str | os.PathLike, device: str | None = None, threads: int | None = None):
    """The runner of an artefact folder (or its model file), through the backend recorded in config.json.
    ``threads`` overrides the target's profile default.

    This is where an artefact is opened: config.json and the model files are checked by :func:`read_config`,
    and a runtime that cannot read or compile the model file (truncated, replaced, another format) raises an
    EdgesegError naming the file, never the runtime's own exception.
    """
    return make_runner(*open_artefact(path), device=device, threads=threads)


def open_artefact(path: str | os.PathLike) -> tuple[Path, dict]:
    """(folder, checked config.json) of an artefact folder or of a file in it; see :func:`read_config`."""
    path = Path(path)
    if not path.exists():
        raise EdgesegError(f"artefact {path} does not exist")
    folder = path if path.is_dir() else path.parent
    if not path.is_dir() and not (folder / "config.json").is_file():
        raise EdgesegError(f"{path} is a file, not an artefact folder (the folder `edgeseg export` wrote; a "
                           "bundle is checked with `edgeseg selftest` or unpacked with `edgeseg unpack`)")
    return folder, read_config(folder)


def make_runner(folder: Path, config: dict, device: str | None = None, threads: int | None = None):
    """The runner of the artefact in ``folder`` whose config.json :func:`read_config` returned as ``config``
    (split from :func:`load_runner` so that a caller can time the runtime's load and compile alone)."""
    target = get_target(config["target"])
    try:
        return backend_module(target).load_runner(folder / config["artefact"], target, device=device,
                                                  threads=threads)
    except EdgesegError:
        raise
    except ImportError as e:  # a device with only some runtimes installed
        missing = f"the Python package {e.name!r}" if e.name else f"a package it cannot import ({e})"
        raise EdgesegError(f"{folder} is a {target.id} artefact, whose runtime needs {missing}: "
                           f"{target.runtime.device_install}") from None
    except Exception as e:
        if not _is_load_error(e):
            raise
        raise EdgesegError(f"{folder}: the {target.backend} runtime cannot load {' + '.join(config['model_files'])} "
                           f"({_first_line(e)}); the artefact is damaged or incomplete: export it again "
                           "(edgeseg export)") from e


def _is_load_error(e: Exception) -> bool:
    """An exception of a runtime failing to read or compile a model file: OpenVINO's RuntimeError, LiteRT's
    ValueError/RuntimeError, an OSError, or any of ONNX Runtime's own exception types (they derive from
    Exception only)."""
    return isinstance(e, (RuntimeError, ValueError, OSError)) or type(e).__module__.split(".")[0] in (
        "onnxruntime", "openvino", "ai_edge_litert", "tflite_runtime", "tensorrt")


def _first_line(e: Exception) -> str:
    """The runtime's message on one line: OpenVINO's source locations ("Exception from ...", "Check '...'
    failed at ...") left out, at most 200 characters."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    told = [line for line in lines if not line.startswith(("Exception from ", "Check '"))]
    text = (told or lines or [type(e).__name__])[0]
    return text if len(text) <= 200 else text[:197] + "..."


# config.json keys every consumer relies on, with their types; backend_config keys a backend reads.
_CONFIG_KEYS = {"target": str, "precision": str, "artefact": str, "model_files": list, "model": str,
                "checkpoint": dict, "input_contract": dict, "input": dict, "backend_config": dict}
_BACKEND_CONFIG_KEYS = {"openvino": {"compile": dict, "deploy_device": str}}


def read_config(folder: str | os.PathLike) -> dict:
    """config.json of an artefact folder, checked: valid JSON, an edgeseg artefact of a known format version,
    every field the loaders use present with the right type, a known target and precision, and every model
    file it lists present, non-empty, inside the folder and (where config.json records them, as every export
    since the field was added does) matching its sha256. Anything else is an EdgesegError that says to export
    again."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EdgesegError(f"artefact {folder} does not exist" if not folder.exists() else
                           f"{folder} is not an edgeseg artefact folder")
    where = folder / "config.json"
    try:
        config = json.loads(where.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise EdgesegError(f"{folder} is not an edgeseg artefact folder (no readable config.json)") from None
    config = check_config(config, where)
    files, hashes = config["model_files"], config.get("model_sha256")
    for name in files:
        f = folder / name
        if not f.is_file():
            raise EdgesegError(f"{folder}: model file {name} (listed in config.json) is missing; the artefact is "
                               "incomplete: export it again (edgeseg export)")
        if f.stat().st_size == 0:
            raise EdgesegError(f"{folder}: model file {name} is empty; the artefact is damaged: export it again "
                               "(edgeseg export)")
        if hashes is not None and file_sha256(f) != hashes[name].lower():
            raise EdgesegError(f"{folder}: model file {name} does not match the sha256 in config.json (truncated "
                               "or changed since export); export it again (edgeseg export)")
    return config


def check_config(config, where) -> dict:
    """The one schema of an artefact's config.json (parsed): an edgeseg artefact of a known format version, every
    field a loader or a bundle uses present with the right type, a known target and precision, model files named
    inside the folder. ``where`` names the file in messages."""
    if not isinstance(config, dict) or config.get("format") != ARTEFACT_FORMAT:
        raise EdgesegError(f"{where} is not an edgeseg artefact config")
    version = config.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        _bad_config(where, "has no valid format_version")
    if version > ARTEFACT_FORMAT_VERSION:
        raise EdgesegError(f"{where} is artefact format {version}, newer than this edgeseg {__version__} reads "
                           f"({ARTEFACT_FORMAT_VERSION}); upgrade edgeseg or export again with this version")
    for key, kind in _CONFIG_KEYS.items():
        if not isinstance(config.get(key), kind):
            _bad_config(where, f"field {key!r} is missing or not a {_TYPE_NAMES[kind]}")
    try:
        target = get_target(config["target"])
    except EdgesegError:
        _bad_config(where, f"unknown target {config['target']!r}")
    if config["precision"] not in target.precisions:
        _bad_config(where, f"precision {config['precision']!r} is not one of {target.id}'s "
                    f"({', '.join(target.precisions)})")
    for key, kind in _BACKEND_CONFIG_KEYS.get(target.backend, {}).items():
        if not isinstance(config["backend_config"].get(key), kind):
            _bad_config(where, f"field 'backend_config.{key}' is missing or not a {_TYPE_NAMES[kind]}")
    if not isinstance(config["checkpoint"].get("sha256"), str):
        _bad_config(where, "field 'checkpoint.sha256' is missing")
    shape = config["input"].get("shape")
    if not (isinstance(shape, list) and len(shape) == 4):
        _bad_config(where, "field 'input.shape' is not a 4-item list")
    _check_contract(where, config["input_contract"])
    files = config["model_files"]
    if not files or not all(isinstance(f, str) and _plain_name(f) for f in files):
        _bad_config(where, "field 'model_files' must list file names inside the artefact folder")
    if config["artefact"] not in files:
        _bad_config(where, f"the model file {config['artefact']!r} is not in model_files")
    hashes = config.get("model_sha256")  # absent in artefacts exported before edgeseg recorded it
    if hashes is not None and not (isinstance(hashes, dict) and set(hashes) == set(files)
                                   and all(isinstance(h, str) for h in hashes.values())):
        _bad_config(where, "field 'model_sha256' does not list one sha256 per model file")
    versions = config.get("runtime_versions", {})
    if not (isinstance(versions, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in versions.items())):
        _bad_config(where, "field 'runtime_versions' is not an object of package -> version")
    if not (config.get("calibration") is None or isinstance(config["calibration"], dict)):
        _bad_config(where, "field 'calibration' is neither null nor an object")
    return config


_TYPE_NAMES = {str: "string", list: "list", dict: "JSON object", int: "integer"}


def _bad_config(where: Path, problem: str) -> NoReturn:
    raise EdgesegError(f"{where}: {problem}; the artefact config is damaged: export it again (edgeseg export)")


def _plain_name(name: str) -> bool:
    """A file name directly inside the folder: not empty, hidden, '..', absolute or with a separator."""
    return bool(name) and not name.startswith(".") and not any(c in name for c in "/\\\0")


def _check_contract(where: Path, d: dict) -> None:
    from edgeseg.contract import InputContract

    try:
        c = InputContract.from_dict(d)
    except (TypeError, ValueError):
        _bad_config(where, "field 'input_contract' is not a valid input contract")
    norm = [v for v in (c.mean, c.std) if v is not None]
    ok = (isinstance(c.size, int) and not isinstance(c.size, bool) and c.size > 0 and c.size % 32 == 0
          and all(len(v) == 3 for v in norm) and (c.mean is None) == (c.std is None)
          and all(s != 0 for s in (c.std or ())) and isinstance(c.scale, (int, float)) and c.scale > 0
          and isinstance(c.threshold, (int, float)) and 0 < c.threshold < 1)
    if not ok:
        _bad_config(where, f"field 'input_contract' is not a valid input contract ({json.dumps(d)[:120]})")


def export(checkpoint: str | os.PathLike | None, target_id: str, out: str | os.PathLike, *,
           precision: str | None = None, calib: str | os.PathLike | None = None,
           parity_split: str | None = None, max_delta: float | None = None,
           max_image_drop: float | None = None, max_dice_drop: float | None = None,
           data_root: str | os.PathLike | None = None) -> ExportResult:
    """Export ``checkpoint`` (None = the shipped model) for ``target_id`` into the folder ``out``.

    Raises:
        EdgesegError: bad input (unknown target/precision, missing runtime, bad manifest, unwritable out...).
        ParityFailure: the artefact missed its budget; it was kept as ``<out>.rejected``.
    """
    from edgeseg.calibration import check_manifest, read_manifest
    from edgeseg.checkpoint import load_model, resolve_checkpoint
    from edgeseg.data.splits import resolve_data_root
    from edgeseg.export.parity import budget, checkpoint_parity_ids, image_budget, passed, resolve_parity_ids

    target = get_target(target_id)
    precision = target.resolve_precision(precision)
    _check_options(target, precision, calib, max_dice_drop, max_delta, max_image_drop)
    backend = backend_module(target)
    require_runtime(target)
    out = check_output(out, "folder", what="the artefact folder")
    _check_out(out)
    model, contract, ckpt = load_model(checkpoint)
    own = checkpoint_parity_ids(ckpt, data_root) if parity_split is None else None
    if own is not None:  # default: the checkpoint's own validation frames, from the root it was trained on
        parity_ids, root, parity_desc = own
    else:
        root = resolve_data_root(data_root)
        parity_ids, parity_desc = resolve_parity_ids(parity_split, root)
    manifest = None
    if target.needs_calibration(precision):
        manifest = read_manifest(calib)
        check_manifest(manifest, root, parity_ids, f"the parity split ({parity_desc})")
    ckpt_path = resolve_checkpoint(checkpoint)
    provenance = {"model": ckpt["model"], "checkpoint": ckpt_path.name, "checkpoint_sha256": file_sha256(ckpt_path),
                  "calibration_sha256": manifest.hash if manifest else "none"}
    budgets = {"budget": budget(precision, max_delta), "image_budget": image_budget(precision, max_image_drop)}
    with _staging(out) as tmp:
        result = _build(tmp, model, contract, ckpt, provenance, target, precision, manifest, root,
                        (parity_ids, parity_desc), budgets, max_dice_drop, backend)
        rejected = not passed(result.parity)
        result.path = _commit(tmp, out.with_name(out.name + ".rejected") if rejected else out)
        result.rejected = rejected
    if rejected:
        from edgeseg.export.parity import summary_line

        raise ParityFailure(f"parity failed, {summary_line(target.id, precision, result.parity)}; artefact kept "
                            f"at {result.path}", result.path)
    return result


def _check_options(target: Target, precision: str, calib, max_dice_drop, max_delta, max_image_drop) -> None:
    if target.needs_calibration(precision) and calib is None:
        raise EdgesegError(f"{target.id} {precision} needs a calibration manifest: pass --calib MANIFEST "
                           "(e.g. calibration/pranet-train-300.json, or make one with `edgeseg calib make`)")
    if calib is not None and not target.needs_calibration(precision):
        raise EdgesegError(f"--calib only applies to int8; {target.id} {precision} is not calibrated")
    if max_dice_drop is not None and (precision != "int8" or target.backend != "openvino"):
        raise EdgesegError("--max-dice-drop (accuracy-controlled quantization) applies only to OpenVINO int8")
    for name, value in (("--max-dice-drop", max_dice_drop), ("--max-delta", max_delta)):
        if value is not None and not 0.0 <= value < 1.0:
            raise EdgesegError(f"{name} must be in [0, 1), got {value}")
    if max_image_drop is not None and not 0.0 <= max_image_drop <= 1.0:
        raise EdgesegError(f"--max-image-drop must be in [0, 1] (1 disables it), got {max_image_drop}")


def _is_artefact_folder(path: Path) -> bool:
    try:
        return json.loads((path / "config.json").read_text()).get("format") == ARTEFACT_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _check_out(out: Path) -> None:
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or _is_artefact_folder(out))):
        raise EdgesegError(f"--out {out} exists and is not an edgeseg artefact folder; choose another path "
                           "(an earlier artefact folder would be replaced)")


class _staging:
    """A temp folder beside ``out``: removed on any error, so nothing is ever half-written."""

    def __init__(self, out: Path):
        self.out = out

    def __enter__(self) -> Path:
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(dir=self.out.parent, prefix=f".{self.out.name}.", suffix=".tmp"))
        except OSError as e:
            raise EdgesegError(f"cannot write the artefact folder {self.out}: {e.strerror or e}") from None
        return self.tmp

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def _commit(tmp: Path, dest: Path) -> Path:
    """Rename ``tmp`` to ``dest``, replacing an earlier artefact folder there."""
    _check_out(dest)
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp made it private; the artefact is an ordinary folder
    backup = None
    if dest.exists():
        backup = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, backup)
    os.replace(tmp, dest)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)
    return dest


def _build(tmp, model, contract, ckpt, provenance, target, precision, manifest, root, parity_split,
           budgets: dict, max_dice_drop, backend) -> ExportResult:
    """Build the artefact in ``tmp`` and measure its parity; ``budgets`` ({"budget", "image_budget"}) go into the
    parity record that decides the gate."""
    from edgeseg.calibration import load_images
    from edgeseg.evaluate import torch_logits_fn
    from edgeseg.export.onnx import torch_to_onnx
    from edgeseg.export.parity import few_frames_note, load_frames, measure, run_batched
    from edgeseg.export.prepare import prepare

    times = {}
    t0 = time.perf_counter()
    prepared, prep_report = prepare(model, contract.size)
    metadata = _onnx_metadata(contract, provenance)
    work = tmp / ".work"
    work.mkdir()
    onnx_path = torch_to_onnx(prepared, contract.size, work / "intermediate.onnx", metadata)
    times["prepare_and_onnx"] = time.perf_counter() - t0
    frames = load_frames(root, parity_split[0], contract, parity_split[1])
    calib = load_images(manifest, root, contract) if manifest else None
    request = ExportRequest(target, precision, calib, max_dice_drop, frames)
    t1 = time.perf_counter()
    artefact, info = backend.export(Source(model, prepared, contract, onnx_path, metadata), request, tmp)
    times["backend"] = time.perf_counter() - t1
    shutil.rmtree(work)
    config = _config(target, precision, artefact, ckpt, contract, provenance, manifest, prep_report, info)
    _write_json(tmp / "config.json", config)
    t2 = time.perf_counter()
    runner = backend.load_runner(artefact, target, device=info.get("parity_device"))
    logits = run_batched(runner, frames.x)
    ref = run_batched(torch_logits_fn(model), frames.x)
    parity = {**measure(ref, logits, frames.masks), **budgets, "precision": precision, "target": target.id,
              "split": frames.description, "ids": list(frames.ids),
              "runtime": getattr(runner, "effective", {})}
    note = few_frames_note(len(frames.ids))
    if note is not None:
        parity.update(few_frames=True, note=note)
    times["parity"] = time.perf_counter() - t2
    times["total"] = time.perf_counter() - t0
    config["timings_s"] = {k: round(v, 2) for k, v in times.items()}
    _write_json(tmp / "config.json", config)
    _write_json(tmp / "parity.json", parity)
    return ExportResult(tmp, config, parity)


def _onnx_metadata(contract, provenance: dict) -> dict[str, str]:
    return {
        "edgeseg.version": __version__,
        "edgeseg.model": provenance["model"],
        "edgeseg.checkpoint_sha256": provenance["checkpoint_sha256"],
        "edgeseg.calibration_sha256": provenance["calibration_sha256"],
        "edgeseg.input_contract": json.dumps(contract.to_dict(), sort_keys=True),
    }


def _config(target, precision, artefact, ckpt, contract, provenance, manifest, prep_report, info) -> dict:
    from edgeseg.checkpoint import git_sha

    s = contract.size
    files = sorted(p.name for p in artefact.parent.iterdir() if not p.name.startswith(".") and p.is_file())
    return {
        "format": ARTEFACT_FORMAT, "format_version": ARTEFACT_FORMAT_VERSION,
        "target": target.id, "backend": target.backend, "device": target.device, "precision": precision,
        "artefact": artefact.name,
        "model_files": files,
        "model_sha256": {name: file_sha256(artefact.parent / name) for name in files},  # checked at every load
        "model": ckpt["model"], "model_kwargs": ckpt.get("model_kwargs", {}),
        "checkpoint": {"file": provenance["checkpoint"], "sha256": provenance["checkpoint_sha256"]},
        "input_contract": contract.to_dict(),
        "input": {"name": "input", "shape": ["batch", 3, s, s], "dtype": "float32", "layout": contract.layout},
        "output": {"name": "logits", "shape": ["batch", 1, s, s], "dtype": "float32",
                   "mask": f"sigmoid(logits) > {contract.threshold}"},
        "calibration": None if manifest is None else {
            "sha256": manifest.hash, "manifest": manifest.path.name, "split": manifest.split,
            "n_images": len(manifest.ids)},
        "edgeseg_version": __version__, "git_sha": git_sha(),
        "runtime_versions": _versions(target),
        "prepare": prep_report,
        "backend_config": info,
    }


def installed_version(dist: str, missing: str = "not installed") -> str:
    """The installed version of distribution ``dist``, or ``missing``."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return missing


def _versions(target: Target) -> dict[str, str]:
    return {pkg: installed_version(pkg) for pkg in ("torch", *target.runtime.packages)}


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")
