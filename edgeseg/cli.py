"""The ``edgeseg`` command line. Commands are thin: parse, build a config, call one library function.

Bad input raises :class:`EdgesegError`, shown as one line with exit code 2 (``EDGESEG_DEBUG=1`` shows the
traceback). Heavy imports (torch) happen inside the commands so ``edgeseg --help`` stays fast.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from edgeseg.errors import EdgesegError

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
                  help="Train, evaluate and deploy tiny polyp-segmentation networks.")

DataRootOpt = Annotated[Optional[Path], typer.Option("--data-root", help="Data folder (default: $EDGESEG_DATA, "
                                                     "then ../shared/data).")]
CkptArg = Annotated[Optional[Path], typer.Argument(help="edgeseg checkpoint (default: the shipped model).")]


@app.command()
def train(
    model: Annotated[str, typer.Option(help="Model name; see `edgeseg models`.")] = "ultraseg-108k",
    train_split: Annotated[str, typer.Option(help="Split file/name or seeded:<dataset>:<k>:<seed>:train.")] = "pranet-train",
    val_split: Annotated[Optional[str], typer.Option(help="Validation split (default: carved from train).")] = None,
    val_fraction: Annotated[Optional[float], typer.Option(help="Fraction of train carved for validation.")] = None,
    recipe: Annotated[str, typer.Option(help="default | ultraseg | malunet (the seed papers' recipes).")] = "default",
    epochs: Annotated[Optional[int], typer.Option()] = None,
    batch_size: Annotated[Optional[int], typer.Option()] = None,
    lr: Annotated[Optional[float], typer.Option()] = None,
    seed: Annotated[Optional[int], typer.Option()] = None,
    size: Annotated[Optional[int], typer.Option(help="Network input size (multiple of 32).")] = None,
    compile: Annotated[Optional[bool], typer.Option("--compile/--no-compile", help="torch.compile.")] = None,
    bf16: Annotated[Optional[bool], typer.Option("--bf16/--no-bf16", help="bf16 autocast.")] = None,
    threads: Annotated[Optional[int], typer.Option(help="Torch threads (0 = default).")] = None,
    workers: Annotated[Optional[int], typer.Option(help="DataLoader workers.")] = None,
    cache_dir: Annotated[Optional[Path], typer.Option(help="On-disk cache of decoded samples.")] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Refuse non-binary masks.")] = False,
    data_root: DataRootOpt = None,
    out: Annotated[Path, typer.Option(help="Run folder (last.pt, best.pt, metrics.csv, curves.png).")] = Path("runs/train"),
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from last.pt.")] = False,
):
    """Train a model; writes last.pt every epoch and best.pt by validation mDice."""
    from edgeseg.config import build_config
    from edgeseg.train import run

    cfg = build_config(recipe, model=model, train_split=train_split, val_split=val_split, val_fraction=val_fraction,
                       epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, size=size, compile=compile, bf16=bf16,
                       threads=threads, workers=workers, cache_dir=str(cache_dir) if cache_dir else None,
                       strict_masks=strict or None, data_root=str(data_root) if data_root else None, out=str(out))
    _check_model_name(cfg.model)
    typer.echo(run(cfg, resume=resume))


@app.command()
def evaluate(
    checkpoint: CkptArg = None,
    split: Annotated[str, typer.Option(help="Split file or name.")] = "pranet-test-kvasir",
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the metrics as JSON.")] = None,
    overlays: Annotated[Optional[Path], typer.Option(help="Write overlays of the worst cases here.")] = None,
    data_root: DataRootOpt = None,
):
    """Evaluate a checkpoint on a split: table on stdout, JSON and worst-case overlays on request."""
    from edgeseg.checkpoint import load_model
    from edgeseg.data import read_split, resolve_data_root
    from edgeseg.evaluate import evaluate_split, torch_logits_fn, write_json_atomic

    model, contract, ckpt = load_model(checkpoint)
    root = resolve_data_root(data_root)
    result = evaluate_split(torch_logits_fn(model), contract, root, read_split(split, root), overlays=overlays)
    result.update(model=ckpt["model"], split=split)
    _print_metrics(result, f"{ckpt['model']} on {split}")
    if json_out:
        write_json_atomic(result, json_out)


@app.command()
def models():
    """List the model zoo with parameter counts and MACs at 256x256."""
    from rich.console import Console
    from rich.table import Table

    from edgeseg.models import count_macs, count_params, count_params_thop, create_model, list_models

    table = Table("model", "parameters()", "thop-style", "GMACs @256")
    for name in list_models():
        m = create_model(name)
        table.add_row(name, f"{count_params(m):,}", f"{count_params_thop(m):,}", f"{count_macs(m) / 1e9:.3f}")
    Console().print(table)


@app.command("import-weights")
def import_weights(
    model: Annotated[str, typer.Argument(help="Architecture of the released weights (ultraseg-130k).")],
    weights: Annotated[Path, typer.Argument(help="The released state_dict (.pth).")],
    out: Annotated[Path, typer.Option(help="edgeseg checkpoint to write.")],
):
    """Convert released UltraSeg weights into an edgeseg checkpoint (explicit key map, strict load)."""
    from edgeseg.models.authors import import_released

    typer.echo(import_released(model, weights, out))


def _check_model_name(name: str) -> None:
    from edgeseg.models import list_models
    from edgeseg.models._registry import create_model

    if name not in list_models():
        create_model(name)  # raises the EdgesegError with the nearest-name suggestion


def _print_metrics(result: dict, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    keys = ("mdice", "miou", "dice_global", "acc", "spe", "sen", "hd95", "mae")
    table = Table("resolution", *keys, "n", title=title, min_width=110)
    rows = [(f"{result['size']}x{result['size']}", result)]
    if "native" in result:
        rows.append(("native", result["native"]))
    for label, r in rows:
        table.add_row(label, *(f"{r[k]:.4f}" for k in keys), str(r["n_images"]))
    Console(width=max(Console().width, 120)).print(table)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        app()
    except EdgesegError as e:
        if os.environ.get("EDGESEG_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
