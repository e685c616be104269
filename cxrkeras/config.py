"""Typed training configuration: dataclass defaults, YAML files and `key=value` overrides on top, validation.

Each field documents itself (`metadata["doc"]`); `python -m cxrkeras.config` prints the defaults block of
configs/README.md from the dataclasses (`--write configs/README.md` updates the file, `--check` fails when it is
out of date), so the documented defaults cannot drift from the code.
"""

import dataclasses
import difflib
import os
import sys
from dataclasses import dataclass, field
from typing import Optional, Union

import yaml

from cxrkeras.constants import (EPS_STYLES, EQUALIZE, FILL_MODES, LOSSES, LR_SUGGESTIONS,  # noqa: F401
                                MIXED_PRECISION, MONITORS, OPTIMIZERS, PATIENT_MISSING, PREPROCESSING, RECIPES,
                                SCHEDULES, STRATEGIES, VERIFY_MODES)
from cxrkeras.errors import ConfigError, CxrError

# Names other tools use for our keys: suggested when difflib finds nothing close.
KEY_ALIASES = {"learning_rate": "lr", "optimiser": "optimizer", "wd": "weight_decay", "img_size": "image_size",
               "input_size": "image_size", "batch": "batch_size", "num_epochs": "epochs", "backbone": "variant",
               "arch": "variant", "scheduler": "schedule", "lr_schedule": "schedule", "focal_gamma": "gamma",
               "focal_alpha": "alpha", "amp": "mixed_precision", "jit_compile": "xla"}


def doc(default, text="", factory=None):
    """A dataclass field with its documentation (the comment of its line in configs/README.md)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


@dataclass
class DadamConfig:
    """Online DADAM (cxrkeras.data.dadam_online): box patches of the training split's tail-class images put on its
    training images as they stream, each pass drawn afresh (the offline form: `build-records --augment dadam`)."""

    boxes: Optional[str] = doc(None, "NIH's BBox_List_2017.csv (or a file in its layout): online DADAM on, training "
                               "split only | null: off")
    probability: float = doc(0.3, "chance that an eligible training image gets a patch in a pass (a No Finding "
                             "image: pasted, stage 2 only; an image with a tail class: blended)")
    tail_labels: Optional[list] = doc(None, "labels whose box patches are used | null: the labels with at most the "
                                      "median number of training positives (as --tail-labels)")
    alpha: float = doc(0.6, "opacity of a patch blended onto an image with a tail class (as --dadam-alpha)")
    correlation: Optional[float] = doc(0.1, "pasted onto No Finding: also paste the most correlated label's patch "
                                       "(Pearson r >= this) at its training co-occurrence rate | null: never (as "
                                       "--dadam-correlation)")
    max_bank_mb: float = doc(256.0, "bound on the donor patches held in memory (MB); a bank above it is refused")


@dataclass
class DataConfig:
    """Where the records are and how batches are made (`batch_size` is the GLOBAL batch, over all replicas)."""

    records: str = doc("tfrecords/nih-256", "folder made by `cxrkeras build-records` (its default --out for the "
                       "NIH CSV)")
    image_size: int = doc(224, "the model's square input (augmentation crops and the eval transform bring the "
                          "records to it)")
    batch_size: int = doc(32, "GLOBAL batch: split over all replicas (GPUs x workers); must divide evenly")
    shuffle_buffer: int = doc(2048)
    cache: Union[bool, str] = doc(False, "false | true: decoded images cached in memory | a folder: cached on disk "
                                  "there (one file per records folder, split, stage, size and equalisation)")
    equalize: Optional[str] = doc(None, "null | hist | clahe (contrast equalisation of the stored images)")
    train_split: str = doc("train")
    val_split: str = doc("val")
    verify_records: str = doc("sha256", "shards must match manifest.json: sha256 (and size) | size (no hashing)")
    augment: bool = doc(True, "training augmentation (random crop + zoom, rotation, flip); false: training images "
                        "get the eval transform (still shuffled)")
    max_rotation: float = doc(10.0, "augmentation: rotation drawn in +-max_rotation degrees (0: none)")
    crop_scale: list = doc(None, "augmentation: [low, high] side of the random square crop as a share of the short "
                           "side, 0 < low <= high <= 1 ([1, 1]: no crop or zoom)", lambda: [0.8, 1.0])
    flip: bool = doc(True, "augmentation: horizontal flip with p = 0.5")
    fill_mode: str = doc("reflect", "augmentation: pixels from outside the image: reflect | nearest | constant")
    no_finding_class: bool = doc(False, "true: a last output 'No Finding' (none of the records' labels positive), "
                                 "evaluated like any label, left out of the published comparison")
    dadam: DadamConfig = doc(None, "online DADAM box-patch augmentation of the training split", DadamConfig)
    patient_missing: str = doc("error", "models with patient features: an unknown age/sex/view in a record is an "
                               "error naming it | encode: age -> the training mean, sex/view -> all-zero one-hot")


@dataclass
class ModelConfig:
    """Which network: a registered variant, its initial weights and extra `build_model` keyword overrides."""

    variant: str = doc("densenet121-lka-last2", "`cxrkeras models` lists them")
    weights: Optional[str] = doc("imagenet", "imagenet | torchvision | null | a .keras/.h5/.weights.h5 file | a "
                                 "PyTorch checkpoint (.pth/.pt/.bin/.safetensors) (stage 1; stage 2 starts from "
                                 "stage 1)")
    dropout: Optional[float] = doc(None, "head dropout; null: the variant's default (0.5 for the paper's six, 0.2 "
                                   "baselines)")
    preprocessing: Optional[str] = doc(None, "null: what the weights expect (torch = ImageNet mean/std RGB; caffe "
                                       "for plain VGG16)")
    overrides: dict = doc(None, "extra build_model options: lka_blocks, lka_form, width_multiplier, blocks, "
                          "bn_epsilon, bn_momentum (Keras momentum = 1 - PyTorch's), final_relu, attention "
                          "(DenseNet: none | a | b), head (linear | fpsm: Feature Pyramid Sum), head_stages (fpsm "
                          "levels, default 4+3+2), head_merge (fpsm: sum | concat), head_dataset_embedding (fpsm: "
                          "true: a dataset-id input, Embedding(N, N) of the records' N source datasets appended to "
                          "each level's features), lstm_units, attention_heads, "
                          "attention_key_dim (efficientnetb2-lstm-mha)", dict)
    patient_features: bool = doc(False, "true: a second input (age normalised with the training split's mean/sd, "
                                 "sex and view one-hot) -> Dense(3)+ReLU, concatenated before the classifier")


@dataclass
class OptimConfig:
    """Optimiser and learning-rate schedule (plateau: x`factor` after `patience` epochs without a better monitored
    value). adam / adamw: Keras' Adam / AdamW update, with a learning rate per layer group (early backbone, late
    backbone, LKA + head)."""

    optimizer: str = doc("adam", "adam | adamw (decoupled weight decay) | sgd")
    lr: float = doc(1e-4, "the learning rate (of the last layer group: LKA + head); fine_tune: its base_lr")
    lr_low: Optional[float] = doc(None, "fastai's slice(lr_low, lr): the 3 layer groups get lr_low ... lr, evenly "
                                  "spaced on a log scale; null: lr for every group")
    beta_1: float = doc(0.9, "Adam's beta_1 (fastai: mom 0.9); with one_cycle and moms set, moms cycles it")
    beta_2: float = doc(0.999, "Adam's beta_2 (fastai: sqr_mom 0.99)")
    epsilon: float = doc(1e-7, "Adam's epsilon (fastai: 1e-5)")
    eps_style: str = doc("keras", "keras: eps added to sqrt(v) (Keras/TF) | fastai: to the bias-corrected "
                         "sqrt(v_hat) (fastai, PyTorch)")
    weight_decay: float = doc(1e-4, "adamw only: decoupled, each step p -= lr_group * weight_decay * p (fastai: 0.01)")
    wd_bn_bias: bool = doc(True, "adamw: decay batch-norm and bias variables too (fastai's wd_bn_bias, default "
                           "false there)")
    momentum: float = doc(0.9, "sgd only")
    nesterov: bool = doc(True, "sgd only")
    clipnorm: Optional[float] = doc(None)
    schedule: str = doc("plateau", "plateau | cosine | constant | one_cycle (fastai's fit_one_cycle)")
    patience: int = doc(2, "plateau: epochs without a better train.monitor before lr *= factor")
    factor: float = doc(0.1)
    min_lr: float = doc(1e-7)
    cosine_alpha: float = doc(0.0, "cosine: final lr = lr * cosine_alpha (decay over epochs x steps)")
    pct_start: Optional[float] = doc(None, "one_cycle: share of the steps warming up (cosine, lr/div -> lr); null: "
                                     "0.25 (fit_one_cycle), 0.3 in fine_tune's unfrozen phase, which fastai gives")
    div: Optional[float] = doc(None, "one_cycle: the cycle starts at lr / div; null: 25, 5 in fine_tune's unfrozen "
                               "phase")
    div_final: float = doc(1e5, "one_cycle: the cycle ends at lr / div_final")
    moms: Optional[list] = doc(None, "one_cycle: beta_1 goes moms[0] -> moms[1] -> moms[2] as the lr rises and "
                               "falls (fastai's moms); null: constant beta_1", lambda: [0.95, 0.85, 0.95])
    lr_mult: float = doc(100.0, "fine_tune: the unfrozen phase uses slice(lr / 2 / lr_mult, lr / 2)")
    lr_find: Optional[str] = doc(None, "null: use lr | valley | steep: run the LR finder (cxrkeras lr-find) before "
                                 "the stage and use its suggestion as lr (recorded in run_info.json)")
    lr_find_steps: int = doc(100, "lr_find: steps of the exponential sweep 1e-7 -> 10 (fastai: num_it 100)")


@dataclass
class LossConfig:
    """The loss: binary cross-entropy in stage 1, sigmoid focal loss (keras.losses.BinaryFocalCrossentropy, the mean
    of (1 - p_t)^gamma * BCE) in stage 2, unless `kind` says otherwise.

    The paper's FocalLoss(alpha=1, gamma=2) is gamma 2 with class balancing off: its alpha multiplies every term by 1.
    Keras' alpha is another thing, a class weight (positives alpha, negatives 1 - alpha) used only with
    apply_class_balancing: true; alpha 1 there would weight every negative 0 and is refused.
    """

    kind: Optional[str] = doc(None, "null: the stage's (1: bce, 2: focal) | bce | focal (e.g. one-stage ablations)")
    gamma: float = doc(2.0, "focal: focusing parameter (Lin et al. 2017; the paper's gamma 2)")
    alpha: Optional[float] = doc(None, "focal with apply_class_balancing only: positives weighted alpha, negatives "
                                 "1 - alpha, 0 < alpha < 1; null: 0.25 (Lin et al.)")
    apply_class_balancing: bool = doc(False, "focal: weight the classes by alpha / 1 - alpha (off: the paper's)")
    label_smoothing: float = doc(0.0, "both losses")


@dataclass
class TrainConfig:
    """Epoch loop, devices and monitoring. `steps_per_epoch` None: one pass over the stage's training images."""

    recipe: str = doc("fit", "fit: one schedule over all epochs | fine_tune: fastai's fine_tune (one_cycle only): "
                      "freeze_backbone_epochs frozen at lr (pct_start 0.99), then epochs unfrozen at slice(lr / 2 / "
                      "lr_mult, lr / 2), each phase its own cycle with fresh optimiser state")
    epochs: int = doc(10, "fit: all epochs, frozen ones included | fine_tune: the unfrozen epochs after the frozen "
                      "ones (fastai's fine_tune(epochs, freeze_epochs))")
    early_stopping_patience: int = doc(5, "on train.monitor; 0: never stop early")
    freeze_backbone_epochs: int = doc(0, "the first N epochs train only the LKA blocks and the head (and batch norm "
                                      "with train_bn)")
    train_bn: bool = doc(True, "batch-norm layers stay trainable (and in training mode) while the backbone is "
                         "frozen, as fastai's train_bn; false: frozen too (Keras then runs them in inference mode)")
    monitor: str = doc("val_auc_mean", "picks best.keras and drives early stopping and plateau: val_auc_mean "
                       "(higher is better) | val_loss (lower is better; the paper's)")
    mixed_precision: str = doc("auto", "auto (on with a GPU) | on | off")
    xla: bool = doc(False, "jit_compile the train step")
    strategy: str = doc("auto", "auto: MultiWorkerMirrored if TF_CONFIG is set, Mirrored on >= 2 GPUs, else "
                        "default")
    seed: int = doc(42)
    steps_per_epoch: Optional[int] = doc(None, "null: one pass over the stage's training images")
    verbose: int = doc(2, "0 quiet, 1 Keras progress bar, 2 one line per epoch")
    gradcam_every: int = doc(0, ">0: Grad-CAM overlays of validation images to TensorBoard every N epochs")
    gradcam_images: int = doc(4)


@dataclass
class RunConfig:
    """Run folder: <root>/<name>/stage1|stage2/."""

    name: str = doc("default", "run folder runs/<name>/stage1|stage2")
    root: str = doc("runs")
    overwrite: bool = doc(False)


@dataclass
class Config:
    data: DataConfig = doc(None, "", DataConfig)
    model: ModelConfig = doc(None, "", ModelConfig)
    optim: OptimConfig = doc(None, "", OptimConfig)
    loss: LossConfig = doc(None, "stage 1: binary cross-entropy, stage 2: focal (keras.losses."
                           "BinaryFocalCrossentropy), unless loss.kind", LossConfig)
    train: TrainConfig = doc(None, "", TrainConfig)
    run: RunConfig = doc(None, "", RunConfig)

    def to_dict(self):
        return dataclasses.asdict(self)


def _closest(key, choices):
    match = difflib.get_close_matches(key, list(choices), n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _type_name(tp):
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _coerce(value, tp, where):
    """`value` as the field type `tp` (int/float/bool/str/dict, Optional of those, Union[bool, str]); a ConfigError
    otherwise."""
    args = getattr(tp, "__args__", None)
    if args and type(None) in args:  # Optional[X]
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "")):
            return None
        tp = next(a for a in args if a is not type(None))
        args = None
    if args and set(args) == {bool, str}:  # a flag or a path: data.cache
        if isinstance(value, bool) or (isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE):
            return _coerce(value, bool, where)
        if isinstance(value, str) and value.strip():
            return value
        raise ConfigError(f"{where}: expected true, false or a folder path, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, bool):  # YAML 1.1 reads on/off as booleans (train.mixed_precision: off)
            return "on" if value else "off"
        if isinstance(value, (str, int, float)):
            return str(value)
    elif tp is dict:
        if isinstance(value, dict):
            return dict(value)
    elif tp is list:
        if isinstance(value, (list, tuple)):
            return list(value)
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def _apply(section_obj, updates, prefix, source):
    names = {f.name: f for f in dataclasses.fields(section_obj)}
    for key, value in updates.items():
        if key not in names:
            match = difflib.get_close_matches(str(key), list(names), n=1, cutoff=0.5)
            if KEY_ALIASES.get(str(key)) in names:
                match = [KEY_ALIASES[str(key)]]
            hint = f" (did you mean '{prefix}{match[0]}'?)" if match else ""
            raise ConfigError(f"{source}: unknown config key '{prefix}{key}'{hint}; "
                              f"valid keys in {prefix.rstrip('.') or 'the top level'}: {', '.join(names)}")
        f = names[key]
        current = getattr(section_obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {prefix}{key} must be a mapping of keys, got {value!r}")
            _apply(current, value, f"{prefix}{key}.", source)
        else:
            setattr(section_obj, key, _coerce(value, f.type, f"{source}: {prefix}{key}"))


def apply_overrides(config, updates, source="overrides"):
    """Apply a nested dict of overrides (YAML layout) onto `config` in place; unknown keys -> ConfigError."""
    if updates is None:
        return config
    if not isinstance(updates, dict):
        raise ConfigError(f"{source}: expected a mapping of sections (data, model, optim, ...), got {updates!r}")
    _apply(config, updates, "", source)
    return config


def parse_set(items):
    """`["train.epochs=3", "model.overrides={lka_form: van}"]` -> nested dict; values are parsed as YAML."""
    out = {}
    for item in items or ():
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. --set optim.lr=3e-4")
        key, raw = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if len(parts) < 2:
            raise ConfigError(f"--set {item!r}: the key needs its section, e.g. optim.{key.strip()}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: value is not valid YAML ({exc})") from exc
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def load_yaml(path):
    """The mapping of a config file; ConfigError naming the file when it is missing or not valid YAML."""
    from cxrkeras.fileio import read_yaml

    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist (the bundled ones are in configs/)")
    try:
        return read_yaml(path, what="config file")
    except CxrError as exc:
        raise ConfigError(str(exc)) from exc


def validate(config):
    """Range and choice checks that do not need TensorFlow; raises ConfigError naming the key."""
    def choice(key, value, choices):
        if value not in choices:
            raise ConfigError(f"{key} must be one of {', '.join(choices)}, "
                              f"got {value!r}{_closest(str(value), choices)}")

    choice("optim.optimizer", config.optim.optimizer, OPTIMIZERS)
    choice("optim.schedule", config.optim.schedule, SCHEDULES)
    choice("train.mixed_precision", config.train.mixed_precision, MIXED_PRECISION)
    choice("train.strategy", config.train.strategy, STRATEGIES)
    if config.data.equalize is not None:
        choice("data.equalize", config.data.equalize, EQUALIZE)
    if isinstance(config.data.cache, str) and os.path.exists(config.data.cache) and \
            not os.path.isdir(config.data.cache):
        raise ConfigError(f"data.cache {config.data.cache!r} is a file: give a folder for the disk cache, or true "
                          f"(memory) / false")
    choice("data.verify_records", config.data.verify_records, VERIFY_MODES)
    choice("data.patient_missing", config.data.patient_missing, PATIENT_MISSING)
    if config.model.preprocessing is not None:
        choice("model.preprocessing", config.model.preprocessing, PREPROCESSING)
    if "preprocessing" in config.model.overrides:
        raise ConfigError("model.overrides.preprocessing: set model.preprocessing instead")
    positive = {"data.image_size": config.data.image_size, "data.batch_size": config.data.batch_size,
                "train.epochs": config.train.epochs, "optim.lr": config.optim.lr}
    for key, value in positive.items():
        if not value > 0:
            raise ConfigError(f"{key} must be > 0, got {value!r}")
    if config.train.steps_per_epoch is not None and config.train.steps_per_epoch <= 0:
        raise ConfigError(f"train.steps_per_epoch must be > 0 or null, got {config.train.steps_per_epoch}")
    for key in ("train.freeze_backbone_epochs", "train.early_stopping_patience", "optim.patience",
                "train.gradcam_every", "loss.gamma", "optim.weight_decay"):
        section, name = key.split(".")
        if getattr(getattr(config, section), name) < 0:
            raise ConfigError(f"{key} must be >= 0")
    _validate_recipe(config, choice)
    _validate_dadam(config.data.dadam)
    if not 0 <= config.loss.label_smoothing < 1:
        raise ConfigError(f"loss.label_smoothing must be in [0, 1), got {config.loss.label_smoothing}")
    if config.model.dropout is not None and not 0 <= config.model.dropout < 1:
        raise ConfigError(f"model.dropout must be in [0, 1), got {config.model.dropout}")
    if not 0 < config.optim.factor < 1:
        raise ConfigError(f"optim.factor must be in (0, 1), got {config.optim.factor}")
    if not config.run.name or os.sep in config.run.name:
        raise ConfigError(f"run.name must be a plain folder name, got {config.run.name!r}")
    return config


def _numbers(key, value, count=None):
    if not isinstance(value, list) or (count and len(value) != count) or \
            not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise ConfigError(f"{key} must be a list of {count or 'some'} numbers, got {value!r}")
    return [float(v) for v in value]


MAX_DADAM_BANK_MB = 65536.0


def _validate_dadam(d):
    """data.dadam: ranges, and the box file present, before any TensorFlow work."""
    if d.boxes is None:
        return
    if not os.path.isfile(d.boxes):
        raise ConfigError(f"data.dadam.boxes {d.boxes!r} is not a file: give NIH's BBox_List_2017.csv (or null: off)")
    if not 0.0 < d.probability <= 1.0:
        raise ConfigError(f"data.dadam.probability must be in (0, 1], got {d.probability}")
    if not 0.0 < d.alpha <= 1.0:
        raise ConfigError(f"data.dadam.alpha: the patch opacity must be in (0, 1], got {d.alpha}")
    if d.correlation is not None and not -1.0 <= d.correlation <= 1.0:
        raise ConfigError(f"data.dadam.correlation: a Pearson r in [-1, 1] or null, got {d.correlation}")
    if not 0.0 < d.max_bank_mb <= MAX_DADAM_BANK_MB:
        raise ConfigError(f"data.dadam.max_bank_mb must be in (0, {MAX_DADAM_BANK_MB:g}], got {d.max_bank_mb}")
    if d.tail_labels is not None and (not d.tail_labels or not all(isinstance(t, str) for t in d.tail_labels)):
        raise ConfigError(f"data.dadam.tail_labels: a list of label names or null, got {d.tail_labels!r}")


def _validate_recipe(config, choice):
    """The recipe keys of issue 13: schedule, layer groups, Adam, monitor, loss, augmentation."""
    o, t, loss, d = config.optim, config.train, config.loss, config.data
    choice("optim.eps_style", o.eps_style, EPS_STYLES)
    choice("train.recipe", t.recipe, RECIPES)
    choice("train.monitor", t.monitor, MONITORS)
    choice("data.fill_mode", d.fill_mode, FILL_MODES)
    if loss.kind is not None:
        choice("loss.kind", loss.kind, LOSSES)
    if o.lr_find is not None:
        choice("optim.lr_find", o.lr_find, LR_SUGGESTIONS)
    if t.recipe == "fine_tune" and o.schedule != "one_cycle":
        raise ConfigError(f"train.recipe fine_tune is fastai's fine_tune, two fit_one_cycle calls: set "
                          f"optim.schedule: one_cycle (got {o.schedule!r})")
    if o.lr_low is not None and not 0 < o.lr_low <= o.lr:
        raise ConfigError(f"optim.lr_low must be in (0, optim.lr = {o.lr:g}], got {o.lr_low!r}")
    for key, value in (("optim.beta_1", o.beta_1), ("optim.beta_2", o.beta_2)):
        if not 0 <= value < 1:
            raise ConfigError(f"{key} must be in [0, 1), got {value!r}")
    for key, value in (("optim.epsilon", o.epsilon), ("optim.div_final", o.div_final), ("optim.lr_mult", o.lr_mult),
                       ("optim.div", 1.0 if o.div is None else o.div)):
        if not value > 0:
            raise ConfigError(f"{key} must be > 0, got {value!r}")
    if o.pct_start is not None and not 0 <= o.pct_start < 1:
        raise ConfigError(f"optim.pct_start must be in [0, 1), got {o.pct_start!r}")
    if o.moms is not None:
        o.moms = _numbers("optim.moms", o.moms, 3)
        if not all(0 <= m < 1 for m in o.moms):
            raise ConfigError(f"optim.moms are beta_1 values, each in [0, 1), got {o.moms}")
    if not 6 <= o.lr_find_steps <= 10_000:
        raise ConfigError(f"optim.lr_find_steps must be 6 to 10000, got {o.lr_find_steps}")
    if loss.alpha is not None and not 0 <= loss.alpha <= 1:
        raise ConfigError(f"loss.alpha must be in [0, 1], got {loss.alpha}")
    if loss.apply_class_balancing and loss.alpha is not None and loss.alpha in (0, 1):
        zero = "negative" if loss.alpha == 1 else "positive"
        raise ConfigError(
            f"loss.apply_class_balancing: true with loss.alpha: {loss.alpha:g} weights every {zero} label 0 (Keras "
            f"weights positives alpha and negatives 1 - alpha), so the loss would ignore them. The paper's "
            f"FocalLoss(alpha=1, gamma=2) multiplies every term by 1: that is apply_class_balancing: false. For a "
            f"class weighting, give 0 < alpha < 1 (Lin et al.: 0.25)")
    d.crop_scale = _numbers("data.crop_scale", d.crop_scale, 2)
    if not 0 < d.crop_scale[0] <= d.crop_scale[1] <= 1:
        raise ConfigError(f"data.crop_scale must satisfy 0 < low <= high <= 1, got {d.crop_scale}")
    if not 0 <= d.max_rotation <= 180:
        raise ConfigError(f"data.max_rotation must be 0 to 180 degrees, got {d.max_rotation!r}")


def load_config(path=None, overrides=None, sets=None):
    """Defaults <- YAML file `path` <- `overrides` (nested dict, e.g. from CLI options) <- `sets` ("a.b=v" list)."""
    config = Config()
    if path:
        apply_overrides(config, load_yaml(path), source=str(path))
    apply_overrides(config, overrides or {}, source="command-line options")
    apply_overrides(config, parse_set(sets), source="--set")
    return validate(config)


def config_from_dict(data, source="config"):
    """A Config from a resolved dict (e.g. a run folder's config.yaml)."""
    return validate(apply_overrides(Config(), data, source=source))


def dump_yaml(config):
    from cxrkeras.fileio import yaml_text

    return yaml_text(config.to_dict())


# --- the documented defaults (configs/README.md) ---

BLOCK_START = "<!-- defaults: generated from cxrkeras/config.py by `python -m cxrkeras.config --write configs/README.md` -->"
BLOCK_END = "<!-- end of generated defaults -->"
_COMMENT_COLUMN = 30


def _value_text(value):
    text = yaml.safe_dump({"v": value}, default_flow_style=True, width=1000).strip()
    return text[len("{v: "):-1] if text.startswith("{v: ") else text


def _commented(line, comment, width=118):
    """`line` with `comment` from column 30 ("# ..."), wrapped onto continuation comment lines."""
    if not comment:
        return [line]
    words, lines, current = comment.split(), [], ""
    room = width - _COMMENT_COLUMN - 2
    for word in words:
        if current and len(current) + 1 + len(word) > room:
            lines.append(current)
            current = word
        else:
            current = f"{current} {word}".strip()
    lines.append(current)
    first = f"{line:<{_COMMENT_COLUMN - 1}} # {lines[0]}" if len(line) < _COMMENT_COLUMN - 1 else f"{line}  # {lines[0]}"
    return [first] + [f"{'':<{_COMMENT_COLUMN - 1}} # {rest}" for rest in lines[1:]]


def defaults_yaml(config=None):
    """Every key of the typed config with its default and documentation, as the YAML block of configs/README.md."""
    config = config or Config()
    out = []
    for section in dataclasses.fields(config):
        out += _commented(f"{section.name}:", section.metadata.get("doc", ""))
        values = getattr(config, section.name)
        for f in dataclasses.fields(values):
            value = getattr(values, f.name)
            if dataclasses.is_dataclass(value):  # a subsection (data.dadam)
                out += _commented(f"  {f.name}:", f.metadata.get("doc", ""))
                for g in dataclasses.fields(value):
                    out += _commented(f"    {g.name}: {_value_text(getattr(value, g.name))}",
                                      g.metadata.get("doc", ""))
                continue
            out += _commented(f"  {f.name}: {_value_text(value)}", f.metadata.get("doc", ""))
    return "\n".join(out) + "\n"


def defaults_block():
    """The generated part of configs/README.md: markers around a ```yaml block of `defaults_yaml()`."""
    return f"{BLOCK_START}\n```yaml\n{defaults_yaml()}```\n{BLOCK_END}"


def readme_with_defaults(text):
    """`text` (configs/README.md) with its generated block replaced by the current one."""
    if BLOCK_START not in text or BLOCK_END not in text:
        raise ConfigError(f"the file has no generated defaults block (a line {BLOCK_START!r} ... {BLOCK_END!r})")
    head, rest = text.split(BLOCK_START, 1)
    return head + defaults_block() + rest.split(BLOCK_END, 1)[1]


def main(argv=None):
    """python -m cxrkeras.config [--write FILE | --check FILE]: print the defaults block, or update / check FILE."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m cxrkeras.config", description=main.__doc__)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", metavar="FILE", help="replace FILE's generated block (configs/README.md)")
    group.add_argument("--check", metavar="FILE", help="exit 1 when FILE's generated block is out of date")
    args = parser.parse_args(argv)
    if not (args.write or args.check):
        print(defaults_block())
        return 0
    path = args.write or args.check
    with open(path, encoding="utf-8") as f:
        text = f.read()
    new = readme_with_defaults(text)
    if args.check:
        if new != text:
            print(f"{path}: the defaults block is out of date; run python -m cxrkeras.config --write {path}",
                  file=sys.stderr)
            return 1
        return 0
    if new != text:
        from cxrkeras.fileio import atomic_write

        atomic_write(path, new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
