"""The deployment-target registry: one declarative ``targets/<id>.toml`` per target, loaded into frozen
dataclasses. Nothing else in edgeseg lists targets; the CLI, export dispatch, artefact naming and the test
matrix all read this table. Pure data (tomllib), no torch or runtime imports.

    >>> from edgeseg.targets import get_target
    >>> t = get_target("openvino-cpu"); t.backend, t.precision, t.precisions
    ('openvino', 'fp32', ('fp32', 'fp16', 'int8'))
"""

from __future__ import annotations

import difflib
import tomllib
from dataclasses import dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

from edgeseg.errors import EdgesegError

__all__ = ["PRECISIONS", "Runtime", "Profile", "Target", "targets_dir", "list_targets", "get_target"]

PRECISIONS = ("fp32", "fp16", "int8")
DEVICES = ("cpu", "gpu", "npu")
_REQUIRED = ("id", "description", "backend", "device", "precision", "precisions", "artefact", "runtime", "profile")
_OPTIONAL = ("compile",)


@dataclass(frozen=True)
class Runtime:
    extra: str                # pyproject optional-dependency group
    packages: tuple[str, ...]  # import names the backend needs on the export machine
    install: str              # the exact line a user runs when one is missing
    device_install: str       # what the device that runs the artefact needs (the runtime alone)


@dataclass(frozen=True)
class Profile:
    threads: int = 1
    warmup: int = 20
    runs: int = 200


@dataclass(frozen=True)
class Target:
    id: str                   # device-oriented, as users type it: "openvino-cpu"
    description: str
    backend: str              # module name under edgeseg.export
    device: str               # "cpu" | "gpu" | "npu": where the artefact is meant to run
    precision: str            # the default precision
    precisions: tuple[str, ...]  # the precisions this target can build
    artefact: str             # file name of the model inside the artefact folder
    runtime: Runtime
    profile: Profile
    compile: Mapping = field(default_factory=lambda: MappingProxyType({}))  # backend compile properties

    def needs_calibration(self, precision: str) -> bool:
        return precision == "int8"

    def resolve_precision(self, precision: str | None) -> str:
        """The requested precision, or the default; an unknown or unsupported one is an EdgesegError."""
        if precision is None:
            return self.precision
        if precision not in PRECISIONS:
            near = difflib.get_close_matches(precision, PRECISIONS, n=1, cutoff=0.3)
            hint = f" Did you mean {near[0]!r}?" if near else ""
            raise EdgesegError(f"unknown precision {precision!r}.{hint} Known: {', '.join(PRECISIONS)}")
        if precision not in self.precisions:
            others = [t.id for t in list_targets() if precision in t.precisions]
            raise EdgesegError(f"target {self.id!r} supports {', '.join(self.precisions)}, not {precision}; "
                               f"targets with {precision}: {', '.join(others) or 'none'}")
        return precision


def targets_dir() -> Path:
    """The target files: the top-level ``targets/`` folder, shipped in the package as ``edgeseg/_targets``
    (a symlink in the source tree, a folder in a wheel)."""
    return Path(__file__).resolve().parent / "_targets"


def _frozen(d):
    if isinstance(d, dict):
        return MappingProxyType({k: _frozen(v) for k, v in d.items()})
    if isinstance(d, list):
        return tuple(_frozen(v) for v in d)
    return d


def _parse(path: Path) -> Target:
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise EdgesegError(f"target file {path} is unreadable: {e}") from None
    missing = [k for k in _REQUIRED if k not in raw]
    unknown = sorted(set(raw) - set(_REQUIRED) - set(_OPTIONAL))
    if missing or unknown:
        raise EdgesegError(f"target file {path}: missing keys {missing}, unknown keys {unknown}")
    if raw["id"] != path.stem:
        raise EdgesegError(f"target file {path} declares id {raw['id']!r}; the id must equal the file name")
    precisions = tuple(raw["precisions"])
    bad = [p for p in (*precisions, raw["precision"]) if p not in PRECISIONS]
    if bad or raw["precision"] not in precisions or raw["device"] not in DEVICES:
        raise EdgesegError(f"target file {path}: precision {raw['precision']!r} must be one of precisions "
                           f"{list(precisions)} (each in {PRECISIONS}) and device one of {DEVICES}")
    rt = raw["runtime"]
    rt_keys = {f.name for f in fields(Runtime)}
    if not isinstance(rt, dict) or set(rt) != rt_keys:
        raise EdgesegError(f"target file {path}: [runtime] must have exactly the keys {sorted(rt_keys)}")
    return Target(
        id=raw["id"], description=raw["description"], backend=raw["backend"], device=raw["device"],
        precision=raw["precision"], precisions=precisions, artefact=raw["artefact"],
        runtime=Runtime(extra=rt["extra"], packages=tuple(rt["packages"]), install=rt["install"],
                        device_install=rt["device_install"]),
        profile=Profile(**raw["profile"]), compile=_frozen(raw.get("compile", {})),
    )


@lru_cache(maxsize=None)
def _load(folder: Path) -> tuple[Target, ...]:
    if not folder.is_dir():
        raise EdgesegError(f"target registry folder {folder} is missing; edgeseg needs its targets/*.toml")
    return tuple(_parse(p) for p in sorted(folder.glob("*.toml")))


def list_targets() -> tuple[Target, ...]:
    """Every registered target, sorted by id."""
    return _load(targets_dir())


def get_target(target_id: str) -> Target:
    """Look a target up by id; an unknown id raises an EdgesegError with the nearest id and the full list."""
    by_id = {t.id: t for t in list_targets()}
    if target_id in by_id:
        return by_id[target_id]
    near = difflib.get_close_matches(target_id, by_id, n=1, cutoff=0.3)
    hint = f" Did you mean {near[0]!r}?" if near else ""
    raise EdgesegError(f"unknown target {target_id!r}.{hint} Known: {', '.join(by_id)}")
