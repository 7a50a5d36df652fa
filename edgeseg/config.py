"""Training configuration: one dataclass, plus the seed papers' recipes as named presets."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

from edgeseg.errors import EdgesegError


@dataclass
class DistillConfig:
    teacher: str  # teacher checkpoint (an edgeseg checkpoint trained with `edgeseg train`)
    recipe: str = "microaunet-2stage"  # microaunet-2stage | kdas | feature | logit
    stage1_epochs: int | None = None  # 2-stage only; None: 60% of the epochs
    tau: float = 2.0  # temperature of the KL terms
    alpha: float | None = None  # KD weight; None: 0.3 for kdas (its 0.7/0.3 mix), 1.0 otherwise
    rho: float = 0.3  # weight of the EMA-anchor regulariser in stage 2
    contrast_weight: float = 0.1  # weight of the pixel contrastive loss in stage 2
    ema_decay: float = 0.995  # per optimiser step
    teacher_cache: str | None = None  # logit/kdas: folder of the teacher's logits, computed once (offline distillation)


@dataclass
class TrainConfig:
    model: str = "ultraseg-108k"
    weights: str | None = None  # start from this checkpoint's weights (a file or a shipped name); same model
    train_split: str = "pranet-train"  # file, name in <root>/splits, seeded:<ds>:<k>:<seed>:train, all:<ds>
    val_split: str | None = None  # None: carve val_fraction of the train split with `seed`
    val_fraction: float = 0.1
    data_root: str | None = None  # None: $EDGESEG_DATA, then ../shared/data
    recipe: str = "default"  # a RECIPES key; explicit options override it
    epochs: int = 100
    batch_size: int = 8
    optimizer: str = "adamw"  # adamw | adam
    lr: float = 1e-3
    weight_decay: float = 1e-2
    min_lr: float = 1e-5  # cosine floor
    pretrained_lr_scale: float = 0.3  # lr multiplier of modules that start from pretrained weights (an encoder)
    cosine_period: int | None = None  # None: one half-cosine over the run; MALUNet uses a 50-epoch T_max
    size: int = 256  # network input, multiple of 32
    seed: int = 42
    channels_last: bool = True  # 1.2-2.1x faster on CPU for these nets (bench/train_throughput.py)
    compile: bool = False  # torch.compile the model
    bf16: bool = False  # bf16 autocast (CPU AMX); off by default: slower for these tiny convs here
    threads: int = 0  # torch intra-op threads, 0 = torch default
    workers: int = 0  # DataLoader workers; augmentation is cheap next to the step
    strict_masks: bool = False  # refuse non-binary masks instead of thresholding them
    cache_dir: str | None = None  # on-disk decoded-sample cache; None = decode in memory each run
    out: str = "runs/train"
    distill: DistillConfig | None = None  # set by `edgeseg distill`

    def to_dict(self) -> dict:
        return asdict(self)


# The seed papers' recipes (as their released training scripts set them), selectable with --recipe.
RECIPES: dict[str, dict] = {
    "default": dict(optimizer="adamw", lr=1e-3, weight_decay=1e-2, min_lr=1e-5, batch_size=8),
    "ultraseg": dict(optimizer="adam", lr=3e-4, weight_decay=0.0, min_lr=0.0, batch_size=4, epochs=100),
    "malunet": dict(optimizer="adamw", lr=1e-3, weight_decay=1e-2, min_lr=1e-5, batch_size=8, epochs=300,
                    cosine_period=50),
}

# Fields that may change between a run and its --resume without changing what is being trained.
RESUMABLE_CHANGES = {"data_root", "threads", "workers", "cache_dir", "out", "compile"}


def build_config(recipe: str = "default", **options) -> TrainConfig:
    """Recipe defaults, then the explicitly given (non-None) options on top; every value is range-checked."""
    if recipe not in RECIPES:
        raise EdgesegError(f"unknown recipe {recipe!r}; known: {', '.join(RECIPES)}")
    known = {f.name for f in fields(TrainConfig)}
    unknown = set(options) - known
    if unknown:
        raise EdgesegError(f"unknown training option(s): {', '.join(sorted(unknown))}")
    cfg = replace(TrainConfig(), recipe=recipe, **RECIPES[recipe])
    return check_config(replace(cfg, **{k: v for k, v in options.items() if v is not None}))


MAX_SEED = 2**32 - 1  # numpy's SeedSequence and torch.manual_seed both take it; negatives break numpy


def check_int(value, option: str, lo: int, hi: int | None = None, none_ok: bool = False) -> None:
    """Refuse a non-integer (bools included) or one outside [lo, hi] with one line naming ``option``."""
    if value is None and none_ok:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        bound = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
        raise EdgesegError(f"{option} must be an integer {bound}, got {value!r}")


def check_float(value, option: str, lo: float, hi: float | None = None, lo_open: bool = False,
                hi_open: bool = False, none_ok: bool = False) -> None:
    """Refuse a non-number, NaN, infinity or a value outside the (half-)open range with one line."""
    if value is None and none_ok:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > lo if lo_open else value >= lo) and (hi is None or (value < hi if hi_open else value <= hi))
    if not ok:
        left, right = "(" if lo_open else "[", ")" if hi_open or hi is None else "]"
        raise EdgesegError(f"{option} must be a finite number in {left}{lo}, {hi if hi is not None else 'inf'}"
                           f"{right}, got {value!r}")


def check_config(cfg: TrainConfig) -> TrainConfig:
    """The one range check of a training config, for every command and for library callers of ``run``:
    out-of-range numbers (``--size 0``, ``--batch-size 0``, ``--lr nan``, ``--threads -1``, ``--epochs 0``, a
    validation fraction outside (0, 1), ...) are refused with one line naming the option."""
    check_int(cfg.epochs, "--epochs", 1, 100_000)
    check_int(cfg.batch_size, "--batch-size", 1, 4096)
    check_int(cfg.size, "--size", 32, 4096)
    if cfg.size % 32:
        raise EdgesegError(f"--size must be a multiple of 32, got {cfg.size}")
    check_float(cfg.lr, "--lr", 0.0, 10.0, lo_open=True)
    check_float(cfg.min_lr, "min_lr", 0.0, 10.0)
    check_float(cfg.weight_decay, "weight_decay", 0.0, 10.0)
    check_float(cfg.pretrained_lr_scale, "pretrained_lr_scale", 0.0, 10.0)
    check_int(cfg.cosine_period, "cosine_period", 1, 100_000, none_ok=True)
    check_float(cfg.val_fraction, "--val-fraction", 0.0, 1.0, lo_open=True, hi_open=True)
    check_int(cfg.seed, "--seed", 0, MAX_SEED)
    check_int(cfg.threads, "--threads", 0, 1024)
    check_int(cfg.workers, "--workers", 0, 256)
    if cfg.optimizer not in ("adamw", "adam"):
        raise EdgesegError(f"unknown optimizer {cfg.optimizer!r}; use adamw or adam")
    for name in ("model", "train_split", "out"):
        if not isinstance(getattr(cfg, name), str) or not getattr(cfg, name).strip():
            raise EdgesegError(f"--{name.replace('_', '-')} must not be empty")
    if cfg.val_split is not None and (not isinstance(cfg.val_split, str) or not cfg.val_split.strip()):
        raise EdgesegError("--val-split must not be empty")
    if cfg.weights is not None and (not isinstance(cfg.weights, str) or not cfg.weights.strip()):
        raise EdgesegError("--weights must name a checkpoint file or a shipped checkpoint")
    d = cfg.distill
    if d is not None:
        if not isinstance(d.teacher, str) or not d.teacher.strip():
            raise EdgesegError("--teacher must name a checkpoint file")
        check_int(d.stage1_epochs, "--stage1-epochs", 1, 100_000, none_ok=True)
        check_float(d.tau, "--tau", 0.0, 100.0, lo_open=True)
        check_float(d.alpha, "--alpha", 0.0, 100.0, none_ok=True)
        check_float(d.rho, "--rho", 0.0, 100.0)
        check_float(d.contrast_weight, "--contrast-weight", 0.0, 100.0)
        check_float(d.ema_decay, "ema_decay", 0.0, 1.0, hi_open=True)
    return cfg


def config_differences(old: dict, new: dict) -> list[str]:
    """Fields that differ between a checkpoint's config and a resumed run's config. A field the checkpoint's
    config lacks (the run started before edgeseg had it) counts as its default, in the distillation part too."""
    old = {**asdict(TrainConfig()), **old}
    if isinstance(old.get("distill"), dict) and isinstance(new.get("distill"), dict):
        old["distill"] = {**asdict(DistillConfig(teacher=old["distill"].get("teacher", ""))), **old["distill"]}
    return sorted(k for k in new if k not in RESUMABLE_CHANGES and old.get(k) != new.get(k))
