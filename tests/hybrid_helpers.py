"""A synthetic task where texture decides the label: vertical stripes (positive) or smooth blobs (negative) of the
same mean and contrast, as records and a run folder holding an untrained thin model."""

import json
import os

import numpy as np
from PIL import Image


def texture_image(rng, positive, size=64):
    """Stripes of a random period 4-6 px (positive) or low-pass noise (negative), both ~N(128, 40)."""
    if positive:
        period, phase = rng.uniform(4, 6), rng.uniform(0, 2 * np.pi)
        img = np.sin(2 * np.pi * np.arange(size) / period + phase)[None, :].repeat(size, 0)
        img = img + rng.normal(0, 0.3, (size, size))
    else:
        from scipy.ndimage import gaussian_filter

        img = gaussian_filter(rng.normal(0, 1, (size, size)), 3)
    img = (img - img.mean()) / (img.std() + 1e-6)
    return np.clip(128 + 40 * img, 0, 255).astype(np.uint8)


def write_texture_records(root, n=60, seed=0):
    """records folder of n 64 px images (label 'Stripes' on half), one patient each; returns its path."""
    from cxrkeras.data.records import build_records

    rng = np.random.default_rng(seed)
    images = os.path.join(root, "images")
    os.makedirs(images, exist_ok=True)
    rows = ["path,labels,patient_id"]
    for i in range(n):
        positive = i % 2 == 0
        Image.fromarray(texture_image(rng, positive)).save(os.path.join(images, f"t{i:03d}.png"))
        rows.append(f"t{i:03d}.png,{'Stripes' if positive else ''},p{i}")
    csv = os.path.join(root, "labels.csv")
    with open(csv, "w") as f:
        f.write("\n".join(rows) + "\n")
    out = os.path.join(root, "records")
    build_records(csv, images, out, image_size=64, channels=1, shard_size=100, seed=seed, workers=1,
                  progress=False, format="generic", labels="Stripes", split_fractions=(0.5, 0.2, 0.3))
    return out


def write_run(root, records, model):
    """A run folder whose stage 2 holds `model` (as training writes the files the loaders read)."""
    import yaml

    stage = os.path.join(root, "run", "stage2")
    os.makedirs(stage, exist_ok=True)
    model.save(os.path.join(stage, "best.keras"))
    with open(os.path.join(stage, "config.yaml"), "w") as f:
        yaml.safe_dump({"data": {"records": records, "image_size": 32, "equalize": None},
                        "model": {"variant": "vgg16-plain"}}, f)
    with open(os.path.join(stage, "run_info.json"), "w") as f:
        json.dump({"records": records, "image_size": 32}, f)
    return os.path.join(root, "run")
