"""Synthetic image/mask folders for the segmentation tests: a bright noisy disc on a noisy background."""

import os

import numpy as np
from PIL import Image


def write_shapes(root, n, size=32, seed=0, mask_dir="masks", suffix=""):
    """n image/mask PNG pairs under root/images and root/<mask_dir>; returns (images_dir, masks_dir)."""
    rng = np.random.default_rng(seed)
    images, masks = os.path.join(root, "images"), os.path.join(root, mask_dir)
    os.makedirs(images, exist_ok=True)
    os.makedirs(masks, exist_ok=True)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        cy, cx = rng.uniform(0.3, 0.7) * size, rng.uniform(0.3, 0.7) * size
        r = rng.uniform(0.12, 0.25) * size
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        img = rng.normal(90, 20, (size, size)) + 80 * disc
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(os.path.join(images, f"img{i:03d}.png"))
        Image.fromarray((disc * 255).astype(np.uint8)).save(os.path.join(masks, f"img{i:03d}{suffix}.png"))
    return images, masks
