"""Typed training configuration: dataclass defaults, YAML files and `key=value` overrides on top, validation."""

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from typing import Optional

import yaml

from cxrkeras.data.manifest import VERIFY_MODES
from cxrkeras.errors import ConfigError

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("plateau", "cosine", "constant")
MIXED_PRECISION = ("auto", "on", "off")
STRATEGIES = ("auto", "default", "mirrored", "multi_worker")
EQUALIZE = ("hist", "clahe")
PREPROCESSING = ("torch", "caffe")  # cxrkeras.data.preprocess.MODES (that module needs TensorFlow)
# Names other tools use for our keys: suggested when difflib finds nothing close.
KEY_ALIASES = {"learning_rate": "lr", "optimiser": "optimizer", "wd": "weight_decay", "img_size": "image_size",
               "input_size": "image_size", "batch": "batch_size", "num_epochs": "epochs", "backbone": "variant",
               "arch": "variant", "scheduler": "schedule", "lr_schedule": "schedule", "focal_gamma": "gamma",
               "focal_alpha": "alpha", "amp": "mixed_precision", "jit_compile": "xla"}


@dataclass
class DataConfig:
    """Where the records are and how batches are made (`batch_size` is the GLOBAL batch, over all replicas)."""

    records: str = "tfrecords/nih-256"
    image_size: int = 224
    batch_size: int = 32
    shuffle_buffer: int = 2048
    cache: bool = False
    equalize: Optional[str] = None  # None | "hist" | "clahe" (histogram equalisation at read time)
    train_split: str = "train"
    val_split: str = "val"
    verify_records: str = "sha256"  # "sha256": shards must match the manifest's size and sha256; "size": sizes only


@dataclass
class ModelConfig:
    """Which network: a registered variant, its initial weights and extra `build_model` keyword overrides
    (lka_blocks, lka_form, width_multiplier, blocks, bn_epsilon, bn_momentum, final_relu)."""

    variant: str = "densenet121-lka-last2"
    weights: Optional[str] = "imagenet"  # "imagenet", "torchvision", None, or a weights file / PyTorch checkpoint
    dropout: Optional[float] = None  # None: the variant's default
    preprocessing: Optional[str] = None  # None: what the initial weights expect ("torch", or "caffe" for plain VGG16)
    overrides: dict = field(default_factory=dict)


@dataclass
class OptimConfig:
    """Optimiser and learning-rate schedule (plateau: x`factor` after `patience` epochs without a better val AUC)."""

    optimizer: str = "adam"
    lr: float = 1e-4
    weight_decay: float = 1e-4  # used by adamw only
    momentum: float = 0.9  # used by sgd only
    nesterov: bool = True  # used by sgd only
    clipnorm: Optional[float] = None
    schedule: str = "plateau"
    patience: int = 2
    factor: float = 0.1
    min_lr: float = 1e-7
    cosine_alpha: float = 0.0  # final lr = lr * cosine_alpha


@dataclass
class LossConfig:
    """Stage-2 sigmoid focal loss (keras.losses.BinaryFocalCrossentropy); stage 1 uses plain binary cross-entropy.

    Defaults: gamma 2.0 and alpha 0.25 (Lin et al. 2017), class balancing off (alpha unused then), no smoothing.
    """

    gamma: float = 2.0
    alpha: float = 0.25
    apply_class_balancing: bool = False
    label_smoothing: float = 0.0


@dataclass
class TrainConfig:
    """Epoch loop, devices and monitoring. `steps_per_epoch` None: one pass over the stage's training images."""

    epochs: int = 10
    early_stopping_patience: int = 5
    freeze_backbone_epochs: int = 0
    mixed_precision: str = "auto"  # auto: on when a GPU is used
    xla: bool = False
    strategy: str = "auto"  # auto: multi_worker if TF_CONFIG is set, mirrored on >=2 GPUs, else default
    seed: int = 42
    steps_per_epoch: Optional[int] = None
    verbose: int = 2  # 0 quiet, 1 Keras progress bar + epoch line, 2 one line per epoch
    gradcam_every: int = 0  # epochs between Grad-CAM snapshots of validation images; 0: off
    gradcam_images: int = 4


@dataclass
class RunConfig:
    """Run folder: <root>/<name>/stage1|stage2/."""

    name: str = "default"
    root: str = "runs"
    overwrite: bool = False


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self):
        return dataclasses.asdict(self)


def _closest(key, choices):
    match = difflib.get_close_matches(key, list(choices), n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _type_name(tp):
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value, tp, where):
    """`value` as the field type `tp` (int/float/bool/str/dict, Optional of those); a ConfigError otherwise."""
    args = getattr(tp, "__args__", None)
    if args and type(None) in args:  # Optional[X]
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "")):
            return None
        tp = next(a for a in args if a is not type(None))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.strip().lower() in ("true", "yes", "on", "1")
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
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist (the bundled ones are in configs/)")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    return data or {}


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
    choice("data.verify_records", config.data.verify_records, VERIFY_MODES)
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
    if not 0 <= config.loss.alpha <= 1:
        raise ConfigError(f"loss.alpha must be in [0, 1], got {config.loss.alpha}")
    if not 0 <= config.loss.label_smoothing < 1:
        raise ConfigError(f"loss.label_smoothing must be in [0, 1), got {config.loss.label_smoothing}")
    if config.model.dropout is not None and not 0 <= config.model.dropout < 1:
        raise ConfigError(f"model.dropout must be in [0, 1), got {config.model.dropout}")
    if not 0 < config.optim.factor < 1:
        raise ConfigError(f"optim.factor must be in (0, 1), got {config.optim.factor}")
    if not config.run.name or os.sep in config.run.name:
        raise ConfigError(f"run.name must be a plain folder name, got {config.run.name!r}")
    return config


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
    return yaml.safe_dump(config.to_dict(), sort_keys=False, default_flow_style=False)
