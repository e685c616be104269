"""The `cxrkeras` command line: options → config → one library call; heavy imports happen inside commands."""

import os
import sys

import click

from cxrkeras import __version__
from cxrkeras.constants import (CHANNELS, ENCODINGS, EQUALIZE, HEATMAP_METHODS, PATIENT_SEXES, PATIENT_VIEWS, PREPROCESSING,
                                RECORD_FORMATS, STAGES, THRESHOLD_METHODS, VERIFY_MODES)
from cxrkeras.errors import CxrError

# TensorFlow's C++ start-up chatter (oneDNN, CPU features) hides the commands' own output: its log level raised and
# (`main`) its import-time notices filtered out, unless the user set TF_CPP_MIN_LOG_LEVEL (then TF logs as asked).
_TF_LOG_LEVEL_GIVEN = "TF_CPP_MIN_LOG_LEVEL" in os.environ
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _choice(values):
    """click.Choice of a constants tuple (numbers as their text, as typed on the command line)."""
    return click.Choice([str(v) for v in values])


def _run_or_model(run_dir, model_path):
    """The one of --run / --model that was given; a usage error for none or both."""
    if bool(run_dir) == bool(model_path):
        raise click.UsageError("give exactly one of --run RUN_DIR or --model PATH")
    return run_dir or model_path


def _stacked(options):
    """A decorator applying click `options` in the order listed (as written above a command)."""
    def apply(command):
        for option in reversed(options):
            command = option(command)
        return command
    return apply


_bootstrap_options = _stacked([  # the patient bootstrap of evaluate, compare and reproduce
    click.option("--n-boot", default=1000, show_default=True, type=click.IntRange(0, 100_000),
                 help="Bootstrap resamples by patient for the AUC confidence intervals (paired in comparisons)."),
    click.option("--seed", default=0, show_default=True, type=int, help="Bootstrap seed."),
    click.option("--min-patients", default=5, show_default=True, type=click.IntRange(1, 1000),
                 help="A label whose positives (or negatives) come from fewer patients is not estimable: no CI, "
                      "left out of the mean."),
])

_patient_options = _stacked([  # one patient for every file, or --patient-csv, for models with patient features
    click.option("--age", type=click.FloatRange(min=0), help="Patient age in years (models with patient "
                 "features; with --sex and --view, for every file)."),
    click.option("--sex", type=click.Choice(PATIENT_SEXES, case_sensitive=False), help="Patient sex."),
    click.option("--view", type=click.Choice(PATIENT_VIEWS, case_sensitive=False), help="View position."),
    click.option("--patient-csv", type=click.Path(exists=True, dir_okay=False),
                 help="Age, sex and view per file name: NIH's Data_Entry CSV, or columns image, age, sex, view."),
])


def _patient(age, sex, view):
    """(age, sex, view) when given together, None when none is; a usage error for some of them."""
    given = [v is not None for v in (age, sex, view)]
    if any(given) and not all(given):
        raise click.UsageError("give --age, --sex and --view together (or --patient-csv)")
    return (age, sex.upper(), view.upper()) if all(given) else None


def _fusion_options(command):
    """--mask-model, --fusion-lambda and --fusion-sigma: Grad-CAM fused with a U-Net's lung mask."""
    options = [
        click.option("--mask-model", type=click.Path(exists=True),
                     help="A U-Net from `cxrkeras train-segmentation` (its folder or unet.keras): fuse its lung mask "
                          "with Grad-CAM, F = lambda * mask + (1 - lambda) * Grad-CAM."),
        click.option("--fusion-lambda", default=0.5, show_default=True, type=click.FloatRange(0, 1),
                     help="Weight of the mask in the fused map."),
        click.option("--fusion-sigma", default=0.0, show_default=True, type=click.FloatRange(0, 256),
                     help="Gaussian smoothing of the mask before fusion, in pixels of the image (0: none)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except CxrError as exc:
            raise click.ClickException(str(exc)) from exc


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cxrkeras")
def cli():
    """Chest X-ray classification with LKA attention (NIH ChestX-ray14), Keras 3 / TensorFlow."""


# --- commands (each: options -> config -> one library call) ---


@cli.command("models")
@click.argument("variants", nargs=-1)
@click.option("--image-size", default=224, show_default=True, type=click.IntRange(min=1),
              help="Square input size the GFLOPs are counted at.")
@click.option("--num-classes", default=14, show_default=True, type=click.IntRange(min=1))
@click.option("--head", type=click.Choice(["linear", "fpsm"]), default="linear", show_default=True,
              help="fpsm: the Feature Pyramid Sum head (per-level GAP -> Dense logits, summed).")
@click.option("--head-stages", default="4+3+2", show_default=True, help="FPSM pyramid levels, e.g. 4+3+2+1.")
@click.option("--head-merge", type=click.Choice(["sum", "concat"]), default="sum", show_default=True)
@click.option("--head-dataset-embedding", "n_datasets", type=click.IntRange(0, 64), default=0, show_default=True,
              metavar="N", help="FPSM: a dataset-id input of N source datasets, Embedding(N, N) appended to each "
                                "level's features (0: none).")
def models_cmd(variants, image_size, num_classes, head, head_stages, head_merge, n_datasets):
    """List model variants (or only VARIANTS): trainable parameters, GMACs and the paper's GFLOPs (fvcore's count)."""
    from cxrkeras.models.summary import format_table, variant_rows

    options = dict(head=head, head_stages=head_stages, head_merge=head_merge) if head == "fpsm" else {}
    if n_datasets:
        if head != "fpsm":
            raise click.UsageError("--head-dataset-embedding goes with --head fpsm")
        options["head_dataset_embedding"] = n_datasets
    skipped = {}
    click.echo(format_table(variant_rows(variants or None, image_size, num_classes, skipped, **options), image_size))
    for name, reason in skipped.items():
        click.echo(f"{name}: not listed: {reason}")


@cli.command("preview-batch")
@click.argument("records", type=click.Path(file_okay=False))
@click.option("--split", default="train", show_default=True, help="Split of the records folder.")
@click.option("--stage", default=1, show_default=True, type=_choice(STAGES),
              help="1: 'No Finding' images removed; 2: all images.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="PNG file to write.")
@click.option("--n", "n", default=16, show_default=True, type=click.IntRange(min=1), help="Images in the grid.")
@click.option("--model", "model_path", type=click.Path(exists=True),
              help="A run folder or .keras file: show the batch through its preprocessing (image size, "
                   "equalisation, normalisation).")
@click.option("--image-size", type=click.IntRange(min=8), help="[default: the model's, else 224]")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--preprocessing", type=_choice(PREPROCESSING),
              help="Normalisation to apply and undo for display [default: the model's, else torch]; the picture "
                   "is the same either way.")
@click.option("--equalize", type=_choice(EQUALIZE), help="Contrast equalisation [default: the model's, else none].")
@click.option("--eval-view", is_flag=True, help="Show the deterministic eval transform instead of augmentation.")
@click.option("--dadam", is_flag=True, help="Show the records' DADAM images (training split, eval view) with the "
              "boxes of their patches.")
@click.option("--online-dadam", "online_boxes", type=click.Path(dir_okay=False),
              help="Show online DADAM (data.dadam) with this box file: training split, eval view, each patch's box "
                   "drawn.")
@click.option("--dadam-probability", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True),
              help="--online-dadam: data.dadam.probability (1: every eligible image gets a patch).")
@click.option("--tail-labels", help="--online-dadam: 'A,B' data.dadam.tail_labels [default: the rarest labels].")
def preview_batch_cmd(records, split, stage, out, n, model_path, image_size, seed, preprocessing, equalize,
                      eval_view, dadam, online_boxes, dadam_probability, tail_labels):
    """Write a PNG grid of one augmented training batch of RECORDS with each image's labels."""
    from cxrkeras.data.preview import preview_batch

    online = None
    if online_boxes:
        from cxrkeras.config import DadamConfig

        online = DadamConfig(boxes=online_boxes, probability=dadam_probability, tail_labels=[
            t.strip() for t in tail_labels.split(",") if t.strip()] if tail_labels else None)
    elif tail_labels:
        raise click.UsageError("--tail-labels goes with --online-dadam")
    path = preview_batch(records, out, split=split, stage=int(stage), n=n, image_size=image_size, seed=seed,
                         preprocessing=preprocessing, training=not eval_view, equalize=equalize, model=model_path,
                         dadam=dadam, online_dadam=online)
    click.echo(f"wrote {path}")


class _VariantType(click.ParamType):
    """A registered model variant; the list is read from the registry only when the option is used."""

    name = "variant"

    def _names(self):
        from cxrkeras.models.registry import list_variants

        return list_variants()

    def convert(self, value, param, ctx):
        import difflib

        names = self._names()
        if value in names:
            return value
        close = difflib.get_close_matches(str(value), names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        self.fail(f"unknown variant {value!r}{hint}; choose one of: {', '.join(names)}", param, ctx)

    def shell_complete(self, ctx, param, incomplete):
        from click.shell_completion import CompletionItem

        return [CompletionItem(n) for n in self._names() if n.startswith(incomplete)]


@cli.command("convert-weights")
@click.argument("src", type=click.Path(exists=True, dir_okay=False))
@click.option("--variant", required=True, type=_VariantType(),
              help="The model the checkpoint is for (see `cxrkeras models`).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Keras weights file to write (NAME.h5).")
@click.option("--num-classes", type=click.IntRange(1, 10_000),
              help="Outputs of the head [default: the checkpoint's head, else 14].")
@click.option("--checkpoint-labels", metavar="paper|nih|A,B,...",
              help="Output order of the checkpoint's head [default: the paper's order for files in its layout].")
def convert_weights_cmd(src, variant, out, num_classes, checkpoint_labels):
    """Convert a PyTorch checkpoint SRC (torchvision, timm, the paper's modules, fastai) into a Keras .h5 once;
    then `--weights FILE.h5` needs no torch. Prints how every tensor was mapped."""
    from cxrkeras.models.torch_checkpoint import convert_weights, format_report

    report = convert_weights(src, variant, out, num_classes=num_classes, weights_labels=checkpoint_labels)
    click.echo(format_report(report))
    click.echo(f"wrote {report['out']}: {len(report['layers'])} layers for {variant} "
               f"({report['num_classes']} outputs; source sha256 {report['sha256'][:16]}...)")


@cli.command("train")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="YAML file overriding the defaults (configs/*.yaml).")
@click.option("--stage", required=True, type=_choice(STAGES),
              help="1: BCE on images with a finding; 2: focal loss on all images, from stage 1's best.")
@click.option("--epochs", type=click.IntRange(min=1), help="train.epochs")
@click.option("--batch-size", type=click.IntRange(min=1), help="data.batch_size (global, over all replicas)")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), help="optim.lr")
@click.option("--records", type=click.Path(file_okay=False), help="data.records: folder made by build-records")
@click.option("--run-dir", type=click.Path(file_okay=False), help="run.root (default runs/)")
@click.option("--name", help="run.name: the run folder is <run-dir>/<name>/stage1|stage2")
@click.option("--variant", type=_VariantType(), help="model.variant (see `cxrkeras models`)")
@click.option("--weights", help="model.weights: imagenet, torchvision, none, a Keras weights file or a PyTorch "
                                "checkpoint (.pth/.pt/.bin/.safetensors) (stage 1)")
@click.option("--init", metavar="PATH|none",
              help="stage 2: start from this .keras instead of stage 1's best.keras of the run; `none`: skip "
                   "stage 1 and start from model.weights (one-stage training, single-label tasks)")
@click.option("--image-size", type=click.IntRange(min=32), help="data.image_size")
@click.option("--mixed-precision/--no-mixed-precision", default=None,
              help="train.mixed_precision on/off (default auto: on when a GPU is used)")
@click.option("--xla", is_flag=True, default=None, help="train.xla: compile the train step with XLA")
@click.option("--overwrite", is_flag=True, default=None, help="replace a run folder that holds another config")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="any config key, e.g. --set optim.schedule=cosine --set loss.gamma=1.5 (repeatable)")
def train_cmd(config_path, stage, epochs, batch_size, lr, records, run_dir, name, variant, weights, init,
              image_size, mixed_precision, xla, overwrite, sets):
    """Train one stage; re-run the same command after an interruption to resume."""
    from cxrkeras.config import load_config
    from cxrkeras.training import train

    options = {
        "train": {"epochs": epochs, "xla": xla,
                  "mixed_precision": None if mixed_precision is None else ("on" if mixed_precision else "off")},
        "data": {"batch_size": batch_size, "records": records, "image_size": image_size},
        "optim": {"lr": lr},
        "run": {"root": run_dir, "name": name, "overwrite": overwrite},
        "model": {"variant": variant, "weights": weights},
    }
    options = {section: {k: v for k, v in values.items() if v is not None} for section, values in options.items()}
    train(load_config(config_path, options, sets), int(stage), init=init, log=click.echo)


@cli.command("lr-find")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="The stage's YAML config.")
@click.option("--stage", required=True, type=_choice(STAGES), help="The stage whose model, data and loss are swept.")
@click.option("--records", type=click.Path(file_okay=False), help="data.records")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder for lr_find.png and lr_find.json.")
@click.option("--init", metavar="PATH|none", help="stage 2: the .keras to start from (default: stage 1's best of "
                                                  "the run), or none (model.weights)")
@click.option("--steps", type=click.IntRange(6, 10_000), help="Steps of the sweep [default: optim.lr_find_steps].")
@click.option("--start-lr", default=1e-7, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--end-lr", default=10.0, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Any config key (repeatable).")
def lr_find_cmd(config_path, stage, records, out_dir, init, steps, start_lr, end_lr, sets):
    """fastai's LR finder: an exponential learning-rate sweep on the stage's model (as its first phase trains it),
    the loss-vs-LR plot, the valley and steepest-point suggestions; the weights are restored afterwards."""
    from cxrkeras.config import load_config
    from cxrkeras.training.trainer import find_learning_rate

    if not start_lr < end_lr:
        raise click.UsageError(f"--start-lr {start_lr:g} must be below --end-lr {end_lr:g}")
    config = load_config(config_path, {"data": {"records": records}} if records else None, sets)
    result = find_learning_rate(config, int(stage), out_dir, init=init, steps=steps, start_lr=start_lr,
                                end_lr=end_lr, log=click.echo)
    for rule in ("valley", "steep"):
        lr = result.suggestions[rule]
        click.echo(f"{rule:>6}: {'none' if lr is None else f'{lr:.3g}'}")
    click.echo(f"{len(result.lrs)} steps from {result.lrs[0]:.2g} to {result.lrs[-1]:.2g} ({result.stopped}); "
               f"weights restored: {'yes' if result.weights_restored else 'NO'}")
    if result.note:
        click.echo(f"note: {result.note}")
    click.echo(f"written: {', '.join(result.files)}")


@cli.command("reproduce")
@click.option("--grid", "grid_name", default="paper", show_default=True, type=click.Choice(["paper"]),
              help="paper: Table 4's 12 runs and Table 5's placements (16 runs; Table 2 is its best model).")
@click.option("--records", required=True, type=click.Path(file_okay=False), help="Records made by build-records.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Output folder: runs/<run>/, tables.md, comparisons/.")
@click.option("--only", metavar="RUN[,RUN...]", help="Only these runs (names or shell patterns, e.g. 'vgg16*').")
@click.option("--dry-run", is_flag=True, help="Print the plan, each run's state and an estimate of the device hours "
                                              "from a measured step time; run nothing.")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64),
              help="1: one run at a time on all GPUs (MirroredStrategy); N: N runs at once, one process per GPU.")
@click.option("--set", "sets", multiple=True, metavar="[RUN-PATTERN:]KEY=VALUE",
              help="A config key for every run, or for the runs matching the pattern (repeatable), e.g. "
                   "--set 'vgg16*:data.batch_size=16'.")
@click.option("--configs", "configs_dir", type=click.Path(file_okay=False),
              help="The paper configs [default: configs/paper of this checkout].")
@_bootstrap_options
@click.option("--measure-steps", default=3, show_default=True, type=click.IntRange(0, 100),
              help="--dry-run: training steps timed per model for the estimate (0: no estimate).")
@click.option("--verify-records", default="sha256", show_default=True, type=_choice(VERIFY_MODES),
              help="How the records are checked against their manifest once, before the grid.")
def reproduce_cmd(grid_name, records, out_dir, only, dry_run, workers, sets, configs_dir, n_boot, seed, min_patients,
                  measure_steps, verify_records):
    """The paper's grid as a resumable queue: every run trained and evaluated on the whole test split; a killed
    grid, re-run, continues where it stopped and never repeats a finished run. Writes OUT/tables.md (Tables 2, 4, 5
    with 95% CIs beside the paper, and the paired comparisons of its claims)."""
    from cxrkeras.reproduce.queue import reproduce

    reproduce(grid_name, records, out_dir, only=only, sets=sets, dry_run=dry_run, workers=workers, n_boot=n_boot,
              seed=seed, min_patients=min_patients, configs_dir=configs_dir, measure_steps=measure_steps,
              verify=verify_records, log=click.echo)


@cli.command("gradcam")
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--model", "model_path", required=True, type=click.Path(exists=True),
              help="A run folder (its best model: stage 2, else stage 1) or a .keras file.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the overlay PNGs.")
@click.option("--top-k", default=3, show_default=True, type=click.IntRange(min=1),
              help="Explain each image's K most probable labels.")
@click.option("--class", "class_names", multiple=True, metavar="NAME",
              help="Explain this label instead of the top K (repeatable).")
@click.option("--layer", default=None, help="Feature layer (default: the model's last LKA output / last conv block).")
@click.option("--method", default="gradcam", show_default=True, type=_choice(HEATMAP_METHODS))
@click.option("--alpha", default=0.4, show_default=True, type=click.FloatRange(0, 1), help="Heatmap opacity.")
@_patient_options
@click.option("--dataset", metavar="NAME", help="Models with the FPSM dataset embedding: the source dataset of the "
                                                "images [default: the model's first].")
@_fusion_options
def gradcam_cmd(images, model_path, out, top_k, class_names, layer, method, alpha, age, sex, view, patient_csv,
                dataset, mask_model, fusion_lambda, fusion_sigma):
    """Grad-CAM overlays of PNG/JPEG/DICOM IMAGES at their original size, with label and probability."""
    from cxrkeras.explain.files import explain_files

    patient = _patient(age, sex, view)
    values = None
    if patient is not None or patient_csv:
        from cxrkeras.data.patient import values_for

        values = values_for(list(images), patient, patient_csv)
    entries = explain_files(model_path, list(images), out, top_k=top_k, class_names=list(class_names) or None,
                            layer_name=layer, method=method, alpha=alpha, log=click.echo, patient=values,
                            mask_model=mask_model, fusion_lambda=fusion_lambda, fusion_sigma=fusion_sigma,
                            dataset=dataset)
    for e in entries:
        zero = "  (all-zero heatmap: no positive evidence at this layer)" if e["heatmap_max"] <= 0 else ""
        fused = f"  fused -> {e['fused_overlay']}" if "fused_overlay" in e else ""
        click.echo(f"{e['image']}  {e['label']:<20} p={e['probability']:.3f}  -> {e['overlay']}{zero}{fused}")
    click.echo(f"{len(entries)} overlays and gradcam.json written to {out}")


@cli.command("localize")
@click.option("--model", "model_path", required=True, type=click.Path(exists=True),
              help="A run folder (its best model) or a .keras file.")
@click.option("--boxes", required=True, type=click.Path(exists=True, dir_okay=False),
              help="NIH's BBox_List_2017.csv (coordinates in the 1024x1024 originals).")
@click.option("--images", "images_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Folder searched recursively for the boxed images.")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Folder for localization.json and localization.csv.")
@click.option("--threshold", default=0.5, show_default=True, type=click.FloatRange(0, 1, min_open=True),
              help="IoU region: heatmap >= THRESHOLD x its maximum.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the random-heatmap baseline.")
@click.option("--random-draws", default=10, show_default=True, type=click.IntRange(min=1),
              help="Random maps per box for the baseline.")
@click.option("--layer", default=None, help="Feature layer (default: the model's recorded one).")
@click.option("--method", default="gradcam", show_default=True, type=_choice(HEATMAP_METHODS))
@click.option("--patient-csv", type=click.Path(exists=True, dir_okay=False),
              help="Models with patient features: NIH's Data_Entry CSV (age, sex and view of each boxed image).")
@_fusion_options
def localize_cmd(model_path, boxes, images_dir, out, threshold, seed, random_draws, layer, method, patient_csv,
                 mask_model, fusion_lambda, fusion_sigma):
    """Pointing game and IoU of Grad-CAM on NIH's boxes, per label, beside a seeded random baseline."""
    from cxrkeras.explain.localize import format_table, localize, write_result

    result = localize(model_path, boxes, images_dir, threshold=threshold, seed=seed, random_draws=random_draws,
                      layer_name=layer, method=method, progress=True, log=click.echo, patient_csv=patient_csv,
                      mask_model=mask_model, fusion_lambda=fusion_lambda, fusion_sigma=fusion_sigma)
    click.echo(format_table(result))
    if result["not_found"]:
        click.echo(f"not found under {images_dir}: {len(result['not_found'])} boxed images, e.g. "
                   f"{', '.join(result['not_found'][:5])}")
    for item in result["unreadable"] + result["bad_rows"]:
        click.echo(f"skipped: {item}")
    if out:
        json_path, csv_path = write_result(result, out)
        click.echo(f"written: {json_path}, {csv_path}")


@cli.command("train-segmentation")
@click.option("--images", required=True, type=click.Path(exists=True, file_okay=False), help="Folder of radiographs.")
@click.option("--masks", required=True, type=click.Path(exists=True, file_okay=False),
              help="Folder of binary lung masks, each with its image's name (or NAME_mask), e.g. Montgomery, "
                   "Shenzhen or JSRT's masks.")
@click.option("--out", default="runs/unet", show_default=True, type=click.Path(file_okay=False))
@click.option("--image-size", default=256, show_default=True, type=click.IntRange(16, 1024))
@click.option("--depth", default=4, show_default=True, type=click.IntRange(1, 6), help="U-Net poolings.")
@click.option("--width", default=16, show_default=True, type=click.IntRange(1, 256),
              help="Filters at the first level (doubled at each pooling).")
@click.option("--epochs", default=30, show_default=True, type=click.IntRange(1, 10_000))
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1, 1024))
@click.option("--lr", default=1e-3, show_default=True, type=click.FloatRange(0, 1, min_open=True, max_open=True))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--split-fractions", default="0.7,0.15,0.15", show_default=True, help="train,val,test fractions.")
@click.option("--equalize", type=_choice(EQUALIZE), help="Contrast equalisation, as the classifier's.")
@click.option("--patient-csv", type=click.Path(exists=True, dir_okay=False),
              help="CSV naming each image's patient: the split keeps every patient in one split.")
@click.option("--image-column", default="Image Index", show_default=True)
@click.option("--patient-column", default="Patient ID", show_default=True)
def train_segmentation_cmd(**options):
    """Train a U-Net on image/mask pairs (BCE + Dice); Dice and IoU per split; writes OUT/unet.keras."""
    from cxrkeras.segmentation.train import SegmentationConfig, train_segmentation

    train_segmentation(SegmentationConfig(**options), log=click.echo)


@cli.command("segment")
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--model", "model_path", required=True, type=click.Path(exists=True),
              help="A train-segmentation output folder or its unet.keras.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the mask PNGs and overlays.")
@click.option("--threshold", default=0.5, show_default=True, type=click.FloatRange(0, 1, min_open=True,
                                                                                   max_open=True))
def segment_cmd(images, model_path, out, threshold):
    """Lung masks of IMAGES: NAME_mask.png (0/255, the image's size), NAME_overlay.png and segment.json."""
    from cxrkeras.segmentation.segment import segment_files

    entries = segment_files(model_path, list(images), out, threshold=threshold, log=click.echo)
    click.echo(f"{len(entries)} mask(s) and overlays written to {out}")


@cli.command("hybrid")
@click.option("--run", "run_dir", required=True, type=click.Path(exists=True),
              help="A run folder (its best model) or a .keras file: its embedding and its outputs.")
@click.option("--records", type=click.Path(file_okay=False), help="Records folder (default: the run's).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="Output folder [default: <run>/hybrid].")
@click.option("--classifier", default="logistic", show_default=True, type=click.Choice(["logistic", "mlp"]),
              help="Per label: L2 logistic regression or a one-hidden-layer MLP (grid chosen by validation AUC).")
@click.option("--equalize", default="hist", show_default=True, type=_choice(EQUALIZE),
              help="Equalisation of the image the texture features are computed from.")
@click.option("--texture-size", default=64, show_default=True, type=click.IntRange(16, 512),
              help="Square size of that image.")
@click.option("--hog-orientations", default=9, show_default=True, type=click.IntRange(1, 36))
@click.option("--hog-cell", default=8, show_default=True, type=click.IntRange(2, 128), help="HOG pixels per cell.")
@click.option("--hog-block", default=2, show_default=True, type=click.IntRange(1, 16), help="HOG cells per block.")
@click.option("--lbp-points", default=8, show_default=True, type=click.IntRange(4, 32))
@click.option("--lbp-radius", default=1.0, show_default=True, type=click.FloatRange(1, 16))
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1, 4096))
@click.option("--n-boot", default=1000, show_default=True, type=click.IntRange(min=0),
              help="Patient bootstrap resamples for the AUC CIs.")
@click.option("--seed", default=0, show_default=True, type=int)
def hybrid_cmd(run_dir, records, out_dir, classifier, equalize, texture_size, hog_orientations, hog_cell, hog_block,
               lbp_points, lbp_radius, batch_size, n_boot, seed):
    """HOG + LBP (+ the model's embedding) with a scikit-learn classifier per label, against the CNN alone."""
    from cxrkeras.hybrid.run import hybrid
    from cxrkeras.hybrid.texture import TextureParams

    params = TextureParams(size=texture_size, orientations=hog_orientations, pixels_per_cell=hog_cell,
                           cells_per_block=hog_block, lbp_points=lbp_points, lbp_radius=lbp_radius)
    hybrid(run_dir, records, out_dir, classifier, params, equalize, batch_size, n_boot, seed, log=click.echo)


@cli.command("evaluate")
@click.option("--run", "run_dir", type=click.Path(exists=True, file_okay=False),
              help="Run folder (runs/<name>): its best model (stage 2, else stage 1) and its records.")
@click.option("--model", "model_path", type=click.Path(exists=True, dir_okay=False), help="A .keras model file.")
@click.option("--records", type=click.Path(file_okay=False), help="Records folder (default: the run's).")
@click.option("--split", default="test", show_default=True, help="Split to evaluate (all of it).")
@click.option("--val-split", default="val", show_default=True, help="Split the thresholds are chosen on.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              help="Output folder (default with --run: <run>/evaluation/<split>).")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1, 4096))
@_bootstrap_options
@click.option("--threshold-method", default="youden", show_default=True, type=_choice(THRESHOLD_METHODS),
              help="Thresholds used for the findings column of the predictions CSV (both are in metrics.json).")
@click.option("--no-figures", is_flag=True, help="Skip the PNG figures.")
@click.option("--verify-records", default="sha256", show_default=True, type=_choice(VERIFY_MODES),
              help="Shards must match manifest.json: size and sha256 (~1 GB/s), or size only (no hashing).")
def evaluate_cmd(run_dir, model_path, records, split, val_split, out_dir, batch_size, n_boot, seed, threshold_method,
                 no_figures, verify_records, min_patients):
    """Score a model on a whole records split: AUC with patient-bootstrap CIs, AP, thresholds, calibration, figures."""
    target = _run_or_model(run_dir, model_path)
    if model_path and not out_dir:
        raise click.UsageError("--out is required with --model")
    from cxrkeras.evaluation.evaluate import evaluate

    evaluate(target, records, split=split, val_split=val_split, out_dir=out_dir,
             batch_size=batch_size, n_boot=n_boot, seed=seed, threshold_method=threshold_method,
             figures_on=not no_figures, log=click.echo, verify_records=verify_records, min_patients=min_patients)


@cli.command("compare")
@click.argument("run_a", type=click.Path(exists=True))
@click.argument("run_b", type=click.Path(exists=True))
@click.option("--split", default="test", show_default=True, help="The evaluated split both runs are compared on.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              help="Output folder [default: RUN_A/comparisons/<RUN_B name>-<split>].")
@_bootstrap_options
@click.option("--no-figure", is_flag=True, help="Skip compare.png.")
def compare_cmd(run_a, run_b, split, out_dir, n_boot, seed, min_patients, no_figure):
    """Paired comparison of two evaluated runs (run folders, evaluation folders or predictions CSVs): per-label and
    mean ΔAUC (A − B) with a paired patient bootstrap, DeLong's test with Holm's correction, a figure."""
    from cxrkeras.evaluation.compare import compare_runs

    compare_runs(run_a, run_b, split=split, out_dir=out_dir, n_boot=n_boot, seed=seed, min_patients=min_patients,
                 figure=not no_figure, log=click.echo)


@cli.command("ensemble")
@click.argument("members", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder for ensemble.keras, ensemble.json and evaluation/<split>/ (export it with --run OUT).")
@click.option("--weights", default="val-auc", show_default=True,
              help="val-auc (proportional to each member's mean validation AUC), equal, or w1,w2,... (normalised).")
@click.option("--records", type=click.Path(file_okay=False), help="Records folder (default: the first member's).")
@click.option("--split", default="test", show_default=True, help="Split to evaluate (all of it).")
@click.option("--val-split", default="val", show_default=True, help="Split the weights and thresholds use.")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1, 4096))
@_bootstrap_options
@click.option("--threshold-method", default="youden", show_default=True, type=_choice(THRESHOLD_METHODS))
@click.option("--no-figures", is_flag=True, help="Skip the PNG figures.")
@click.option("--verify-records", default="sha256", show_default=True, type=_choice(VERIFY_MODES))
def ensemble_cmd(members, out_dir, weights, records, split, val_split, batch_size, n_boot, seed, threshold_method,
                 no_figures, verify_records, min_patients):
    """Average the probabilities of MEMBERS (run folders or .keras files sharing labels, input size and
    preprocessing) into one model and evaluate it as `evaluate` does, beside each member's mean AUC."""
    from cxrkeras.evaluation.ensemble import ensemble

    ensemble(members, out_dir, records, split=split, val_split=val_split, weights=weights, batch_size=batch_size,
             n_boot=n_boot, seed=seed, threshold_method=threshold_method, figures_on=not no_figures, log=click.echo,
             verify_records=verify_records, min_patients=min_patients)


@cli.command("export")
@click.option("--run", "run_dir", type=click.Path(exists=True, file_okay=False), help="Run folder (runs/<name>).")
@click.option("--model", "model_path", type=click.Path(exists=True, dir_okay=False), help="A .keras model file.")
@click.option("--out", "out_base", required=True, type=click.Path(file_okay=False),
              help="Model base folder (exports/<name>); the SavedModel goes to its next numbered version folder.")
@click.option("--records", type=click.Path(file_okay=False),
              help="Records whose validation split sets the thresholds when the run has no evaluation.")
@click.option("--val-split", default="val", show_default=True)
@click.option("--threshold-method", default="youden", show_default=True, type=_choice(THRESHOLD_METHODS))
@click.option("--no-verify", is_flag=True, help="Skip the fresh-process check against the Keras model.")
def export_cmd(run_dir, model_path, out_base, records, val_split, threshold_method, no_verify):
    """Export a SavedModel for TF Serving (image bytes in, probabilities and findings out)."""
    target = _run_or_model(run_dir, model_path)
    from cxrkeras.export.savedmodel import export

    export(target, out_base, records_dir=records, threshold_method=threshold_method,
           val_split=val_split, verify=not no_verify, log=click.echo)


@cli.command("predict")
@click.option("--model", "model", required=True, type=click.Path(exists=True),
              help="Export folder (exports/<name>, highest version), SavedModel version folder, run folder or .keras.")
@click.argument("files", nargs=-1, required=True, type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1, 1024))
@_patient_options
@click.option("--dataset", metavar="NAME", help="Models with the FPSM dataset embedding: the source dataset of the "
                                                "files [default: the model's first].")
def predict_cmd(model, files, as_json, batch_size, age, sex, view, patient_csv, dataset):
    """Per-label probabilities and findings for PNG/JPEG/DICOM FILES (folders: searched recursively). Every file
    that can be read is predicted; exit status 1 if any could not be. A model with patient features needs
    --age/--sex/--view (the same for every file) or --patient-csv."""
    import json

    from cxrkeras.export.predict import format_table, predict

    result = predict(model, list(files), batch_size=batch_size, log=lambda m: click.echo(m, err=True),
                     patient=_patient(age, sex, view), patient_csv=patient_csv, dataset=dataset)
    click.echo(json.dumps(result, indent=2) if as_json else format_table(result))
    failed = sum(1 for r in result["results"] if r["error"])
    if failed:
        raise click.ClickException(f"{failed} of {len(result['results'])} input(s) could not be predicted "
                                   f"(see their errors above)")


@cli.command("serve")
@click.option("--model", "model", required=True, type=click.Path(exists=True),
              help="Export folder (exports/<name>, highest version), SavedModel version folder, run folder or .keras.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; the default is this machine only (there is no authentication).")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535), help="0 picks a free port.")
@click.option("--name", default=None, help="Model name in the API paths [default: the export/run folder's name].")
@click.option("--keras-model", type=click.Path(dir_okay=False),
              help="For an export: the .keras file it was made from (default: the one export_info.json records; "
                   "its sha256 must match), for the heatmaps.")
@click.option("--max-upload-mb", default=32.0, show_default=True, type=click.FloatRange(0, 4096, min_open=True),
              help="Largest request body (all files of one upload together); larger ones get HTTP 413.")
@click.option("--max-images", default=16, show_default=True, type=click.IntRange(1, 1024),
              help="Most images in one request.")
@click.option("--max-batch", default=32, show_default=True, type=click.IntRange(1, 1024),
              help="Most images in one model call (concurrent requests are batched up to this).")
def serve_cmd(model, host, port, name, keras_model, max_upload_mb, max_images, max_batch):
    """A web page (upload PNG/JPEG/DICOM -> findings table, Grad-CAM overlays, JSON report) and TF Serving's
    REST API (POST /v1/models/<name>:predict) for one model. A research tool, not a diagnostic device."""
    from cxrkeras.serve import serve

    serve(model, host=host, port=port, name=name, keras_model=keras_model, max_upload_mb=max_upload_mb,
          max_images=max_images, max_batch=max_batch, log=click.echo)


@cli.command("build-records")
@click.option("--csv", "csv_path", required=True, type=click.Path(dir_okay=False),
              help="Labels CSV: NIH Data_Entry_2017(_v2020).csv, or a generic path/labels/patient CSV.")
@click.option("--images", type=click.Path(file_okay=False),
              help="Image folder, searched recursively [default: <CSV folder>/images, else the CSV's folder].")
@click.option("--out", type=click.Path(file_okay=False),
              help="Records folder [default: tfrecords/nih-<size> for the NIH CSV, tfrecords/<csv name>-<size> else].")
@click.option("--split-lists", "split_list", metavar="FILE [FILE [FILE]]", multiple=True,
              help="2 files: official train_val_list.txt test_list.txt (val carved out patient-wise, stratified); "
                   "3 files: train val test lists.")
@click.argument("more_split_lists", nargs=-1, type=click.Path(dir_okay=False), metavar="")
@click.option("--split-fractions", default="0.7,0.1,0.2", show_default=True,
              help="train,val,test fractions of images (with 2 split lists: only train:val matters).")
@click.option("--seed", default=0, show_default=True, type=int, help="Split and shard-order seed.")
@click.option("--image-size", default=256, show_default=True, type=click.IntRange(8, 4096),
              help="Images are resized once to SIZE x SIZE and stored as lossless PNG (or raw, --encoding).")
@click.option("--encoding", default="png", show_default=True, type=_choice(ENCODINGS),
              help="png: lossless PNG. raw: the uint8 pixels uncompressed (about 2x the disk, no decoding when "
                   "read: the fastest input pipeline).")
@click.option("--channels", default="1", show_default=True, type=_choice(CHANNELS),
              help="1 = grayscale (X-rays), 3 = RGB.")
@click.option("--shard-size", default=1000, show_default=True, type=click.IntRange(1, 100_000),
              help="Maximum records per shard.")
@click.option("--workers", default=None, type=click.IntRange(1, 256),
              help="Encoding processes [default: all cores, fewer if the memory would not hold them].")
@click.option("--dry-run", is_flag=True, help="Split from the CSV alone (no image read); write manifest.json only.")
@click.option("--strict", is_flag=True, help="Stop on a missing or unreadable image instead of skipping it.")
@click.option("--format", "fmt", default="auto", show_default=True,
              type=_choice(RECORD_FORMATS),
              help="auto: NIH when the CSV has 'Image Index' and 'Finding Labels', else generic. dicom: generic "
                   "CSV of DICOM files; patient ids from --patient-column, else a hash of the DICOM PatientID.")
@click.option("--labels", help="Labels to train on, 'A,B,C' or a file with one per line. Generic CSV: its label "
                                "list. NIH CSV: any of the 14, in the order given (default all), or 'Finding': "
                                "1 for any finding, 0 for 'No Finding' (a binary task).")
@click.option("--path-column", default="path", show_default=True, help="Generic CSV: image path column.")
@click.option("--labels-column", default="labels", show_default=True,
              help="Generic CSV: '|'-separated label names (empty or 'No Finding' = none).")
@click.option("--patient-column", default="patient_id", show_default=True, help="Generic CSV: patient id column.")
@click.option("--id-salt", default="", help="Secret mixed into hashed DICOM PatientIDs (not stored anywhere).")
@click.option("--dataset-name", metavar="NAME",
              help="Source dataset of every row when the CSV has no 'Dataset' column (one name per row, for "
                   "records pooled from several datasets) [default: NIH ChestX-ray14].")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--overwrite", is_flag=True,
              help="Replace records in --out that were built from another CSV or with other options.")
@click.option("--subset", metavar="per-label=N,no-finding=N",
              help="A class-targeted subset: whole patients, rarest labels first, until each label has N positive "
                   "images (all when fewer), then N 'No Finding' images; seeded by --seed. A label name sets its "
                   "own N (e.g. Hernia=100).")
@click.option("--augment", type=click.Choice(["dadam"]),
              help="dadam: extra training shards of box-patch images (diseased-area patches from --boxes, training "
                   "images only).")
@click.option("--boxes", type=click.Path(dir_okay=False), help="--augment dadam: NIH's BBox_List_2017.csv.")
@click.option("--n", "augment_n", default=1000, show_default=True, type=click.IntRange(1, 1_000_000),
              help="--augment dadam: synthetic images to make.")
@click.option("--tail-labels", help="--augment dadam: 'A,B' labels whose patches are used [default: the labels "
              "with at most the median number of training positives].")
@click.option("--dadam-alpha", default=0.6, show_default=True, type=click.FloatRange(0, 1, min_open=True),
              help="Opacity of a patch blended onto an image with a tail class.")
@click.option("--dadam-normal", default=0.5, show_default=True, type=click.FloatRange(0, 1),
              help="Share of the images pasted onto a No Finding image (the others are blends).")
@click.option("--dadam-correlation", default="0.1", show_default=True,
              help="Pasting onto No Finding also adds the patch of the label most correlated with it in the "
                   "training labels when its Pearson r is at least this; 'off' to never.")
def build_records_cmd(csv_path, images, out, split_list, more_split_lists, split_fractions, seed, image_size,
                      channels, shard_size, workers, dry_run, strict, fmt, labels, path_column, labels_column,
                      patient_column, id_salt, no_progress, overwrite, subset, augment, boxes, augment_n,
                      tail_labels, dadam_alpha, dadam_normal, dadam_correlation, encoding, dataset_name):
    """Labels CSV + images -> patient-wise stratified train/val/test TFRecord shards and manifest.json."""
    split_lists = [p for item in split_list for p in item.split(",") if p] + list(more_split_lists)
    if more_split_lists and not split_list:
        raise click.UsageError(f"unexpected argument(s) {' '.join(more_split_lists)}: did you mean --split-lists?")
    from cxrkeras.data.inspect import format_manifest
    from cxrkeras.data.records import build_records
    from cxrkeras.errors import Interrupted

    options = None
    if augment:
        from cxrkeras.data.dadam import DadamOptions

        if not boxes:
            raise click.UsageError("--augment dadam needs --boxes BBox_List_2017.csv")
        try:
            correlation = None if dadam_correlation.strip().lower() == "off" else float(dadam_correlation)
        except ValueError:
            raise click.UsageError(f"--dadam-correlation {dadam_correlation!r}: a number or 'off'") from None
        options = DadamOptions(boxes, augment_n, tuple(t.strip() for t in tail_labels.split(",") if t.strip())
                               if tail_labels else None, dadam_alpha, dadam_normal, correlation, seed)
    elif boxes or tail_labels:
        raise click.UsageError("--boxes and --tail-labels go with --augment dadam")
    try:
        report = build_records(
            csv_path, images, out, split_lists=split_lists, split_fractions=split_fractions, seed=seed,
            image_size=image_size, channels=int(channels), shard_size=shard_size, workers=workers, dry_run=dry_run,
            strict=strict, format=fmt, labels=labels, path_column=path_column, labels_column=labels_column,
            patient_column=patient_column, id_salt=id_salt, progress=not no_progress, overwrite=overwrite,
            subset=subset, augment=options, encoding=encoding, dataset_name=dataset_name, log=click.echo)
    except Interrupted as exc:  # stopped by SIGTERM: one line, and the exit status a shell gives (143)
        error = click.ClickException(str(exc))
        error.exit_code = 128 + exc.signum
        raise error from None
    m = report.manifest
    click.echo(format_manifest(m))
    if not m["patient_overlap"]["ok"]:
        raise click.ClickException(f"patients shared between splits: {m['patient_overlap']['pairs']}")
    action = ("dry run" if dry_run else
              f"{report.shards_written} shard(s) written"
              + (f" by {report.workers} worker(s)" if report.workers > 1 else "")
              + f", {report.shards_kept} already complete and kept")
    state = "manifest written" if report.manifest_written else "nothing changed"
    click.echo(f"{report.out}: {action}; {state} ({report.seconds:.1f} s)")


@cli.command("inspect-records")
@click.argument("records_dir", type=click.Path(file_okay=False))
def inspect_records_cmd(records_dir):
    """Print a records folder as tables; verify every shard's sha256, record count, stats and patient disjointness."""
    from cxrkeras.data.inspect import format_manifest, inspect_records

    result = inspect_records(records_dir)
    click.echo(format_manifest(result.manifest))
    if result.manifest.get("dry_run"):
        click.echo("dry-run manifest: no shards to verify")
        return
    if result.problems:
        for problem in result.problems:
            click.echo(f"MISMATCH: {problem}", err=True)
        raise click.ClickException(f"{len(result.problems)} problem(s) in {records_dir}: it does not match its "
                                   f"manifest; re-run `cxrkeras build-records` with the same options")
    click.echo(f"OK: {result.shards} shards, {result.records} records match the manifest; no patient in two splits")


def main(argv=None):
    if not _TF_LOG_LEVEL_GIVEN:
        from cxrkeras.startup import quiet_tensorflow_import

        quiet_tensorflow_import()
    return cli.main(args=argv, prog_name="cxrkeras")


if __name__ == "__main__":
    sys.exit(main())
