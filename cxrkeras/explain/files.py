"""Grad-CAM on image files (PNG/JPEG/DICOM): load a run's model, preprocess as evaluation does, write overlays."""

import json
import os
import re
import warnings

import numpy as np

from cxrkeras.errors import ConfigError, CxrError, DataError


def load_model(path):
    """A .keras file, or a run folder (its best model: stage 2's, else stage 1's)."""
    from cxrkeras.evaluation.source import load_keras_model
    from cxrkeras.training.rundir import best_model_path

    if not os.path.exists(path):
        raise CxrError(f"model {path!r} not found: give a run folder (runs/<name>) or a .keras file")
    model_file = best_model_path(path) if os.path.isdir(path) else path
    if not model_file.endswith(".keras"):
        raise CxrError(f"model {path!r} is not a .keras file or a run folder")
    return load_keras_model(model_file)


def model_inputs_spec(model):
    """(image_size, preprocessing mode, label names) of a cxrkeras model, from model_info."""
    from cxrkeras.explain.target import model_metadata

    info = model_metadata(model)
    if not info:
        raise ConfigError(f"model {model.name!r} was not built by cxrkeras (no model_info): its preprocessing and "
                          "labels are unknown; use the Python API (GradCAM / compute_heatmaps) on preprocessed arrays")
    height, width = info["input_shape"][:2]
    if height != width:
        raise ConfigError(f"model input {height}x{width} is not square; the eval transform makes square images")
    return int(height), info["preprocessing"], list(info["labels"])


def load_inputs(paths, image_size, mode):
    """(originals uint8 [H, W] list, model inputs [N, S, S, 3]); an unreadable file raises DataError naming it."""
    import tensorflow as tf

    from cxrkeras.data.images import ImageError, read_image
    from cxrkeras.data.preprocess import preprocess_for_eval

    originals, inputs = [], []
    for path in paths:
        try:
            arr = read_image(path, channels=1)
        except ImageError as exc:
            raise DataError(f"image {path}: {exc.reason}") from exc
        originals.append(arr)
        inputs.append(preprocess_for_eval(tf.constant(arr[..., None], tf.float32), image_size, mode).numpy())
    return originals, np.stack(inputs)


def central_square(height, width):
    """The region (top, left, side, side) of the original that preprocess_for_eval shows the model."""
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side, side


def _safe(text):
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


def explain_files(model, images, out_dir, top_k=3, class_names=None, layer_name=None, method="gradcam",
                  alpha=0.4, batch_size=8):
    """Write one overlay PNG per image and class to out_dir plus gradcam.json; returns the list of entries.

    Classes: `class_names` (names or indices) for every image, else each image's `top_k` most probable labels.
    One backward pass per batch covers all classes asked for in that batch.
    """
    from cxrkeras.explain.gradcam import get_engine
    from cxrkeras.explain.overlay import overlay_figure, to_original_frame
    from cxrkeras.explain.target import resolve_classes

    if not images:
        raise ConfigError("no image given: pass one or more PNG/JPEG/DICOM files")
    model_ref = model if isinstance(model, str) else model.name
    if isinstance(model, str):
        model = load_model(model)
    size, mode, labels = model_inputs_spec(model)
    engine = get_engine(model, layer_name, method)
    fixed = None
    if class_names:
        fixed, _ = resolve_classes(model, list(class_names), engine.num_outputs)
    elif not 1 <= int(top_k) <= len(labels):
        raise ConfigError(f"top_k must be between 1 and {len(labels)} (the model's labels), got {top_k}")
    os.makedirs(out_dir, exist_ok=True)
    entries, stems = [], set()
    for start in range(0, len(images), batch_size):
        paths = list(images[start:start + batch_size])
        originals, x = load_inputs(paths, size, mode)
        if fixed is None:
            probs = np.asarray(model(x, training=False))
            chosen = [list(np.argsort(-p, kind="stable")[:int(top_k)]) for p in probs]
        else:
            chosen = [list(fixed) for _ in paths]
        wanted = sorted({int(c) for cs in chosen for c in cs})
        with warnings.catch_warnings():  # zero maps are flagged in the entries (heatmap_max 0) instead
            warnings.simplefilter("ignore", UserWarning)
            maps, probs = engine(x, wanted, batch_size=batch_size)
        for i, (path, original) in enumerate(zip(paths, originals)):
            stem = _safe(os.path.splitext(os.path.basename(path))[0])
            if stem in stems:  # same file name from another folder: keep both
                stem = f"{stem}-{start + i + 1}"
            stems.add(stem)
            region = central_square(*original.shape[:2])
            for rank, index in enumerate(chosen[i], start=1):
                label = labels[int(index)]
                heat = maps[i, wanted.index(int(index))]
                out = os.path.join(out_dir, f"{stem}_{rank}_{_safe(label)}.png")
                note = f"{os.path.basename(path)} | {method} at {engine.layer_name}"
                overlay_figure(original, heat, out, label, float(probs[i, index]), alpha=alpha, region=region,
                               note=note)
                full = to_original_frame(heat, *original.shape[:2], region)
                peak = [int(v) for v in np.unravel_index(full.argmax(), full.shape)]
                entries.append(dict(image=path, label=label, probability=round(float(probs[i, index]), 6),
                                    rank=rank, overlay=out, peak_row_col=peak, heatmap_max=float(heat.max())))
    with open(os.path.join(out_dir, "gradcam.json"), "w", encoding="utf-8") as f:
        json.dump(dict(model=model_ref, layer=engine.layer_name, method=method, image_size=size,
                       preprocessing=mode, overlays=entries), f, indent=2)
    return entries
