"""Localisation score of Grad-CAM on NIH's boxes: pointing game and IoU, per label, beside a seeded random baseline."""

import csv
import os
import warnings
import zlib
from collections import OrderedDict, defaultdict

import numpy as np

from cxrkeras.data.boxes import box_mask, read_boxes
from cxrkeras.data.image_index import OUTSIDE_ROOT
from cxrkeras.errors import ConfigError, DataError


# --- scoring one map against one box (pure NumPy) ---


def score_map(heatmap, mask, threshold=0.5):
    """(pointing hit, IoU) of a map at the mask's size: hit = the map's maximum (the first, in raster order, of a
    plateau) lies in the mask; IoU of
    {map >= threshold * max} with the mask. A map with no positive value scores (False, 0.0)."""
    heatmap = np.asarray(heatmap, np.float32)
    peak = float(heatmap.max()) if heatmap.size else 0.0
    if not peak > 0 or not np.isfinite(peak):
        return False, 0.0
    hit = bool(mask.flat[int(np.argmax(heatmap))])
    region = heatmap >= threshold * peak
    union = np.logical_or(region, mask).sum()
    iou = float(np.logical_and(region, mask).sum() / union) if union else 0.0
    return hit, iou


def random_maps(rng, shape, draws):
    """`draws` uniform random maps at the heatmap's own resolution: after the same bilinear upsampling they are
    smooth blobs of the same size as Grad-CAM's, so the baseline differs from Grad-CAM only in where it points."""
    return rng.random((int(draws),) + tuple(shape), dtype=np.float32)


# --- the whole score ---


def box_class(box_label, labels):
    """The model output a box is scored for: its own label, or for a binary any-finding model (`--labels Finding`)
    that output for a box of any NIH label (every box marks a finding); None when the model has neither."""
    from cxrkeras.labels import ANY_FINDING, NIH_LABELS

    if box_label in labels:
        return box_label
    return ANY_FINDING if ANY_FINDING in labels and box_label in NIH_LABELS else None


def _fusion_stats(sel):
    """Pointing and IoU of the lung mask alone and of the fused map (rows scored with a mask model)."""
    if "mask_hit" not in sel[0]:
        return {}
    return {f"{kind}_{name}": float(np.mean([r[f"{kind}_{key}"] for r in sel]))
            for kind in ("mask", "fused") for name, key in (("pointing", "hit"), ("iou", "iou"))}


def _summarise(rows, labels):
    def stats(sel):
        n = len(sel)
        if not n:
            return None
        return OrderedDict(
            cases=n,
            boxes=int(sum(r["boxes"] for r in sel)),
            pointing=float(np.mean([r["hit"] for r in sel])),
            iou=float(np.mean([r["iou"] for r in sel])),
            iou_ge_0_5=float(np.mean([r["iou"] >= 0.5 for r in sel])),
            random_pointing=float(np.mean([r["random_hit"] for r in sel])),
            random_iou=float(np.mean([r["random_iou"] for r in sel])),
            box_area_fraction=float(np.mean([r["box_fraction"] for r in sel])),
            zero_maps=int(sum(r["zero_map"] for r in sel)),
            **_fusion_stats(sel),
        )

    per_label = OrderedDict()
    for label in labels:
        s = stats([r for r in rows if r["label"] == label])
        if s:
            per_label[label] = s
    return per_label, stats(rows)


def _score_case(heatmap, image_shape, region, boxes, threshold, rng, draws, lung=None, fusion=(0.5, 0.0)):
    """Grad-CAM and random maps of one image and label, scored in the image's own pixel frame; `region`: the part
    of the image the model saw (Preprocessor.region). lung: the U-Net's mask probabilities in that frame: the mask
    alone and its fusion with Grad-CAM (fusion = (lambda, sigma)) are scored too."""
    from cxrkeras.explain.overlay import to_original_frame

    height, width = image_shape
    mask = box_mask(boxes, height, width)
    full = to_original_frame(heatmap, height, width, region)
    hit, iou = score_map(full, mask, threshold)
    extra = OrderedDict()
    if lung is not None:
        from cxrkeras.explain.fusion import fuse

        for kind, heat in (("mask", fuse(full, lung, 1.0, fusion[1])), ("fused", fuse(full, lung, *fusion))):
            k_hit, k_iou = score_map(heat, mask, threshold)
            extra.update({f"{kind}_hit": int(k_hit), f"{kind}_iou": round(k_iou, 6)})
    rand = [score_map(to_original_frame(r, height, width, region), mask, threshold)
            for r in random_maps(rng, heatmap.shape, draws)]
    return OrderedDict(hit=int(hit), iou=round(iou, 6), zero_map=int(not heatmap.max() > 0),
                       random_hit=float(np.mean([r[0] for r in rand])),
                       random_iou=round(float(np.mean([r[1] for r in rand])), 6),
                       box_fraction=round(float(mask.mean()), 6), **extra)


def localize(model, boxes_csv, images_dir, threshold=0.5, seed=0, random_draws=10, layer_name=None,
             method="gradcam", batch_size=8, progress=False, log=print, patient_csv=None, mask_model=None,
             fusion_lambda=0.5, fusion_sigma=0.0):
    """Score Grad-CAM of `model` (a keras.Model, a .keras file or a run folder) on every boxed image found.

    Returns a dict: settings, per_label and overall scores (pointing game, mean IoU, fraction with IoU >= 0.5, and the
    same for `random_draws` seeded random maps per box), rows (one per image and label; several boxes of one label
    in one image are scored as their union; for an any-finding model every box counts for its 'Finding' output), and
    the boxes left out (image not found, unreadable, a label the model lacks).
    A model with patient features reads each image's age, sex and view from `patient_csv` (NIH's Data_Entry file).
    mask_model: a U-Net (`cxrkeras train-segmentation`): the mask alone and F = fusion_lambda * mask +
    (1 - fusion_lambda) * Grad-CAM are scored beside Grad-CAM (mask_/fused_ pointing and IoU).
    """
    from cxrkeras.data.image_index import ImageIndex
    from cxrkeras.explain import engine as engine_lib
    from cxrkeras.explain.files import mask_frames, model_inputs
    from cxrkeras.runs import load_source

    if not 0.0 < float(threshold) <= 1.0:
        raise ConfigError(f"threshold must be in (0, 1] (a fraction of each heatmap's maximum), got {threshold}")
    if int(random_draws) < 1:
        raise ConfigError(f"random_draws must be >= 1, got {random_draws}")
    source = load_source(model)
    for note in (source.note, source.preprocessor_note):
        if note:
            log(note)
    net, labels, pre = source.model, source.labels, source.preprocessor
    engine = engine_lib.get_engine(net, layer_name, method)
    fusion = (0.5, 0.0)
    if mask_model is not None:
        from cxrkeras.explain.fusion import check_fusion
        from cxrkeras.segmentation.segment import MaskModel

        fusion = check_fusion(fusion_lambda, fusion_sigma)
        mask_model = mask_model if isinstance(mask_model, MaskModel) else MaskModel(mask_model, batch_size)
    patients = None
    if source.patient is not None or patient_csv is not None:
        from cxrkeras.data.patient import read_patient_csv

        if source.patient is None:
            raise ConfigError("the model takes no patient features: leave out the patient CSV")
        if patient_csv is None:
            raise ConfigError("the model takes age, sex and view: give NIH's Data_Entry CSV (--patient-csv) for them")
        patients = read_patient_csv(patient_csv)
    boxes, bad_rows = read_boxes(boxes_csv)
    index = ImageIndex(images_dir, by_name=True, duplicates="first")
    files = index.names

    by_image = OrderedDict()
    not_found, unknown_label, unreadable = [], [], []
    for b in boxes:
        target = box_class(b["label"], labels)
        if target is None:
            unknown_label.append(f"{b['image']} ({b['label']}, row {b['row']})")
        elif b["image"] in index.outside_names:
            unreadable.append(f"{b['image']}: {OUTSIDE_ROOT}")
        elif b["image"] not in files:
            not_found.append(b["image"])
        else:
            by_image.setdefault(b["image"], defaultdict(list))[target].append(b["box"])
    unreadable = sorted(set(unreadable))
    # images sorted by their labels so that a batch mostly asks for one class (K small in the backward pass)
    order = sorted(by_image, key=lambda name: (tuple(sorted(by_image[name])), name))

    rows = []
    iterator = range(0, len(order), batch_size)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc="localize", unit="batch")
    for start in iterator:
        batch = order[start:start + batch_size]
        arrays, x, good, errors = model_inputs(source, [files[name] for name in batch],
                                               [patients.get(n) for n in batch] if patients else None, batch_size)
        unreadable += [f"{files[batch[i]]}: {reason}" for i, reason in sorted(errors.items())]
        names = [batch[i] for i in good]
        if not names:
            continue
        lungs = mask_frames(mask_model, [files[n] for n in names], arrays) if mask_model is not None else None
        wanted = sorted({labels.index(lbl) for n in names for lbl in by_image[n]})
        with warnings.catch_warnings():  # zero maps are counted in the result (zero_maps) instead
            warnings.simplefilter("ignore", UserWarning)
            maps, probs = engine(x, wanted, batch_size=batch_size)
        for i, (name, arr) in enumerate(zip(names, arrays)):
            for label, label_boxes in sorted(by_image[name].items()):
                col = labels.index(label)
                row = _score_case(maps[i, wanted.index(col)], arr.shape[:2], pre.region(*arr.shape[:2]),
                                  label_boxes, threshold,
                                  np.random.default_rng([int(seed), zlib.crc32(name.encode()), col]), random_draws,
                                  lung=None if lungs is None else lungs[i],
                                  fusion=fusion)
                rows.append(OrderedDict(image=name, label=label, boxes=len(label_boxes), height=arr.shape[0],
                                        width=arr.shape[1], probability=round(float(probs[i, col]), 6), **row,
                                        path=files[name]))
    per_label, overall = _summarise(rows, labels)
    return OrderedDict(
        settings=OrderedDict(model=source.model_path or net.name, layer=engine.layer_name, method=method,
                             threshold=float(threshold), seed=int(seed), random_draws=int(random_draws),
                             image_size=pre.image_size, preprocessing=pre.preprocessing,
                             preprocessor=pre.to_config(), boxes_csv=os.path.abspath(boxes_csv),
                             images_dir=os.path.abspath(images_dir),
                             mask_model=mask_model.path if mask_model is not None else None,
                             fusion_lambda=float(fusion_lambda) if mask_model is not None else None,
                             fusion_sigma=float(fusion_sigma) if mask_model is not None else None),
        boxes_in_file=len(boxes), boxed_images_in_file=len({b["image"] for b in boxes}),
        images_scored=len({r["image"] for r in rows}), overall=overall, per_label=per_label,
        not_found=sorted(set(not_found)), unreadable=unreadable, unknown_label=unknown_label, bad_rows=bad_rows,
        rows=rows)


def format_table(result):
    """A plain-text table: Grad-CAM against the random baseline, per label and overall."""
    head = f"{'label':<20}{'cases':>6}{'pointing':>10}{'random':>8}{'IoU':>8}{'random':>8}{'IoU>=.5':>9}{'box%':>7}"
    lines = [head, "-" * len(head)]

    def line(name, s):
        return (f"{name:<20}{s['cases']:>6}{s['pointing']:>10.3f}{s['random_pointing']:>8.3f}{s['iou']:>8.3f}"
                f"{s['random_iou']:>8.3f}{s['iou_ge_0_5']:>9.3f}{100 * s['box_area_fraction']:>7.1f}")

    for label, s in result["per_label"].items():
        lines.append(line(label, s))
    if result["overall"]:
        lines += ["-" * len(head), line("overall", result["overall"])]
        if "mask_pointing" in result["overall"]:
            lines += _fusion_lines(result)
        zero = result["overall"]["zero_maps"]
        if zero:
            lines.append(f"{zero} of {result['overall']['cases']} Grad-CAM maps are all zero (no positive evidence "
                         "at this layer): scored as misses with IoU 0")
    else:
        lines.append("(no boxed image was scored)")
    st = result["settings"]
    lines.append("cases: boxed (image, label) pairs; several boxes of one label in an image count as their union")
    lines.append(f"layer {st['layer']}, {st['method']}, threshold {st['threshold']} x max, random baseline: "
                 f"{st['random_draws']} uniform maps per box at the heatmap's resolution, seed {st['seed']}")
    lines.append(f"boxed images: {result['boxed_images_in_file']} in the file, {result['images_scored']} scored, "
                 f"{len(result['not_found'])} not found under the images folder, {len(result['unreadable'])} "
                 f"unreadable; boxes with a label the model lacks: {len(result['unknown_label'])}; bad rows: "
                 f"{len(result['bad_rows'])}")
    return "\n".join(lines)


def _fusion_lines(result):
    """Grad-CAM, the lung mask and their fusion side by side (overall), beside the random baseline."""
    o, st = result["overall"], result["settings"]
    lines = ["", f"{'overall, by map':<28}{'pointing':>10}{'IoU':>8}"]
    for name, p, i in (("Grad-CAM", o["pointing"], o["iou"]), ("lung mask", o["mask_pointing"], o["mask_iou"]),
                       (f"fused (lambda {st['fusion_lambda']:g})", o["fused_pointing"], o["fused_iou"]),
                       ("random", o["random_pointing"], o["random_iou"])):
        lines.append(f"{name:<28}{p:>10.3f}{i:>8.3f}")
    return lines


def write_result(result, out_dir):
    """localization.json (everything) and localization.csv (one row per image and label); returns both paths."""
    from cxrkeras.fileio import write_json

    os.makedirs(out_dir, exist_ok=True)
    json_path = write_json(os.path.join(out_dir, "localization.json"), result)
    csv_path = os.path.join(out_dir, "localization.csv")
    fields = list(result["rows"][0]) if result["rows"] else ["image", "label"]
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(result["rows"])
    return json_path, csv_path
