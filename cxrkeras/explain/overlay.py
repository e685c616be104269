"""Heatmap display: bilinear upsampling into the original image's frame, colour maps, blends, grids, figures."""

import math
import os

import numpy as np


def upsample(heatmap, height, width):
    """Bilinear resize of a [h, w] map to [height, width] (float32, values kept in the input's range)."""
    from PIL import Image

    heat = np.asarray(heatmap, dtype=np.float32)
    if heat.shape == (height, width):
        return heat.copy()
    return np.asarray(Image.fromarray(heat).resize((int(width), int(height)), Image.BILINEAR), dtype=np.float32)


def to_original_frame(heatmap, height, width, region=None):
    """The map in the original image's pixel frame.

    region = (top, left, crop_height, crop_width): the part of the original the model saw (a centre crop); the map is
    stretched over it and is zero elsewhere. None: the model saw the whole image (resized).
    """
    if region is None:
        return upsample(heatmap, height, width)
    top, left, ch, cw = (int(round(v)) for v in region)
    out = np.zeros((int(height), int(width)), np.float32)
    out[top:top + ch, left:left + cw] = upsample(heatmap, ch, cw)[: max(0, height - top), : max(0, width - left)]
    return out


def to_display(image):
    """Any image (model input space, [0, 1], [0, 255], gray or RGB) → uint8 RGB [H, W, 3], min-max stretched."""
    img = np.asarray(image, dtype=np.float32)
    if img.ndim == 2:
        img = img[..., None]
    if img.shape[-1] == 4:
        img = img[..., :3]
    if img.shape[-1] == 1:
        img = np.repeat(img, 3, axis=-1)
    img = np.nan_to_num(img)
    lo, hi = float(img.min()), float(img.max())
    img = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
    return (img * 255.0 + 0.5).astype(np.uint8)


def colorize(heatmap, colormap="jet"):
    """[H, W] in [0, 1] → uint8 RGB through a matplotlib colour map."""
    from matplotlib import colormaps

    rgba = colormaps[colormap](np.clip(np.asarray(heatmap, np.float32), 0.0, 1.0))
    return (rgba[..., :3] * 255.0 + 0.5).astype(np.uint8)


def blend(image_rgb, heatmap, colormap="jet", image_weight=0.6, region=None):
    """uint8 RGB overlay at the image's size: image_weight * image + (1 - image_weight) * coloured heatmap."""
    image_rgb = np.asarray(image_rgb)
    if image_rgb.dtype != np.uint8 or image_rgb.ndim != 3 or image_rgb.shape[-1] != 3:
        image_rgb = to_display(image_rgb)
    h, w = image_rgb.shape[:2]
    colour = colorize(to_original_frame(heatmap, h, w, region), colormap).astype(np.float32)
    out = image_weight * image_rgb.astype(np.float32) + (1.0 - image_weight) * colour
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def grid_display(array, num_rows=None, num_columns=None):
    """Tiles [N, H, W, 3] into one image, as square as possible (tf-explain's layout); empty cells are black."""
    array = np.asarray(array)
    n = len(array)
    if num_columns is None:
        num_columns = math.ceil(math.sqrt(n)) if num_rows is None else math.ceil(n / num_rows)
    if num_rows is None:
        num_rows = math.ceil(n / num_columns)
    cells = list(array) + [np.zeros_like(array[0])] * (num_rows * num_columns - n)
    rows = [np.concatenate(cells[r * num_columns:(r + 1) * num_columns], axis=1) for r in range(num_rows)]
    return np.concatenate(rows, axis=0)


def overlay_figure(image, heatmap, path, label, probability=None, alpha=0.4, colormap="jet", region=None,
                   note=None, min_side=384):
    """Save a PNG: the original image (its own size and aspect) with the heatmap blended over it, titled with the
    label and probability, and a colour bar. Images smaller than min_side are drawn enlarged, aspect kept."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.patches import Rectangle

    rgb = to_display(image)
    h, w = rgb.shape[:2]
    heat = to_original_frame(heatmap, h, w, region)
    scale = max(1.0, min_side / max(h, w))
    dpi = 100.0
    side = max(h, w) * scale
    band, bar = 0.12 * side, 0.045 * side  # title band height, colour bar width (pixels)
    fig_w, fig_h = w * scale + bar * 3.2, h * scale + band
    fig = Figure(figsize=(fig_w / dpi, fig_h / dpi), dpi=dpi, facecolor="white")
    FigureCanvasAgg(fig)
    ax = fig.add_axes([0, 0, w * scale / fig_w, h * scale / fig_h])
    ax.imshow(rgb, interpolation="bilinear")
    opacity = np.full((h, w), float(alpha), np.float32)
    if region is not None:  # only the part the model saw is coloured; its outline is drawn
        top, left, ch, cw = region
        opacity[:] = 0.0
        opacity[top:top + ch, left:left + cw] = float(alpha)
        if (ch, cw) != (h, w):
            ax.add_patch(Rectangle((left - 0.5, top - 0.5), cw, ch, fill=False, edgecolor="white",
                                   linestyle="--", linewidth=1.0))
    ax.imshow(heat, cmap=colormap, vmin=0.0, vmax=1.0, alpha=opacity, interpolation="bilinear")
    ax.set_axis_off()
    cax = fig.add_axes([(w * scale + bar * 0.4) / fig_w, 0.05 * h * scale / fig_h, bar * 0.6 / fig_w,
                        0.9 * h * scale / fig_h])
    cbar = fig.colorbar(ScalarMappable(Normalize(0.0, 1.0), colormap), cax=cax)  # opaque, unlike the overlay
    font = max(7.0, band * 0.28 * 72.0 / dpi)
    cbar.ax.tick_params(labelsize=font * 0.6)
    title = label if probability is None else f"{label}: p = {float(probability):.3f}"
    fig.text(0.02, 1.0 - band * 0.38 / fig_h, title, fontsize=font, va="center", ha="left", weight="bold")
    if note:
        fig.text(0.02, 1.0 - band * 0.78 / fig_h, note, fontsize=max(6.0, font * 0.55), va="center", ha="left",
                 color="0.3")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=dpi, facecolor="white")
    return path
