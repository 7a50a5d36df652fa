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


def _print_version(value: bool) -> None:
    if value:
        from edgeseg import __version__

        typer.echo(f"edgeseg {__version__}")
        raise typer.Exit()


@app.callback()
def _app(version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                               help="Print the edgeseg version and exit.")] = False):
    """Train, evaluate and deploy tiny polyp-segmentation networks."""

DataRootOpt = Annotated[Optional[Path], typer.Option("--data-root", help="Data folder (default: $EDGESEG_DATA, "
                                                     "then ../shared/data).")]
CkptArg = Annotated[Optional[Path], typer.Argument(help="edgeseg checkpoint (default: the shipped model).")]


# Options shared by `train` and `distill`, defined once. None means "the recipe's default".
TrainSplitOpt = Annotated[Optional[str], typer.Option(help="Split file/name, seeded:<dataset>:<k>:<seed>:train "
                                                     "or all:<dataset> (default: pranet-train).")]
DataOpt = Annotated[Optional[Path], typer.Option("--data", help="Your own data: a folder with images/ and masks/ "
                                                 "(jpg, png, bmp, tif; paired by file name).")]
WeightsOpt = Annotated[Optional[str], typer.Option("--weights", help="Start from this checkpoint's weights "
                                                   "(a file or a shipped name, e.g. ultraseg-108k-pranet); "
                                                   "same architecture as the model.")]
ValSplitOpt = Annotated[Optional[str], typer.Option(help="Validation split (default: carved from train).")]
ValFractionOpt = Annotated[Optional[float], typer.Option(help="Fraction of train carved for validation.")]
EpochsOpt = Annotated[Optional[int], typer.Option(help="Epochs (default: the recipe's).")]
BatchOpt = Annotated[Optional[int], typer.Option(help="Batch size (default: the recipe's).")]
LrOpt = Annotated[Optional[float], typer.Option(help="Peak learning rate (default: the recipe's).")]
SeedOpt = Annotated[Optional[int], typer.Option(help="Seed of init, sampling, augmentation, val carve.")]
SizeOpt = Annotated[Optional[int], typer.Option(help="Network input size (multiple of 32).")]
ThreadsOpt = Annotated[Optional[int], typer.Option(help="Torch threads (0 = default).")]
WorkersOpt = Annotated[Optional[int], typer.Option(help="DataLoader workers.")]
CacheOpt = Annotated[Optional[Path], typer.Option(help="On-disk cache of decoded samples.")]
StrictOpt = Annotated[bool, typer.Option("--strict", help="Refuse non-binary masks.")]
OutOpt = Annotated[Path, typer.Option(help="Run folder (last.pt, best.pt, metrics.csv, curves.png); one that "
                                      "already holds a run is refused without --resume, and locked while in use.")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue the run in --out from last.pt.")]


def _own_data(data: Path | None, data_root, split: str | None, split_option: str, default: str):
    """``--data DIR`` as (data root, split): DIR's parent and ``all:<DIR's name>``; refused next to
    ``--data-root`` or an explicit split. Without it, the options as given (the split defaulting to ``default``)."""
    if data is None:
        return data_root, split if split is not None else default
    for given, option in ((data_root, "--data-root"), (split, split_option)):
        if given is not None:
            raise EdgesegError(f"--data and {option} both choose the data; pass one of them")
    from edgeseg.data.splits import folder_dataset

    return folder_dataset(data)


def _train(recipe: str, resume: bool, cache_dir, data_root, strict: bool, out: Path, data: Path | None = None,
           **options) -> None:
    from edgeseg.config import build_config
    from edgeseg.train import run

    data_root, options["train_split"] = _own_data(data, data_root, options.get("train_split"), "--train-split",
                                                  None)
    cfg = build_config(recipe, cache_dir=str(cache_dir) if cache_dir else None, strict_masks=strict or None,
                       data_root=str(data_root) if data_root else None, out=str(out), **options)
    _check_model_name(cfg.model)
    typer.echo(run(cfg, resume=resume))


@app.command()
def train(
    model: Annotated[str, typer.Option(help="Model name; see `edgeseg models`.")] = "ultraseg-108k",
    data: DataOpt = None,
    weights: WeightsOpt = None,
    train_split: TrainSplitOpt = None,
    val_split: ValSplitOpt = None,
    val_fraction: ValFractionOpt = None,
    recipe: Annotated[str, typer.Option(help="default | ultraseg | malunet (the seed papers' recipes).")] = "default",
    epochs: EpochsOpt = None,
    batch_size: BatchOpt = None,
    lr: LrOpt = None,
    seed: SeedOpt = None,
    size: SizeOpt = None,
    compile: Annotated[Optional[bool], typer.Option("--compile/--no-compile", help="torch.compile.")] = None,
    bf16: Annotated[Optional[bool], typer.Option("--bf16/--no-bf16", help="bf16 autocast.")] = None,
    threads: ThreadsOpt = None,
    workers: WorkersOpt = None,
    cache_dir: CacheOpt = None,
    strict: StrictOpt = False,
    data_root: DataRootOpt = None,
    out: OutOpt = Path("runs/train"),
    resume: ResumeOpt = False,
):
    """Train a model; writes last.pt every epoch and best.pt by validation mDice.

    Examples:

        edgeseg train --model ultraseg-108k --epochs 100 --out runs/ultraseg
        edgeseg train --model ultraseg-108k --epochs 100 --out runs/ultraseg --resume
        edgeseg train --model microaunet --train-split seeded:kvasir-seg:4:42:train --out runs/micro
        edgeseg train --data my-frames --weights ultraseg-108k-pranet --epochs 20 --out runs/mine
    """
    _train(recipe, resume, cache_dir, data_root, strict, out, data, model=model, weights=weights,
           train_split=train_split,
           val_split=val_split, val_fraction=val_fraction, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
           size=size, compile=compile, bf16=bf16, threads=threads, workers=workers)


@app.command()
def distill(
    teacher: Annotated[Path, typer.Option(help="Teacher checkpoint: a file or a shipped name (e.g. lite0-seg-pranet) "
                                               "of the student's input size, any normalisation.")],
    student: Annotated[str, typer.Option(help="Student model name.")] = "microaunet",
    recipe: Annotated[str, typer.Option(help="microaunet-2stage | kdas | feature | logit.")] = "microaunet-2stage",
    stage1_epochs: Annotated[Optional[int], typer.Option(help="2-stage: epochs of stage 1 (default 60%).")] = None,
    tau: Annotated[float, typer.Option(help="Temperature of the KL terms.")] = 2.0,
    alpha: Annotated[Optional[float], typer.Option(help="KD weight (default 0.3 for kdas, else 1).")] = None,
    rho: Annotated[float, typer.Option(help="2-stage: weight of the EMA-anchor regulariser.")] = 0.3,
    contrast_weight: Annotated[float, typer.Option(help="2-stage: weight of the pixel contrastive loss.")] = 0.1,
    teacher_cache: Annotated[Optional[Path], typer.Option(help="logit, kdas: keep the teacher's logits of each "
                                                          "training frame here, computed once (no teacher forward "
                                                          "per step).")] = None,
    data: DataOpt = None,
    weights: WeightsOpt = None,
    train_split: TrainSplitOpt = None,
    val_split: ValSplitOpt = None,
    val_fraction: ValFractionOpt = None,
    epochs: EpochsOpt = None,
    batch_size: BatchOpt = None,
    lr: LrOpt = None,
    seed: SeedOpt = None,
    size: SizeOpt = None,
    threads: ThreadsOpt = None,
    workers: WorkersOpt = None,
    cache_dir: CacheOpt = None,
    strict: StrictOpt = False,
    data_root: DataRootOpt = None,
    out: OutOpt = Path("runs/distill"),
    resume: ResumeOpt = False,
):
    """Distil a frozen teacher into a student; checkpoints hold only the student (EMA in stage 2).

    Examples:

        edgeseg distill --teacher runs/ultraseg/best.pt --student microaunet --out runs/kd
        edgeseg distill --teacher runs/ultraseg/best.pt --recipe kdas --tau 4 --out runs/kdas
        edgeseg distill --teacher lite0-seg-pranet --student ultraseg-108k --recipe logit --teacher-cache runs/tc --out runs/kd
    """
    from edgeseg.config import DistillConfig
    from edgeseg.distill import RECIPES

    if recipe not in RECIPES:
        raise EdgesegError(f"unknown distillation recipe {recipe!r}; known: {', '.join(RECIPES)}")
    kd = DistillConfig(teacher=str(teacher), recipe=recipe, stage1_epochs=stage1_epochs, tau=tau, alpha=alpha,
                       rho=rho, contrast_weight=contrast_weight,
                       teacher_cache=str(teacher_cache) if teacher_cache else None)
    _train("default", resume, cache_dir, data_root, strict, out, data, model=student, weights=weights,
           train_split=train_split,
           val_split=val_split, val_fraction=val_fraction, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
           size=size, threads=threads, workers=workers, distill=kd)


@app.command()
def evaluate(
    checkpoint: Annotated[Optional[Path], typer.Argument(help="edgeseg checkpoint, or an exported artefact folder "
                                                         "(run by its own runtime); default: the shipped model.")] = None,
    split: Annotated[Optional[str], typer.Option(help="Split file or name (default: pranet-test-kvasir).")] = None,
    data: Annotated[Optional[Path], typer.Option("--data", help="Evaluate on every pair of your own folder "
                                                 "(images/ and masks/).")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the metrics as JSON.")] = None,
    overlays: Annotated[Optional[Path], typer.Option(help="Write overlays of the worst cases here.")] = None,
    reference: Annotated[Optional[Path], typer.Option(help="Artefact only: the checkpoint it was exported from, "
                                                      "to compare with (default: the shipped checkpoint it was "
                                                      "exported from, if it was).")] = None,
    data_root: DataRootOpt = None,
):
    """Evaluate a checkpoint, or an exported artefact with its own runtime, on a split: table on stdout, JSON and
    worst-case overlays on request.

    Examples:

        edgeseg evaluate --split pranet-test-kvasir
        edgeseg evaluate runs/ultraseg/best.pt --split pranet-test-cvc-clinicdb --json cvc.json --overlays worst/
        edgeseg evaluate art/openvino-int8 --split pranet-test-kvasir --reference runs/ultraseg/best.pt
        edgeseg evaluate runs/mine/best.pt --data my-test-frames
    """
    from edgeseg import api
    from edgeseg.evaluate import write_json_atomic
    from edgeseg.fileio import check_output

    if json_out is not None:
        check_output(json_out, "file", "--json")
    if overlays is not None:
        check_output(overlays, "folder", "--overlays")
    data_root, split = _own_data(data, data_root, split, "--split", "pranet-test-kvasir")
    result = api.evaluate(checkpoint, split, data_root, overlays, reference)
    deployed = result.get("artefact")
    title = f"{result['model']} {deployed['target']} {deployed['precision']} on {split}" if deployed else \
        f"{result['model']} on {split}"
    _print_metrics(result, title)
    if "checkpoint" in result:
        c = result["checkpoint"]
        typer.echo(f"checkpoint {c['file']} in PyTorch: mdice {c['mdice']:.4f}; delta (checkpoint - artefact) "
                   f"{c['delta_mdice']:+.4f}")
    if json_out:
        write_json_atomic(result, json_out)


@app.command()
def models():
    """List the model zoo with parameter counts and MACs at 256x256.

    Examples:

        edgeseg models
    """
    from rich.console import Console
    from rich.table import Table

    from edgeseg.models import count_macs, count_params, count_params_thop, create_model, list_models

    table = Table("model", "parameters()", "thop-style", "GMACs @256")
    for name in list_models():
        m = create_model(name)
        table.add_row(name, f"{count_params(m):,}", f"{count_params_thop(m):,}", f"{count_macs(m) / 1e9:.3f}")
    Console().print(table)


@app.command()
def weights():
    """List the checkpoints shipped with edgeseg: name (usable wherever a checkpoint is taken, e.g. `edgeseg
    evaluate ultraseg-108k-pranet`), model, parameters and their measured test mDice.

    Examples:

        edgeseg weights
    """
    from rich.console import Console
    from rich.table import Table

    from edgeseg.checkpoint import load_model, shipped_weights
    from edgeseg.models import count_params

    splits = {"pranet-test-kvasir": "Kvasir test mDice", "pranet-test-cvc-clinicdb": "CVC-ClinicDB test mDice"}
    table = Table("name", "model", "parameters()", *splits.values())
    notes = []
    for name, path in shipped_weights().items():
        model, _, ckpt = load_model(path)
        card = path.with_suffix(".json")
        info = json.loads(card.read_text()) if card.is_file() else {}
        scores = info.get("test_mdice", {})
        table.add_row(name, ckpt["model"], f"{count_params(model):,}",
                      *(f"{scores[s]:.4f}" if s in scores else "-" for s in splits))
        notes += [f"{name}: {info['description']}"] if "description" in info else []
        notes += [f"  measured: {info['measured']}"] if "measured" in info else []
    console = Console(width=max(Console().width, 120))
    console.print(table)
    for line in notes:
        console.print(line, highlight=False)


@app.command("import-weights")
def import_weights(
    model: Annotated[str, typer.Argument(help="Architecture of the released weights (ultraseg-130k).")],
    weights: Annotated[Path, typer.Argument(help="The released state_dict (.pth).")],
    out: Annotated[Path, typer.Option(help="edgeseg checkpoint to write.")],
):
    """Convert released UltraSeg weights into an edgeseg checkpoint (explicit key map, strict load).

    Examples:

        edgeseg import-weights ultraseg-130k ultraseg-130k-authors.pth --out ultraseg-130k.pt
    """
    from edgeseg.models.authors import import_released

    typer.echo(import_released(model, weights, out))


@app.command()
def predict(
    model: Annotated[Path, typer.Argument(help="Checkpoint (.pt) or exported artefact folder.")],
    source: Annotated[Path, typer.Argument(help="Image, folder of images, or video.")],
    out: Annotated[Path, typer.Option(help="Output folder: masks/, overlays/ (for a video: the overlay and mask "
                                        "videos plus lossless masks/frame_NNNNNN.png), latency.csv.")] = Path("pred"),
    threshold: Annotated[Optional[float], typer.Option(help="Probability above which a pixel is polyp, in (0, 1) "
                                                       "(default: the model's input contract, 0.5).")] = None,
    threads: Annotated[Optional[int], typer.Option(help="Inference threads (torch or the artefact's runtime; "
                                                   "default: the runtime's).")] = None,
):
    """Segment an image, a folder or a video with a checkpoint or an artefact.

    Overlays draw the predicted contour in yellow, with a legend ("prediction") in the top-left corner.
    A progress bar goes to stderr when it is a terminal.

    Examples:

        edgeseg predict art/openvino-cpu frames/ --out pred/
        edgeseg predict runs/ultraseg/best.pt clip.mp4 --out pred-clip/

        edgeseg predict best.pt frames/ --threshold 0.4 --threads 2
    """
    from edgeseg.fileio import check_output
    from edgeseg.predict import check_threshold, predict_path
    from edgeseg.profiling import check_threads

    if threshold is not None:
        check_threshold(threshold)
    check_threads(threads, "the runtime's default")
    check_output(out, "folder")
    logits_fn, contract = _load_for_inference(model, threads)
    summary = predict_path(logits_fn, contract, source, out, threshold=threshold)
    typer.echo(f"{summary['frames']} frame(s), model p50 {summary['infer_ms_p50']:.2f} ms, end-to-end "
               f"{summary['end_to_end_fps']:.1f} FPS -> {out}")


@app.command()
def profile(
    artefact: Annotated[Path, typer.Argument(help="Exported artefact folder (needs only its runtime).")],
    threads: Annotated[Optional[int], typer.Option(help="Runtime threads (default: the target's).")] = None,
    pin_core: Annotated[Optional[int], typer.Option(help="Pin the process to this CPU core.")] = None,
    warmup: Annotated[Optional[int], typer.Option(help="Warm-up runs (default: the target's).")] = None,
    runs: Annotated[Optional[int], typer.Option(help="Timed runs (default: the target's).")] = None,
    duration: Annotated[Optional[float], typer.Option(help="Time for this many seconds instead of --runs.")] = None,
    end_to_end: Annotated[Optional[Path], typer.Option(help="Also time decode..overlay on this video/folder.")] = None,
    device: Annotated[Optional[str], typer.Option(help="Runtime device (default: the artefact's).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Also write the JSON record, with every sample, to this "
                                                "file.")] = None,
):
    """Latency of an artefact on this machine: a table, then one JSON object as the last stdout line.

    Examples:

        edgeseg profile art/openvino-cpu
        edgeseg profile art/openvino-cpu --threads 1 --pin-core 2 --warmup 50 --runs 500
        edgeseg profile art/onnx --duration 10 --end-to-end clip.mp4 --out profile.json
    """
    from edgeseg.fileio import check_output, write_atomic
    from edgeseg.profiling import check_timing_options, profile_artefact

    check_timing_options(runs, warmup, duration, threads, pin_core)
    if out is not None:
        check_output(out)
    r = profile_artefact(artefact, threads, pin_core, warmup, runs, duration, end_to_end, device)
    if out is not None:
        write_atomic(out, json.dumps(r, indent=2, default=str) + "\n")
    rows = [("model only", r["model_only"])] + ([("end to end", r["end_to_end"])] if "end_to_end" in r else [])
    for label, s in rows:
        typer.echo(f"{label:11} p50 {s['p50_ms']:.3f} ms  p90 {s['p90_ms']:.3f}  p99 {s['p99_ms']:.3f}  max "
                   f"{s['max_ms']:.3f}  mean {s['mean_ms']:.3f} +/- {s['std_ms']:.3f}  {s['fps']:.1f} FPS  n={s['n']}",
                   err=True)
    typer.echo(f"load+compile {r['load_compile_ms']:.1f} ms, first inference {r['first_inference_ms']:.2f} ms, "
               f"peak RSS {r['peak_rss_mb']:.0f} MB, throttled {r['throttled']}", err=True)
    typer.echo(json.dumps({k: v for k, v in r.items() if k != "samples_ms"}, default=str))


PubkeyOpt = Annotated[Optional[Path], typer.Option(help="Ed25519 public key (KEY.pub from `edgeseg keygen`): "
                                                   "refuse a bundle not signed with it.")]
BundleArg = Annotated[Path, typer.Argument(help="Bundle (.tar.gz).")]


@app.command()
def keygen(
    out: Annotated[Path, typer.Option(help="Private key to write (PEM, mode 0600); the public key goes to OUT.pub.")],
):
    """Make an Ed25519 key pair for `bundle --sign` and `verify/selftest/unpack --pubkey`; never overwrites.

    Examples:

        edgeseg keygen --out keys/unit          # keys/unit (private, 0600) and keys/unit.pub
    """
    from edgeseg.bundle import generate_key

    private, public, fingerprint = generate_key(out)
    typer.echo(f"private key {private} (keep it on the signing host), public key {public} (sha256 {fingerprint})")


@app.command()
def bundle(
    artefact: Annotated[Path, typer.Argument(help="Exported artefact folder (with parity.json).")],
    out: Annotated[Path, typer.Option(help="Bundle to write (.tar.gz).")],
    golden: Annotated[Optional[Path], typer.Option(help="Golden frame (default: the first parity frame).")] = None,
    sign: Annotated[Optional[Path], typer.Option(help="Sign with this Ed25519 private key (`edgeseg keygen`).")] = None,
    data_root: DataRootOpt = None,
):
    """Pack an artefact that passed its parity gate, its contract, parity record, a golden input/output and a
    sha256 manifest (signed with --sign).

    Examples:

        edgeseg bundle art/openvino-cpu --out unit.tar.gz --sign keys/unit
    """
    from edgeseg.bundle import check_out, load_private_key, make_bundle, read_artefact, read_bundle
    from edgeseg.data.io import read_rgb

    key = load_private_key(sign) if sign is not None else None
    check_out(out)
    _, parity = read_artefact(artefact)
    if golden is None:
        from edgeseg.data.splits import image_path, resolve_data_root

        if not parity["ids"]:
            raise EdgesegError(f"{artefact} has no parity frames recorded; pass --golden IMAGE")
        root = resolve_data_root(data_root)
        golden = image_path(root, parity["ids"][0])
        if not golden.is_file():  # e.g. an artefact of the user's own folder, bundled without naming it
            raise EdgesegError(f"the golden frame (the first parity frame, {parity['ids'][0]}) is not under {root}; "
                               f"pass --data-root (the folder that holds {parity['ids'][0].split('/')[0]}/) or "
                               "--golden IMAGE")
    path = make_bundle(artefact, out, read_rgb(golden), key)
    written = read_bundle(path, key.public_key() if key is not None else None)
    typer.echo(f"{path} (manifest sha256 {written.manifest_sha256}), {written.authenticity}")


@app.command()
def verify(
    bundle_file: BundleArg,
    manifest_sha256: Annotated[Optional[str], typer.Option(help="Also require this manifest sha256.")] = None,
    pubkey: PubkeyOpt = None,
):
    """Check the archive, the manifest and every file's sha256 offline (and the signature with --pubkey);
    any change exits 2.

    Examples:

        edgeseg verify unit.tar.gz --pubkey keys/unit.pub
    """
    from edgeseg.bundle import load_public_key, read_bundle

    b = read_bundle(bundle_file, load_public_key(pubkey) if pubkey is not None else None)
    if manifest_sha256 is not None and b.manifest_sha256 != manifest_sha256.lower():
        raise EdgesegError(f"{bundle_file}: manifest sha256 {b.manifest_sha256} is not the expected {manifest_sha256}")
    m = b.manifest
    typer.echo(f"verified {len(b.files)} files: {m['target']} {m['precision']} {m['model']}, "
               f"edgeseg {m['edgeseg_version']}")
    typer.echo(b.authenticity)


@app.command()
def unpack(
    bundle_file: BundleArg,
    dest: Annotated[Path, typer.Argument(help="New or empty folder to write the files into.")],
    pubkey: PubkeyOpt = None,
):
    """Verify a bundle, then write only its manifest's files (and the manifest) into DEST, a new or empty
    folder; no tar needed.

    Examples:

        edgeseg unpack unit.tar.gz unit/ --pubkey keys/unit.pub
    """
    from edgeseg.bundle import load_public_key, unpack_bundle

    b, folder = unpack_bundle(bundle_file, dest, load_public_key(pubkey) if pubkey is not None else None)
    typer.echo(f"unpacked {len(b.files)} files into {folder}; {b.authenticity}")


@app.command()
def selftest(
    bundle_file: BundleArg,
    target: Annotated[Optional[str], typer.Option(help="The target this device runs; other bundles are refused.")] = None,
    pubkey: PubkeyOpt = None,
):
    """On the device: verify, load with the runtime, run the golden input, print PASS or FAIL (exit 1).

    Examples:

        edgeseg selftest unit.tar.gz --target openvino-cpu --pubkey keys/unit.pub
    """
    from edgeseg.bundle import load_public_key
    from edgeseg.bundle import selftest as run_selftest

    r = run_selftest(bundle_file, target, load_public_key(pubkey) if pubkey is not None else None)
    typer.echo(f"{'PASS' if r['passed'] else 'FAIL'} {r['target']} {r['precision']}: mask agreement "
               f"{r['mask_agreement']:.5f}, max |logit diff| {r['max_abs_logit_diff']:.2e} (tolerance {r['tolerance']})")
    typer.echo(r["authenticity"])
    if not r["passed"]:
        raise typer.Exit(1)


@app.command()
def benchmark(
    checkpoint: CkptArg = None,
    targets: Annotated[str, typer.Option(help="Comma-separated target ids, or all.")] = "all",
    out: Annotated[Path, typer.Option(help="Folder for artefacts, benchmark.md/csv/json and plots.")] = Path("benchmark"),
    calib: Annotated[Optional[Path], typer.Option(help="Calibration manifest for int8 (default: the shipped one).")] = None,
    runs: Annotated[Optional[int], typer.Option(help="Timed runs per artefact (default: each target's).")] = None,
    warmup: Annotated[Optional[int], typer.Option(help="Warm-up runs per artefact (default: each target's).")] = None,
    threads: Annotated[Optional[int], typer.Option(help="Runtime threads (default: each target's).")] = None,
    duration: Annotated[Optional[float], typer.Option(help="Time each artefact for this many seconds instead "
                                                      "of --runs.")] = None,
    pin_core: Annotated[Optional[int], typer.Option(help="Pin the timing (not the exports) to this CPU "
                                                    "core.")] = None,
    models: Annotated[Optional[str], typer.Option(help="Comma-separated checkpoints (files or shipped names) "
                                                  "to compare, instead of CKPT; artefacts in OUT/<model>/.")] = None,
    test_split: Annotated[Optional[str], typer.Option(help="Also score every artefact on these comma-separated "
                                                      "splits with its own runtime; the plots use the first.")] = None,
    data_root: DataRootOpt = None,
):
    """Export, parity-check and profile every target this host can run; table + Pareto plot(s).

    Examples:

        edgeseg benchmark --targets all --out bench/
        edgeseg benchmark runs/ultraseg/best.pt --targets onnx,openvino-cpu --runs 100 --warmup 10 --out bench/
        edgeseg benchmark --models ultraseg-108k-pranet,lite0-seg-pranet --test-split pranet-test-kvasir --out b/
    """
    from edgeseg.benchmark import markdown, run_benchmark

    model_list = _comma_list(models, "--models")
    splits = _comma_list(test_split, "--test-split") or []
    rows = run_benchmark(checkpoint, _comma_list(targets, "--targets"), out, data_root, calib, runs, warmup,
                         threads, duration, pin_core, model_list, splits)
    typer.echo(markdown(rows, splits))


def _comma_list(value: str | None, option: str) -> list[str] | None:
    """``a,b`` -> [a, b]; an empty item (``a,,b``, a trailing comma) is refused with one line."""
    if value is None:
        return None
    items = [v.strip() for v in value.split(",")]
    if not all(items):
        raise EdgesegError(f"{option} has an empty item in {value!r}; separate names with single commas")
    return items


@app.command()
def setup(
    what: Annotated[str, typer.Argument(help="tflite (the isolated litert-torch converter env)")],
):
    """One-time installs that do not belong in the main environment (explicit, never at export time), under
    $EDGESEG_CACHE (default ~/.cache/edgeseg).

    Examples:

        edgeseg setup tflite
    """
    if what == "tflite":
        from edgeseg.export.tflite import setup_litert_env

        setup_litert_env(progress=typer.echo)
    else:
        raise EdgesegError(f"unknown setup {what!r}; use tflite")


def _load_for_inference(path: Path, threads: int | None = None):
    """(numpy logits function, input contract) of a checkpoint (torch) or an artefact (its own runtime)."""
    from edgeseg.api import load

    model = load(path, threads)
    return model.logits, model.contract


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
    except ModuleNotFoundError as e:  # a runtime-only (device) install running a host command
        if e.name != "torch" or os.environ.get("EDGESEG_DEBUG"):
            raise
        print("error: this command needs PyTorch, which this runtime-only install lacks: "
              "pip install 'edgeseg[torch]' (profile, predict on an artefact, bundle, verify and selftest "
              "run without it)", file=sys.stderr)
        sys.exit(2)



# --- deployment: target registry, calibration manifests, export -------------------------------------------

calib_app = typer.Typer(no_args_is_help=True, help="Calibration manifests for int8 exports.")
app.add_typer(calib_app, name="calib")


@app.command()
def targets():
    """List the deployment targets (one targets/<id>.toml each); * marks the default precision.

    Examples:

        edgeseg targets
    """
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from edgeseg.targets import list_targets

    table = Table("target", "backend", "device", "precisions", "artefact", "runtime")
    for t in list_targets():
        precisions = " ".join(p + ("*" if p == t.precision else "") for p in t.precisions)
        table.add_row(t.id, t.backend, t.device, precisions, t.artefact, escape(t.runtime.install))
    Console(width=max(Console().width, 120)).print(table)


@calib_app.command("make")
def calib_make(
    split: Annotated[Optional[str], typer.Option(help="Split to draw from, minus its carved validation part "
                                                 "(default: pranet-train).")] = None,
    data: Annotated[Optional[Path], typer.Option("--data", help="Draw from your own folder (images/ and masks/) "
                                                 "instead of a split.")] = None,
    n: Annotated[int, typer.Option(help="Number of images.")] = 300,
    exclude_split: Annotated[Optional[list[str]], typer.Option(help="Also exclude these splits (repeatable).")] = None,
    val_fraction: Annotated[float, typer.Option(help="Validation fraction carved as training does.")] = 0.1,
    seed: Annotated[int, typer.Option(help="Seed of the validation carve and of the draw.")] = 42,
    out: Annotated[Path, typer.Option(help="Manifest to write (calibration/NAME.json).")] = ...,
    data_root: DataRootOpt = None,
):
    """Write a calibration manifest: image ids + sha256 + source split (never the images).

    Examples:

        edgeseg calib make --split pranet-train --n 300 --out calibration/my-300.json
    """
    from edgeseg.calibration import make_manifest, write_manifest
    from edgeseg.data import resolve_data_root

    data_root, split = _own_data(data, data_root, split, "--split", "pranet-train")
    manifest = make_manifest(split, resolve_data_root(data_root), n=n, exclude=tuple(exclude_split or ()),
                             val_fraction=val_fraction, seed=seed)
    typer.echo(f"{len(manifest['images'])} images from {split} -> {write_manifest(manifest, out)}")


def _by_precision(field: str) -> str:
    """The parity table's default of ``field`` per precision, for option help: "fp32 0.001, fp16 0.003, ..."."""
    from edgeseg.tolerances import PARITY

    return ", ".join(f"{p} {getattr(b, field):g}" for p, b in PARITY.items())


@app.command("export")
def export_artefact(
    checkpoint: CkptArg = None,
    target: Annotated[str, typer.Option(help="Target id; see `edgeseg targets`.")] = ...,
    precision: Annotated[Optional[str], typer.Option(help="fp32 | fp16 | int8 (default: the target's).")] = None,
    calib: Annotated[Optional[Path], typer.Option(help="Calibration manifest (int8).")] = None,
    max_dice_drop: Annotated[Optional[float], typer.Option(help="OpenVINO int8: accuracy-controlled "
                                                           "quantization, max mDice drop on the parity split.")] = None,
    parity_split: Annotated[Optional[str], typer.Option(help="Parity frames (default: the checkpoint's own first "
                                                        "100 validation frames, else 100 carved from "
                                                        "pranet-train, seed 42).")] = None,
    max_image_drop: Annotated[Optional[float], typer.Option(help="Parity budget on the worst single frame's "
                                                            f"Dice loss (default by precision: "
                                                            f"{_by_precision('max_image_drop')}).")] = None,
    max_delta: Annotated[Optional[float], typer.Option(help="Parity budget on mDice (default by precision: "
                                                       f"{_by_precision('max_delta')}).")] = None,
    out: Annotated[Path, typer.Option(help="Artefact folder to write.")] = ...,
    data_root: DataRootOpt = None,
):
    """Export a checkpoint for a target and gate it on parity with PyTorch (exit 3 when over budget).

    Examples:

        edgeseg export --target openvino-cpu --out art/openvino-cpu
        edgeseg export runs/ultraseg/best.pt --target onnx --out art/onnx
        edgeseg export --target openvino-cpu --precision int8 --calib calibration/pranet-train-300.json --out ov-int8
    """
    from edgeseg.export import ParityFailure, export
    from edgeseg.export.parity import summary_line

    try:
        result = export(checkpoint, target, out, precision=precision, calib=calib, parity_split=parity_split,
                        max_delta=max_delta, max_image_drop=max_image_drop, max_dice_drop=max_dice_drop,
                        data_root=data_root)
    except ParityFailure as e:
        print(f"error: {e}", file=sys.stderr)
        raise typer.Exit(3)
    kept = result.config["backend_config"].get("kept_float")
    if kept is not None:
        typer.echo(f"kept in float by accuracy control ({len(kept)}): {', '.join(kept) or 'none'}")
    typer.echo(f"parity ok, {summary_line(result.config['target'], result.config['precision'], result.parity)}")
    typer.echo(result.path)


@app.command("build-engine")
def build_engine_cmd(
    artefact: Annotated[Path, typer.Argument(help="tensorrt-jetson artefact folder (from `edgeseg export`).")],
    timing_cache: Annotated[Optional[Path], typer.Option(help="TensorRT timing cache: loaded if present, "
                                                         "saved after the build.")] = None,
    workspace: Annotated[Optional[int], typer.Option(help="Builder workspace limit in MB (default: "
                                                     "TensorRT's).")] = None,
):
    """On the Jetson: build model.engine + model.engine.json from the artefact's ONNX and run its golden check
    (exit 1 on FAIL).

    Examples:

        edgeseg build-engine art/tensorrt-jetson --timing-cache trt-timing.cache
    """
    from edgeseg.export.tensorrt_engine import build_engine

    r = build_engine(artefact, timing_cache=timing_cache, workspace_mb=workspace)
    g = r["golden_check"]
    typer.echo(f"{'PASS' if g['passed'] else 'FAIL'} golden check {r['precision']}: mask agreement "
               f"{g['mask_agreement']:.5f}, max |logit diff| {g['max_abs_logit_diff']:.3g} (tolerance "
               f"{g['tolerance']}); TensorRT {r['tensorrt']}, {r['gpu']} (sm {r['compute_capability']}), "
               f"built in {r['build_s']} s -> {artefact / r['engine']}")
    if not g["passed"]:
        raise typer.Exit(1)


if __name__ == "__main__":
    main()
