"""Image/mask pairs from two folders (the layout of Montgomery, Shenzhen and JSRT's lung masks): matched by name,
checked (every image has one mask of its size with two values), read and resized together."""

import os

import numpy as np

from cxrkeras.data.images import ImageError, is_image_name, read_image, resize
from cxrkeras.errors import DataError

MASK_SUFFIXES = ("_mask", "-mask", "_label")  # Shenzhen: CHNCXR_0001_0_mask.png beside CHNCXR_0001_0.png
MAX_PAIRS = 100_000


def _files(folder, what):
    """{stem: path} of the image files directly in `folder` (no sub-folders; links leading outside it skipped)."""
    if not os.path.isdir(folder):
        raise DataError(f"--{what} {folder}: not a folder")
    root = os.path.realpath(folder)
    out, clash = {}, []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if not entry.is_file() or not is_image_name(entry.name):
            continue
        if os.path.commonpath([root, os.path.realpath(entry.path)]) != root:
            continue  # a link to a file outside the folder the user gave is never read
        stem = os.path.splitext(entry.name)[0]
        if stem in out:
            clash.append(entry.name)
        out[stem] = entry.path
    if clash:
        raise DataError(f"--{what} {folder}: two files share the name {os.path.splitext(clash[0])[0]!r} with "
                        f"different extensions ({clash[0]}); keep one")
    if len(out) > MAX_PAIRS:
        raise DataError(f"--{what} {folder}: {len(out):,} images, over the limit of {MAX_PAIRS:,}")
    return out


def _mask_stem(stem):
    for suffix in MASK_SUFFIXES:
        if stem.endswith(suffix):
            return stem[: -len(suffix)]
    return stem


def find_pairs(images_dir, masks_dir):
    """[(name, image_path, mask_path)] sorted by name; DataError naming every image without a mask (and every mask
    without an image)."""
    images = _files(images_dir, "images")
    masks = {}
    for stem, path in _files(masks_dir, "masks").items():
        masks.setdefault(_mask_stem(stem), path)
    if not images:
        raise DataError(f"--images {images_dir}: no image files (.png, .jpg, .tif, .bmp, .dcm) in it")
    missing = sorted(set(images) - set(masks))
    if missing:
        raise DataError(f"{len(missing)} image(s) without a mask in {masks_dir}: "
                        f"{', '.join(os.path.basename(images[s]) for s in missing[:10])}"
                        + (" ..." if len(missing) > 10 else "") + " (a mask has the image's name, or with _mask)")
    orphans = sorted(set(masks) - set(images))
    if orphans:
        raise DataError(f"{len(orphans)} mask(s) without an image in {images_dir}: "
                        f"{', '.join(os.path.basename(masks[s]) for s in orphans[:10])}"
                        + (" ..." if len(orphans) > 10 else ""))
    return [(stem, images[stem], masks[stem]) for stem in sorted(images)]


def read_mask(path):
    """A mask file as bool (H, W): exactly two grey values (or one: all background / all lung), the higher is lung.
    DataError naming the file otherwise."""
    try:
        levels = read_image(path, channels=1)
    except ImageError as exc:
        raise DataError(f"mask {path}: {exc.reason}") from exc
    values = np.unique(levels)
    if len(values) > 2:
        raise DataError(f"mask {path}: {len(values)} distinct grey values (e.g. {', '.join(map(str, values[:4]))}); "
                        "a mask must be binary (two values, e.g. 0 and 255): threshold it, and save it as PNG, not "
                        "JPEG")
    if len(values) == 1:
        return np.full(levels.shape, bool(values[0] > 0))
    return levels == values[-1]


def read_pair(name, image_path, mask_path, image_size):
    """(uint8 (S, S) image, float32 (S, S) {0, 1} mask): the image resized as build-records does (PIL Lanczos), the
    mask bilinearly with the image and thresholded at one half. DataError naming the file for a bad pair."""
    try:
        image = read_image(image_path, channels=1)
    except ImageError as exc:
        raise DataError(f"image {image_path}: {exc.reason}") from exc
    mask = read_mask(mask_path)
    if mask.shape != image.shape:
        raise DataError(f"{name}: mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but image {image_path} is "
                        f"{image.shape[1]}x{image.shape[0]}; a mask must have its image's size")
    return resize(image, (image_size, image_size)), resize_mask(mask, image_size)


def resize_mask(mask, size):
    """bool/float (H, W) -> float32 {0, 1} (size, size): bilinear, thresholded at 0.5."""
    from PIL import Image

    img = Image.fromarray(np.asarray(mask, np.float32))
    return (np.asarray(img.resize((size, size), Image.BILINEAR)) >= 0.5).astype(np.float32)
