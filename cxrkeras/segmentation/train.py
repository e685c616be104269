"""`train_segmentation`: a U-Net on image/mask folders, split patient-wise, trained with BCE + Dice, Dice and IoU
reported per split; writes unet.keras, metrics.json, split.csv and history.json to the output folder."""

import dataclasses
import os
from typing import Optional

import numpy as np

from cxrkeras.config import doc
from cxrkeras.constants import SPLITS
from cxrkeras.errors import ConfigError, DataError

MODEL_FILE = "unet.keras"
MAX_IMAGE_SIZE, MAX_EPOCHS, MAX_BATCH = 1024, 10_000, 1024
MAX_MEMORY = 16 << 30  # images (uint8) and masks (float32) are held in memory at the training size


@dataclasses.dataclass
class SegmentationConfig:
    """What `cxrkeras train-segmentation` trains (its options)."""

    images: str = doc("", "folder of radiographs")
    masks: str = doc("", "folder of binary lung masks with the images' names (or NAME_mask)")
    out: str = doc("runs/unet", "output folder")
    image_size: int = doc(256, "square size images and masks are resized to (a multiple of 2**depth)")
    depth: int = doc(4, "U-Net poolings")
    width: int = doc(16, "filters at the first level (doubling at each pooling)")
    epochs: int = doc(30)
    batch_size: int = doc(8)
    lr: float = doc(1e-3, "Adam learning rate")
    seed: int = doc(0)
    split_fractions: tuple = doc(None, "train, val, test fractions", factory=lambda: (0.7, 0.15, 0.15))
    equalize: Optional[str] = doc(None, "null | hist | clahe, as the classifier's Preprocessor")
    patient_csv: Optional[str] = doc(None, "CSV with an image-name column and a patient column: split by patient")
    image_column: str = doc("Image Index")
    patient_column: str = doc("Patient ID")

    def check(self):
        from cxrkeras.data.split import parse_fractions

        for key, value, lo, hi in (("image_size", self.image_size, 16, MAX_IMAGE_SIZE),
                                   ("epochs", self.epochs, 1, MAX_EPOCHS),
                                   ("batch_size", self.batch_size, 1, MAX_BATCH)):
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise ConfigError(f"{key} must be an integer in [{lo}, {hi}], got {value!r}")
        if not 0 < float(self.lr) < 1:
            raise ConfigError(f"lr must be in (0, 1), got {self.lr}")
        self.split_fractions = parse_fractions(self.split_fractions)
        return self


def _patients(config, pairs):
    """Patient of each pair: from --patient-csv (every image must be in it), else each image its own patient."""
    if not config.patient_csv:
        return [name for name, _, _ in pairs]
    import pandas as pd

    try:
        table = pd.read_csv(config.patient_csv, dtype=str, usecols=[config.image_column, config.patient_column])
    except ValueError as exc:
        raise DataError(f"--patient-csv {config.patient_csv}: needs columns {config.image_column!r} and "
                        f"{config.patient_column!r} ({exc})") from exc
    except (OSError, pd.errors.ParserError) as exc:
        raise DataError(f"--patient-csv {config.patient_csv}: cannot be read ({type(exc).__name__})") from exc
    by_name = {}
    for image, patient in zip(table[config.image_column], table[config.patient_column]):
        if isinstance(image, str) and isinstance(patient, str) and patient.strip():
            by_name[os.path.splitext(os.path.basename(image.strip()))[0]] = patient.strip()
    missing = [name for name, _, _ in pairs if name not in by_name]
    if missing:
        raise DataError(f"--patient-csv {config.patient_csv}: no patient for {len(missing)} image(s), e.g. "
                        f"{', '.join(missing[:5])} (column {config.image_column!r} holds the image file names)")
    return [by_name[name] for name, _, _ in pairs]


def load_pairs(config, log=print):
    """(names, uint8 images (N, S, S), float32 masks (N, S, S), split index per image) of the two folders."""
    from cxrkeras.data.split import stratify_patients
    from cxrkeras.segmentation.pairs import find_pairs, read_pair

    pairs = find_pairs(config.images, config.masks)
    need = len(pairs) * config.image_size ** 2 * 5
    if need > MAX_MEMORY:
        raise ConfigError(f"{len(pairs):,} pairs at {config.image_size} px need {need / 2 ** 30:.1f} GiB in memory, "
                          f"over the {MAX_MEMORY >> 30} GiB limit: lower --image-size")
    images, masks = [], []
    for name, image_path, mask_path in pairs:
        image, mask = read_pair(name, image_path, mask_path, config.image_size)
        images.append(image)
        masks.append(mask)
    patients = _patients(config, pairs)
    # every image carries the one "label": the greedy split then balances image counts over whole patients
    split = stratify_patients(patients, np.ones((len(pairs), 1), np.int64), config.split_fractions, config.seed)
    log(f"{len(pairs)} image/mask pairs of {len(set(patients))} patients: "
        + ", ".join(f"{s} {int(np.sum(split == i))}" for i, s in enumerate(SPLITS)))
    return [n for n, _, _ in pairs], np.stack(images), np.stack(masks), split


def dataset(preprocessor, images, masks=None, batch_size=8, shuffle_seed=None):
    """tf.data batches of (model input, mask[..., None]) or model input alone, through the Preprocessor."""
    import tensorflow as tf

    x = tf.data.Dataset.from_tensor_slices(images[..., None])
    ds = x if masks is None else tf.data.Dataset.zip((x, tf.data.Dataset.from_tensor_slices(masks[..., None])))
    if shuffle_seed is not None:
        ds = ds.shuffle(len(images), seed=shuffle_seed, reshuffle_each_iteration=True)

    def prepare(image, *mask):
        x = preprocessor.model_input(preprocessor.equalize_stored(image))
        return (x, *mask) if mask else x

    return ds.batch(batch_size).map(prepare, num_parallel_calls=tf.data.AUTOTUNE).prefetch(2)


def predict_masks(model, preprocessor, images, batch_size=8):
    """Mask probabilities (N, S, S) of stored-size uint8 images."""
    from cxrkeras.inference import inference_step

    step = inference_step(model)
    out = [np.asarray(step(x))[..., 0] for x in dataset(preprocessor, images, batch_size=batch_size)]
    return np.concatenate(out) if out else np.zeros((0,) + images.shape[1:3], np.float32)


def train_segmentation(config, log=print):
    """Train, pick the epoch of lowest validation loss, report Dice/IoU per split; returns the metrics dict."""
    import keras

    from cxrkeras.data.preprocessor import Preprocessor
    from cxrkeras.fileio import utc_now, write_json
    from cxrkeras.models.unet import build_unet
    from cxrkeras.runs import load_keras_model
    from cxrkeras.segmentation.metrics import bce_dice_loss, dice_iou, summarise

    config.check()
    size = config.image_size
    preprocessor = Preprocessor(image_size=size, preprocessing="torch", equalize=config.equalize,
                                stored_size=(size, size), channels=1)
    model = build_unet(size, config.depth, config.width, preprocessor.to_config())  # checks depth/width first
    names, images, masks, split = load_pairs(config, log)
    os.makedirs(config.out, exist_ok=True)
    keras.utils.set_random_seed(config.seed)
    model.compile(optimizer=keras.optimizers.Adam(config.lr), loss=bce_dice_loss)
    train, val = split == 0, split == 1
    path = os.path.join(config.out, MODEL_FILE)
    callbacks = [keras.callbacks.ModelCheckpoint(path, monitor="val_loss" if val.any() else "loss",
                                                 save_best_only=True)]
    history = model.fit(dataset(preprocessor, images[train], masks[train], config.batch_size, config.seed),
                        validation_data=dataset(preprocessor, images[val], masks[val], config.batch_size)
                        if val.any() else None, epochs=config.epochs, callbacks=callbacks,
                        shuffle=False, verbose=0)  # the dataset shuffles itself
    best = load_keras_model(path)
    probs = predict_masks(best, preprocessor, images, config.batch_size)
    dice, iou = dice_iou(probs >= 0.5, masks > 0.5)
    per_split = {s: summarise(dice[split == i], iou[split == i]) for i, s in enumerate(SPLITS)}
    losses = history.history.get("val_loss") or history.history["loss"]
    metrics = dict(created=utc_now(), model=MODEL_FILE, best_epoch=int(np.argmin(losses)) + 1,
                   config={k: v for k, v in dataclasses.asdict(config).items()}, preprocessor=preprocessor.to_config(),
                   params=int(sum(np.prod(w.shape) for w in best.trainable_weights)), splits=per_split,
                   threshold=0.5)
    write_json(os.path.join(config.out, "metrics.json"), metrics)
    write_json(os.path.join(config.out, "history.json"), {k: [float(v) for v in vs]
                                                          for k, vs in history.history.items()})
    import pandas as pd

    pd.DataFrame({"image": names, "split": [SPLITS[i] for i in split], "dice": dice, "iou": iou}).to_csv(
        os.path.join(config.out, "split.csv"), index=False)
    for s, m in per_split.items():
        if m["n"]:
            log(f"{s:5s}  n={m['n']:4d}  Dice {m['dice_mean']:.3f} (median {m['dice_median']:.3f})  "
                f"IoU {m['iou_mean']:.3f}")
    log(f"best epoch {metrics['best_epoch']}/{config.epochs}; wrote {path}")
    return metrics
