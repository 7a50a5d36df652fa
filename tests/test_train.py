"""The training loop on real frames: checkpoint contents, bit-exact resume, DDP with two gloo ranks."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

import edgeseg.train as train_mod
from edgeseg.checkpoint import load_model, read_checkpoint
from edgeseg.config import build_config


def _cfg(tiny_split, data_root, out, **kw):
    base = dict(model="ultraseg-108k", train_split=str(tiny_split), val_fraction=0.25, epochs=2, batch_size=2,
                size=64, data_root=str(data_root), out=str(out), threads=1)
    return build_config("default", **{**base, **kw})


def test_training_writes_complete_checkpoints(tiny_split, data_root, tmp_path):
    best = train_mod.run(_cfg(tiny_split, data_root, tmp_path / "run"))
    run = tmp_path / "run"
    assert best == run / "best.pt" and best.is_file() and (run / "curves.png").is_file()
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"] and all(0 <= float(r["val_mdice"]) <= 1 for r in rows)
    ckpt = read_checkpoint(run / "last.pt")  # torch.load(weights_only=True) inside
    assert ckpt["model"] == "ultraseg-108k" and ckpt["epoch"] == 2 and "optimizer" in ckpt["train_state"]
    assert ckpt["contract"]["size"] == 64 and ckpt["contract"]["mean"] is None
    assert ckpt["config"]["train_split"] == str(tiny_split)
    assert len(ckpt["splits"]["train"]) == 64 and ckpt["splits"]["train_n"] == 9 and ckpt["splits"]["val_n"] == 3
    assert ckpt["edgeseg_version"]
    model, contract, _ = load_model(best)
    assert not model.training and contract.size == 64
    assert "train_state" not in read_checkpoint(best)
    assert json.loads((run / "config.json").read_text()) == ckpt["config"]  # the resolved config, readable


def test_run_folder_is_readable(tiny_split, data_root, tmp_path, cli):
    """config.json at the start, metrics.csv with lr, train and validation loss, curves.png; and predict still
    takes the run's best.pt as a checkpoint although a config.json sits beside it."""
    run = tmp_path / "run"
    train_mod.run(_cfg(tiny_split, data_root, run, epochs=1))
    config = json.loads((run / "config.json").read_text())
    assert config["model"] == "ultraseg-108k" and config["size"] == 64 and config["epochs"] == 1
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert len(rows) == 1 and {"lr", "train_loss", "val_loss"} <= set(rows[0])
    assert all(float(rows[0][k]) > 0 for k in ("lr", "train_loss", "val_loss"))
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if importlib.util.find_spec("tensorboard"):  # the optional TensorBoard log (the test extra installs it)
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(run / "tensorboard")).Reload()
        assert {"train/train_loss", "train/lr", "val/loss", "val/mdice"} <= set(events.Tags()["scalars"])
        assert events.Scalars("val/mdice")[0].value == pytest.approx(float(rows[0]["val_mdice"]), rel=1e-4)
    image = sorted((data_root / "kvasir-seg" / "images").iterdir())[0]
    code, _, err = cli("predict", run / "best.pt", image, "--out", tmp_path / "pred")
    assert code == 0, err


def test_curves_have_integer_epoch_ticks(tmp_path):
    from matplotlib.ticker import MaxNLocator

    rows = [{"epoch": str(e), "lr": "0.001", "train_loss": "1.0", "val_loss": "", "val_mdice": "0.5",
             "val_miou": "0.4"} for e in (1, 2)]  # val_loss empty: a run started before the column existed
    import matplotlib.pyplot as plt

    real_close = plt.close
    figs = []
    plt.close = lambda fig=None: figs.append(fig)
    try:
        train_mod._plot_curves(tmp_path, rows)
    finally:
        plt.close = real_close
    fig = figs[0]
    for ax in fig.axes:
        assert isinstance(ax.xaxis.get_major_locator(), MaxNLocator)
        ticks = [t for t in ax.get_xticks() if 1 <= t <= 2]
        assert ticks and all(float(t).is_integer() for t in ticks)
    real_close(fig)
    assert (tmp_path / "curves.png").is_file()


def test_resume_after_interruption_is_bit_identical(tiny_split, data_root, tmp_path, monkeypatch):
    train_mod.run(_cfg(tiny_split, data_root, tmp_path / "straight", epochs=3))
    straight = read_checkpoint(tmp_path / "straight" / "last.pt")["state_dict"]

    real_epoch = train_mod._train_epoch

    def dies_in_epoch_3(cfg, net, criterion, opt, loader, epoch, rank):
        if epoch == 2:
            raise KeyboardInterrupt  # the session ends mid-epoch
        return real_epoch(cfg, net, criterion, opt, loader, epoch, rank)

    monkeypatch.setattr(train_mod, "_train_epoch", dies_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        train_mod.run(_cfg(tiny_split, data_root, tmp_path / "resumed", epochs=3))
    assert read_checkpoint(tmp_path / "resumed" / "last.pt")["epoch"] == 2
    monkeypatch.setattr(train_mod, "_train_epoch", real_epoch)
    train_mod.run(_cfg(tiny_split, data_root, tmp_path / "resumed", epochs=3), resume=True)
    resumed = read_checkpoint(tmp_path / "resumed" / "last.pt")
    assert resumed["epoch"] == 3
    for k, v in straight.items():
        assert torch.equal(v, resumed["state_dict"][k]), k
    rows = list(csv.DictReader(open(tmp_path / "resumed" / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_gloo_ranks_agree(tiny_split, data_root, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "edgeseg.cli", "train", "--train-split", str(tiny_split),
           "--val-fraction", "0.25", "--epochs", "1", "--size", "64", "--batch-size", "2", "--threads", "1",
           "--data-root", str(data_root), "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = json.loads((out / "ranks.json").read_text())
    assert ranks["world_size"] == 2 and ranks["agree"] is True
    assert ranks["checksums"][0] == ranks["checksums"][1]
    assert read_checkpoint(out / "last.pt")["epoch"] == 1


def test_run_checks_configs_built_by_hand(tiny_split, data_root, tmp_path):
    from dataclasses import replace

    from edgeseg.errors import EdgesegError

    good = _cfg(tiny_split, data_root, tmp_path / "run")
    for field, value, option in (("batch_size", 0, "--batch-size"), ("lr", float("nan"), "--lr"),
                                 ("size", 0, "--size"), ("epochs", 0, "--epochs"), ("seed", -1, "--seed")):
        with pytest.raises(EdgesegError, match=option):
            train_mod.run(replace(good, **{field: value}))  # dataclasses.replace bypasses build_config
    assert not (tmp_path / "run").exists()


def test_the_run_lock_is_held_for_the_run_and_released_after(tmp_path):
    from edgeseg.errors import EdgesegError

    with train_mod._run_lock(tmp_path / "run"):
        with pytest.raises(EdgesegError, match="in use by another edgeseg run \\(pid \\d+\\)"):
            with train_mod._run_lock(tmp_path / "run"):
                pass
    with train_mod._run_lock(tmp_path / "run"):  # released when the first run ended
        pass


def test_resume_accepts_configs_written_before_newer_fields():
    """A run started by an older edgeseg lacks fields added since (pretrained_lr_scale, distill.teacher_cache):
    they count as their defaults, so --resume is not refused; a real change still is."""
    from dataclasses import asdict

    from edgeseg.config import DistillConfig, config_differences

    new = build_config(model="microaunet", distill=DistillConfig(teacher="t.pt", recipe="logit")).to_dict()
    old = {k: v for k, v in new.items() if k != "pretrained_lr_scale"}
    old["distill"] = {k: v for k, v in asdict(DistillConfig(teacher="t.pt", recipe="logit")).items()
                      if k != "teacher_cache"}
    assert config_differences(old, new) == []
    assert config_differences({**old, "epochs": old["epochs"] + 1}, new) == ["epochs"]
    assert config_differences(old, {**new, "distill": {**new["distill"], "teacher_cache": "c"}}) == ["distill"]
