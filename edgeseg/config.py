"""Training configuration: one dataclass, plus the seed papers' recipes as named presets."""

from __future__ import annotations

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


@dataclass
class TrainConfig:
    model: str = "ultraseg-108k"
    train_split: str = "pranet-train"  # file, split name in <root>/splits, or seeded:<dataset>:<k>:<seed>:train
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
    cosine_period: int | None = None  # None: one half-cosine over the run; MALUNet uses a 50-epoch T_max
    size: int = 256  # network input, multiple of 32
    seed: int = 42
    channels_last: bool = True  # 3-4x faster on CPU for these nets (bench/train_throughput.py)
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


# The seed papers' recipes (SPEC B §1, §5.6), selectable with --recipe.
RECIPES: dict[str, dict] = {
    "default": dict(optimizer="adamw", lr=1e-3, weight_decay=1e-2, min_lr=1e-5, batch_size=8),
    "ultraseg": dict(optimizer="adam", lr=3e-4, weight_decay=0.0, min_lr=0.0, batch_size=4, epochs=100),
    "malunet": dict(optimizer="adamw", lr=1e-3, weight_decay=1e-2, min_lr=1e-5, batch_size=8, epochs=300,
                    cosine_period=50),
}

# Fields that may change between a run and its --resume without changing what is being trained.
RESUMABLE_CHANGES = {"data_root", "threads", "workers", "cache_dir", "out", "compile"}


def build_config(recipe: str = "default", **options) -> TrainConfig:
    """Recipe defaults, then the explicitly given (non-None) options on top."""
    if recipe not in RECIPES:
        raise EdgesegError(f"unknown recipe {recipe!r}; known: {', '.join(RECIPES)}")
    known = {f.name for f in fields(TrainConfig)}
    unknown = set(options) - known
    if unknown:
        raise EdgesegError(f"unknown training option(s): {', '.join(sorted(unknown))}")
    cfg = replace(TrainConfig(), recipe=recipe, **RECIPES[recipe])
    return replace(cfg, **{k: v for k, v in options.items() if v is not None})


def config_differences(old: dict, new: dict) -> list[str]:
    """Fields that differ between a checkpoint's config and a resumed run's config."""
    return sorted(k for k in new if k not in RESUMABLE_CHANGES and old.get(k) != new.get(k))
