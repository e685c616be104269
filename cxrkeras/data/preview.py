"""`cxrkeras preview-batch`: a PNG grid of what the model sees (augmented, de-normalised) with each image's labels."""

import math
import os

from cxrkeras.errors import ConfigError, DataError


def _title(image_id, labels, names):
    positives = [name for name, v in zip(names, labels) if v > 0.5]
    text = ", ".join(positives) if positives else "No Finding"
    # wrap long label lists onto a second line so titles stay inside their cell
    if len(text) > 28 and ", " in text:
        cut = text.rfind(", ", 0, 28)
        cut = cut if cut > 0 else text.find(", ")
        text = text[:cut + 1] + "\n" + text[cut + 2:]
    return f"{image_id}\n{text}"


def preview_batch(records_dir, out, *, split="train", stage=1, n=16, image_size=None, seed=0,
                  preprocessing=None, training=True, equalize=None, model=None, dadam=False, online_dadam=None):
    """Write a grid of `n` images of one batch of `build_dataset` (training augmentation unless training=False);
    returns the output path. model: a run folder, .keras file or keras.Model whose preprocessing (image size,
    equalisation, normalisation) the batch goes through; image_size / preprocessing / equalize given here win
    (defaults without a model: 224, torch, none; the normalisation is undone for display, so it does not show).
    dadam: the records' DADAM images (training split, eval view so the patches stay where they were put), each
    patch's box drawn with its label (green: pasted onto No Finding, orange: blended).
    online_dadam: a `cxrkeras.config.DadamConfig`: the training split through online DADAM (eval view), the boxes
    of the patches it put on drawn the same way."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.patches
    import matplotlib.pyplot as plt
    import numpy as np

    from cxrkeras.data import manifest as manifest_lib
    from cxrkeras.data.normalize import denormalize
    from cxrkeras.data.pipeline import build_dataset, data_errors

    if model is not None:
        from cxrkeras.runs import load_source

        pre = load_source(model).preprocessor
        image_size = image_size or pre.image_size
        preprocessing = preprocessing or pre.preprocessing
        equalize = equalize if equalize is not None else pre.equalize
    image_size, preprocessing = image_size or 224, preprocessing or "torch"
    if n < 1:
        raise ConfigError(f"--n must be at least 1, got {n}")
    if not out.lower().endswith(".png"):
        raise ConfigError(f"--out {out!r}: the preview is written as PNG; give a path ending in .png")
    manifest = manifest_lib.load_manifest(records_dir)
    names = manifest["labels"]
    patches, only = {}, None
    if dadam:
        from cxrkeras.data.dadam import read_provenance

        only = (manifest.get("augment") or {}).get("shards")
        if not only:
            raise DataError(f"{records_dir} holds no DADAM images: build it with `cxrkeras build-records ... "
                            f"--augment dadam --boxes BBox_List_2017.csv`")
        split, training, patches = "train", False, read_provenance(records_dir)
    online = None
    if online_dadam is not None:
        from cxrkeras.config import _validate_dadam
        from cxrkeras.data.dadam_online import OnlineDadam

        _validate_dadam(online_dadam)
        if split != "train":  # donors and receivers are training images only
            raise ConfigError(f"--online-dadam shows the training split, not {split!r}")
        online = OnlineDadam(records_dir, online_dadam, split=split, seed=seed, log=lambda *_: None)
    ds = build_dataset(records_dir, split, stage=stage, batch_size=n, training=training or online is not None,
                       augment=online is None, image_size=image_size, preprocessing=preprocessing, seed=seed,
                       drop_remainder=False, return_ids=True, equalize=equalize, shuffle_buffer=256, shards=only,
                       dadam=online)
    with data_errors():
        batch = next(iter(ds), None)
    if online is not None:
        patches = dict(online.events)
    if batch is None:
        raise DataError(f"{records_dir}: split {split!r} has no images for stage {stage}")
    images, labels, ids = batch
    pixels = denormalize(images, preprocessing).numpy().astype(np.uint8)
    labels, image_ids = labels.numpy(), [s.decode() for s in ids["image_id"].numpy()]

    cols = math.ceil(math.sqrt(len(pixels)))
    rows = math.ceil(len(pixels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.9 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    scale = image_size / float(manifest["image_size"][0])  # records are square: the eval view only rescales them
    for ax, img, y, image_id in zip(axes.flat, pixels, labels, image_ids):
        ax.imshow(img, vmin=0, vmax=255)
        ax.set_title(_title(image_id, y, names), fontsize=7)
        for label, (x0, y0, x1, y1), how in patches.get(image_id, ()):
            color = "lime" if how == "normal" else "orange"
            ax.add_patch(matplotlib.patches.Rectangle((x0 * scale - 0.5, y0 * scale - 0.5), (x1 - x0) * scale,
                                                      (y1 - y0) * scale, fill=False, edgecolor=color, linewidth=1.2))
            ax.text(x0 * scale, y0 * scale - 1.5, label, color=color, fontsize=6, va="bottom")
    mode = ("DADAM, eval view" if dadam else f"online DADAM p={online_dadam.probability:g}, eval view" if online
            else "augmented" if training else "eval view") + \
        (f", {equalize}" if equalize else "")
    fig.suptitle(f"{os.path.basename(os.path.normpath(records_dir))} {split} stage {stage} ({mode}, "
                 f"{image_size}px, {preprocessing}, seed {seed})", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.975))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
