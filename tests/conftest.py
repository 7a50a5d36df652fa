"""Shared fixtures: the real data in ../shared/data, small real splits, and an in-process CLI runner."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("EDGESEG_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_root() -> Path:
    if not (DATA / "splits" / "pranet-train.txt").is_file():
        pytest.fail(f"real data not found at {DATA}; set EDGESEG_DATA or put shared/ beside the repo")
    return DATA


@pytest.fixture(scope="session")
def authors_weights() -> Path:
    """The UltraSeg authors' released 130K state_dict (shared/weights)."""
    path = REPO.parent / "shared" / "weights" / "ultraseg-130k-authors.pth"
    if not path.is_file():
        pytest.fail(f"released weights missing at {path}")
    return path


@pytest.fixture(scope="session")
def authors_ckpt(authors_weights, tmp_path_factory) -> Path:
    """The authors' released UltraSeg-130K weights imported as an edgeseg checkpoint."""
    from edgeseg.models.authors import import_released

    return import_released("ultraseg-130k", authors_weights, tmp_path_factory.mktemp("ckpt") / "authors.pt")


@pytest.fixture(scope="session")
def parity16(data_root, tmp_path_factory) -> Path:
    """16 frames of the default parity split (validation carved from pranet-train, seed 42)."""
    from edgeseg.export.parity import resolve_parity_ids

    ids, _ = resolve_parity_ids(None, data_root)
    path = tmp_path_factory.mktemp("splits") / "parity16.txt"
    path.write_text("\n".join(ids[:16]) + "\n")
    return path


@pytest.fixture(scope="session")
def calib32(data_root, tmp_path_factory) -> Path:
    """A 32-frame calibration manifest from the training part of pranet-train (disjoint from the parity frames)."""
    from edgeseg.calibration import make_manifest, write_manifest

    return write_manifest(make_manifest("pranet-train", data_root, n=32), tmp_path_factory.mktemp("cal") / "c32.json")


@pytest.fixture(scope="session")
def litert_python() -> str:
    """The TFLite conversion interpreter; built once under the cache dir when none is configured."""
    from edgeseg.export import tflite

    try:
        return tflite.litert_python()
    except ImportError:
        return str(tflite.setup_litert_env())


@pytest.fixture(scope="session")
def tiny_split(data_root, tmp_path_factory) -> Path:
    """12 real training frames (6 Kvasir-SEG, 6 CVC-ClinicDB) as a split file."""
    ids = (data_root / "splits" / "pranet-train.txt").read_text().split()
    chosen = [i for i in ids if i.startswith("kvasir")][:6] + [i for i in ids if i.startswith("cvc")][:6]
    path = tmp_path_factory.mktemp("splits") / "tiny.txt"
    path.write_text("\n".join(chosen) + "\n")
    return path


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a module of tiny tensors: OpenMP fan-out costs more than it saves, and on a
    busy 2-core machine the spinning worker threads stall each forward pass for seconds."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cli(capsys):
    """Run ``edgeseg ARGS...`` in-process through ``main()``; returns (exit code, stdout, stderr)."""
    from _helpers import run_main

    def run(*args: str):
        code = run_main(*args)
        out, err = capsys.readouterr()
        return code, out, err

    return run
