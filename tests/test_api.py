"""The Python API (edgeseg.api): the README's example runs as written, and bad input is an EdgesegError."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from edgeseg import api
from edgeseg.errors import EdgesegError

REPO = Path(__file__).resolve().parents[1]


def test_the_readme_example_runs(data_root, tmp_path, monkeypatch, capsys):
    text = (REPO / "README.md").read_text()
    code = re.search(r"## Python API.*?```python\n(.*?)```", text, re.S).group(1)
    frame = data_root / "cvc-clinicdb" / "images" / "40.jpg"
    monkeypatch.chdir(tmp_path)
    exec(compile(code.replace("../shared/data", str(data_root)).replace('"frame.jpg"', repr(str(frame))),
                 "README.md", "exec"), {})
    mdice, line = capsys.readouterr().out.strip().splitlines()
    assert abs(float(mdice) - 0.7718) < 1e-3  # the shipped model's CVC-ClinicDB test score (edgeseg weights)
    delta, agreement = map(float, line.split())
    assert abs(delta) <= 0.001 and agreement > 0.999
    assert (tmp_path / "art" / "onnx" / "parity.json").is_file()


def test_predict_and_load_refuse_bad_input(tmp_path):
    model = api.load()
    assert model.info["kind"] == "checkpoint" and model.info["model"] == "ultraseg-108k"
    mask = model.predict(np.zeros((70, 90, 3), np.uint8))
    assert mask.shape == (70, 90) and mask.dtype == bool
    for bad in (np.zeros((70, 90), np.uint8), np.zeros((70, 90, 3), np.float32), np.zeros((0, 9, 3), np.uint8)):
        with pytest.raises(EdgesegError, match="one RGB uint8 frame"):
            model.predict(bad)
    with pytest.raises(EdgesegError, match="threshold"):
        model.predict(np.zeros((8, 8, 3), np.uint8), threshold=1.5)
    with pytest.raises(EdgesegError, match="does not exist"):
        api.load(tmp_path / "nope.pt")
    with pytest.raises(EdgesegError, match="threads must be a positive integer"):
        api.load(threads=0)
