"""Grad-CAM fused with a segmentation mask: F = lambda * M + (1 - lambda) * G, both in the image's own frame and
normalised to [0, 1] (each divided by its maximum, as the heatmap engine normalises Grad-CAM)."""

import numpy as np

from cxrkeras.errors import ConfigError

MAX_SIGMA = 256.0


def check_fusion(fusion_lambda, sigma=0.0):
    lam, sigma = float(fusion_lambda), float(sigma)
    if not 0.0 <= lam <= 1.0:
        raise ConfigError(f"--fusion-lambda must be in [0, 1], got {fusion_lambda}")
    if not 0.0 <= sigma <= MAX_SIGMA:
        raise ConfigError(f"--fusion-sigma must be in [0, {MAX_SIGMA:g}] pixels, got {sigma}")
    return lam, sigma


def unit_max(heatmap):
    """A non-negative map divided by its maximum (an all-zero map stays zero)."""
    heat = np.maximum(np.nan_to_num(np.asarray(heatmap, np.float32)), 0.0)
    peak = float(heat.max()) if heat.size else 0.0
    return heat / peak if peak > 0 else heat


def fuse(gradcam, mask, fusion_lambda=0.5, sigma=0.0):
    """Both maps [H, W] in one frame (bring them there with overlay.to_original_frame / upsample, bilinear) ->
    lambda * M + (1 - lambda) * G after normalising each to [0, 1]; sigma > 0 smooths the mask with a Gaussian of
    that many pixels first (soft lung borders)."""
    gradcam, mask = np.asarray(gradcam, np.float32), np.asarray(mask, np.float32)
    if gradcam.shape != mask.shape:
        raise ConfigError(f"fusion needs both maps in one frame: Grad-CAM {gradcam.shape} vs mask {mask.shape}")
    lam, sigma = check_fusion(fusion_lambda, sigma)
    if sigma > 0:
        from scipy.ndimage import gaussian_filter

        mask = gaussian_filter(mask, sigma, mode="nearest")
    return lam * unit_max(mask) + (1.0 - lam) * unit_max(gradcam)
