"""Fidelity of our UltraSeg-130K: the authors' released weights, imported through the key map, reproduce the
per-image mDice their own code gives on this machine (0.882 Kvasir, 0.856 CVC-ClinicDB at 256x256,
nearest-resized masks thresholded at 127)."""

from __future__ import annotations

import pytest
import torch

from edgeseg.checkpoint import load_model
from edgeseg.data import read_split
from edgeseg.errors import EdgesegError
from edgeseg.evaluate import evaluate_split, torch_logits_fn
from edgeseg.models.authors import import_released

AUTHORS_MDICE = {"pranet-test-kvasir": 0.882, "pranet-test-cvc-clinicdb": 0.856}


@pytest.mark.parametrize("split", sorted(AUTHORS_MDICE))
def test_released_weights_reproduce_the_authors_dice(authors_ckpt, data_root, split):
    model, contract, ckpt = load_model(authors_ckpt)
    assert ckpt["model"] == "ultraseg-130k" and ckpt["model_kwargs"] == {"num_classes": 2}
    assert contract.size == 256 and contract.mean is None and contract.std is None
    torch.set_num_threads(1)
    r = evaluate_split(torch_logits_fn(model), contract, data_root, read_split(split, data_root), native=False)
    assert abs(r["mdice"] - AUTHORS_MDICE[split]) < 0.01, r["mdice"]


def test_released_scalars_land_where_the_spec_says(authors_ckpt):
    model, _, _ = load_model(authors_ckpt)
    assert model.attention_alpha.item() == pytest.approx(0.235, abs=1e-3)
    assert model.encoder3[1].res_weight.item() == pytest.approx(0.201, abs=1e-3)
    assert model.merge4.region_weight.item() == pytest.approx(0.067, abs=1e-3)


def test_foreign_keys_are_refused(tmp_path, authors_weights):
    sd = torch.load(authors_weights, map_location="cpu", weights_only=True)
    sd["head.extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "other.pth")
    with pytest.raises(EdgesegError, match="head.extra.weight"):
        import_released("ultraseg-130k", tmp_path / "other.pth", tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()
