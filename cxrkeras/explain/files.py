"""Grad-CAM on image files (PNG/JPEG/DICOM): the run's model and `Preprocessor` through the serving graph's input
path, so an explained file is the very input a served request or an evaluated record gives the model."""

import os
import re
import warnings

import numpy as np

from cxrkeras.errors import ConfigError, DataError


def _safe(text):
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


def read_inputs(paths, preprocessor, batch_size=8):
    """(originals uint8 [H, W] for display, model inputs float32 [n, S, S, 3], indices of those n in `paths`,
    {index: reason} of the files that cannot be used): each file through `preprocessor` exactly as `predict` and
    the SavedModel take it."""
    from cxrkeras.data.images import ImageError, read_image
    from cxrkeras.export.predict import FileError, read_file_bytes
    from cxrkeras.export.serving import inputs_of

    originals, blobs, readable, errors = {}, [], [], {}
    for i, path in enumerate(paths):
        try:
            blobs.append(read_file_bytes(path))
            originals[i] = read_image(path, channels=1)
            readable.append(i)
        except (FileError, ImageError) as exc:
            errors[i] = getattr(exc, "reason", None) or str(exc)
            if len(blobs) > len(readable):
                blobs.pop()
    x, good, bad = inputs_of(blobs, preprocessor, batch_size)
    errors.update({readable[j]: reason for j, reason in bad.items()})
    good = [readable[j] for j in good]
    return [originals[i] for i in good], x, good, errors


def model_inputs(source, paths, patient=None, batch_size=8, dataset=None):
    """`read_inputs` for a ModelSource: (originals, what the model takes, indices of the usable files, {index:
    reason}). A model with patient features takes (images, features): `patient` holds (age, sex, view) per path
    (None: missing), encoded by the model's encoder; a file without usable values is named in the errors. A model
    with the FPSM dataset embedding takes (images, dataset index [N, 1]): `dataset`, the name of the files' source
    dataset (default: the model's first)."""
    from cxrkeras.data.datasets import resolve

    originals, x, good, errors = read_inputs(paths, source.preprocessor, batch_size)
    if source.datasets:
        return originals, (x, np.full((len(x), 1), resolve(source.datasets, dataset), np.int32)), good, errors
    if dataset is not None:
        raise ConfigError("the model takes no dataset input (no FPSM dataset embedding): leave out --dataset")
    if source.patient is None:
        if patient is not None and any(v is not None for v in patient):
            raise ConfigError("the model takes no patient features (age, sex, view): leave them out")
        return originals, x, good, errors
    patient = list(patient) if patient is not None else [None] * len(paths)
    encoder = source.patient
    missing = [i for i in good if patient[i] is None]
    given = [i for i in good if patient[i] is not None]
    problems = dict(zip(given, encoder.check_values(*zip(*[patient[i] for i in given])))) if given else {}
    for i in good:
        reason = "age, sex and view are needed for this model" if i in missing else problems.get(i)
        if reason:
            errors[i] = reason
    keep = [j for j, i in enumerate(good) if i not in errors]
    good = [good[j] for j in keep]
    originals, images = [originals[j] for j in keep], x[keep]
    from cxrkeras.data.patient import value_tensors

    features = encoder.encode(**value_tensors([patient[i] for i in good])).numpy() if good else \
        np.zeros((0, encoder.width), np.float32)
    return originals, (images, features), good, errors


def mask_frames(mask_model, paths, originals):
    """The U-Net's mask probabilities of `paths` in each original's frame (None without a mask model); a file the
    U-Net cannot read is an error naming it."""
    if mask_model is None:
        return None
    _, frames, good, errors = mask_model.probabilities(paths)
    if errors:
        at = min(errors)
        raise DataError(f"image {paths[at]} (mask model): {errors[at]}")
    if len(frames) != len(originals) or any(f.shape != o.shape[:2] for f, o in zip(frames, originals)):
        raise DataError("the mask model and the classifier read these images differently; check the files")
    return frames


def explain_files(model, images, out_dir, top_k=3, class_names=None, layer_name=None, method="gradcam",
                  alpha=0.4, batch_size=8, log=print, patient=None, mask_model=None, fusion_lambda=0.5,
                  fusion_sigma=0.0, dataset=None):
    """Write one overlay PNG per image and class to out_dir plus gradcam.json; returns the list of entries.

    model: a run folder, a stage folder, a .keras file or a keras.Model built by cxrkeras (its stored or rebuilt
    `Preprocessor` prepares the images). Classes: `class_names` (names or indices) for every image, else each
    image's `top_k` most probable labels. One backward pass per batch covers all classes asked for in that batch.
    patient: for a model with patient features, (age, sex, view) of each image (a list aligned with `images`).
    dataset: for a model with the FPSM dataset embedding, the images' source dataset (default: its first); the
    heatmap explains the summed score the model gives with that dataset's embedding.
    mask_model: a U-Net from `cxrkeras train-segmentation` (folder or .keras): each overlay also gets a fused one,
    F = fusion_lambda * mask + (1 - fusion_lambda) * Grad-CAM in the image's frame (explain/fusion.py).
    """
    from cxrkeras.explain.engine import get_engine
    from cxrkeras.explain.overlay import overlay_figure, to_original_frame
    from cxrkeras.explain.target import resolve_classes
    from cxrkeras.fileio import write_json
    from cxrkeras.inference import inference_step
    from cxrkeras.runs import load_source

    if not images:
        raise ConfigError("no image given: pass one or more PNG/JPEG/DICOM files")
    source = load_source(model)
    for note in (source.note, source.preprocessor_note):
        if note:
            log(note)
    net, labels, pre = source.model, source.labels, source.preprocessor
    engine = get_engine(net, layer_name, method)
    if mask_model is not None:
        from cxrkeras.explain.fusion import check_fusion
        from cxrkeras.segmentation.segment import MaskModel

        check_fusion(fusion_lambda, fusion_sigma)
        mask_model = mask_model if isinstance(mask_model, MaskModel) else MaskModel(mask_model, batch_size)
    fixed = None
    if class_names:
        fixed, _ = resolve_classes(net, list(class_names), engine.num_outputs)
    elif not 1 <= int(top_k) <= len(labels):
        raise ConfigError(f"top_k must be between 1 and {len(labels)} (the model's labels), got {top_k}")
    os.makedirs(out_dir, exist_ok=True)
    entries, stems = [], set()
    for start in range(0, len(images), batch_size):
        paths = list(images[start:start + batch_size])
        values = list(patient[start:start + batch_size]) if patient is not None else None
        originals, x, _, errors = model_inputs(source, paths, values, batch_size, dataset)
        if errors:
            at = min(errors)
            raise DataError(f"image {paths[at]}: {errors[at]}")
        if fixed is None:
            probs = np.asarray(inference_step(net)(x))
            chosen = [list(np.argsort(-p, kind="stable")[:int(top_k)]) for p in probs]
        else:
            chosen = [list(fixed) for _ in paths]
        wanted = sorted({int(c) for cs in chosen for c in cs})
        with warnings.catch_warnings():  # zero maps are flagged in the entries (heatmap_max 0) instead
            warnings.simplefilter("ignore", UserWarning)
            maps, probs = engine(x, wanted, batch_size=batch_size)
        masks = mask_frames(mask_model, paths, originals)
        for i, (path, original) in enumerate(zip(paths, originals)):
            stem = _safe(os.path.splitext(os.path.basename(path))[0])
            if stem in stems:  # same file name from another folder: keep both
                stem = f"{stem}-{start + i + 1}"
            stems.add(stem)
            region = pre.region(*original.shape[:2])
            for rank, index in enumerate(chosen[i], start=1):
                label = labels[int(index)]
                heat = maps[i, wanted.index(int(index))]
                out = os.path.join(out_dir, f"{stem}_{rank}_{_safe(label)}.png")
                note = f"{os.path.basename(path)} | {method} at {engine.layer_name}"
                overlay_figure(original, heat, out, label, float(probs[i, index]), alpha=alpha, region=region,
                               note=note)
                full = to_original_frame(heat, *original.shape[:2], region)
                peak = [int(v) for v in np.unravel_index(full.argmax(), full.shape)]
                entry = dict(image=path, label=label, probability=round(float(probs[i, index]), 6), rank=rank,
                             overlay=out, peak_row_col=peak, heatmap_max=float(heat.max()))
                if masks is not None:
                    from cxrkeras.explain.fusion import fuse

                    fused = fuse(full, masks[i], fusion_lambda, fusion_sigma)
                    entry["fused_overlay"] = out[:-4] + "_fused.png"
                    overlay_figure(original, fused, entry["fused_overlay"], label, float(probs[i, index]),
                                   alpha=alpha, note=f"{note} fused with the lung mask, lambda {fusion_lambda:g}")
                    entry["fused_peak_row_col"] = [int(v) for v in np.unravel_index(fused.argmax(), fused.shape)]
                entries.append(entry)
    write_json(os.path.join(out_dir, "gradcam.json"), dict(
        model=source.model_path or getattr(net, "name", None), layer=engine.layer_name, method=method,
        image_size=pre.image_size, preprocessing=pre.preprocessing, preprocessor=pre.to_config(), overlays=entries,
        fusion=dict(mask_model=mask_model.path, fusion_lambda=float(fusion_lambda), sigma=float(fusion_sigma))
        if mask_model is not None else None))
    return entries
