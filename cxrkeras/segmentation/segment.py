"""A trained U-Net on image files: mask probabilities in each file's own frame (`MaskModel`, also the Grad-CAM
fusion's source) and `segment_files`, which writes mask PNGs and overlays."""

import os

import numpy as np

from cxrkeras.errors import ConfigError, DataError


class MaskModel:
    """A U-Net .keras file (from `cxrkeras train-segmentation`: its output folder or the file) and its stored
    Preprocessor; `probabilities(paths)` reads each file through that Preprocessor, as training read the images."""

    def __init__(self, path, batch_size=8):
        from cxrkeras.data.preprocessor import Preprocessor
        from cxrkeras.models.unet import unet_info
        from cxrkeras.runs import load_keras_model
        from cxrkeras.segmentation.train import MODEL_FILE

        if os.path.isdir(path):
            path = os.path.join(path, MODEL_FILE)
        self.path = path
        self.model = load_keras_model(path)
        info = unet_info(self.model)
        self.preprocessor = Preprocessor.from_config(info["preprocessor"], where=f"{path}: preprocessor")
        self.batch_size = int(batch_size)

    def probabilities(self, paths):
        """(originals uint8 [H, W], mask probabilities float32 [H, W] in each original's frame (bilinear), indices
        of the usable paths, {index: reason} for the others)."""
        from cxrkeras.explain.files import read_inputs
        from cxrkeras.explain.overlay import to_original_frame
        from cxrkeras.inference import inference_step

        originals, x, good, errors = read_inputs(list(paths), self.preprocessor, self.batch_size)
        step = inference_step(self.model)
        probs = [np.asarray(step(x[i:i + self.batch_size]))[..., 0] for i in range(0, len(x), self.batch_size)]
        probs = np.concatenate(probs) if probs else np.zeros((0, 1, 1), np.float32)
        frames = [np.clip(to_original_frame(p, *o.shape[:2], self.preprocessor.region(*o.shape[:2])), 0.0, 1.0)
                  for p, o in zip(probs, originals)]
        return originals, frames, good, errors


def overlay(original, mask, colour=(0, 200, 255), alpha=0.4):
    """uint8 RGB: the grey image with the mask tinted over it."""
    from cxrkeras.explain.overlay import to_display

    rgb = to_display(original).astype(np.float32)
    tint = np.asarray(colour, np.float32)
    rgb[mask] = (1 - alpha) * rgb[mask] + alpha * tint
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)


def segment_files(model, images, out_dir, threshold=0.5, batch_size=8, log=print):
    """Write NAME_mask.png (0/255, the image's size) and NAME_overlay.png per image, and segment.json; files that
    cannot be read are named (the others are still written). Returns the entries."""
    from PIL import Image

    from cxrkeras.explain.files import _safe
    from cxrkeras.fileio import write_json

    if not images:
        raise ConfigError("no image given: pass one or more PNG/JPEG/DICOM files")
    if not 0.0 < float(threshold) < 1.0:
        raise ConfigError(f"threshold must be in (0, 1), got {threshold}")
    net = MaskModel(model, batch_size)
    os.makedirs(out_dir, exist_ok=True)
    entries, failed, stems = [], {}, set()
    for start in range(0, len(images), net.batch_size):
        paths = list(images[start:start + net.batch_size])
        originals, frames, good, errors = net.probabilities(paths)
        failed.update({paths[i]: reason for i, reason in errors.items()})
        for i, original, prob in zip(good, originals, frames):
            stem = _safe(os.path.splitext(os.path.basename(paths[i]))[0])
            if stem in stems:
                stem = f"{stem}-{start + i + 1}"
            stems.add(stem)
            mask = prob >= threshold
            mask_path = os.path.join(out_dir, f"{stem}_mask.png")
            overlay_path = os.path.join(out_dir, f"{stem}_overlay.png")
            Image.fromarray((mask * 255).astype(np.uint8)).save(mask_path)
            Image.fromarray(overlay(original, mask)).save(overlay_path)
            entries.append(dict(image=paths[i], mask=mask_path, overlay=overlay_path, height=int(mask.shape[0]),
                                width=int(mask.shape[1]), mask_fraction=round(float(mask.mean()), 6)))
            log(f"{paths[i]}: mask {mask_path} ({100 * mask.mean():.1f}% of the image)")
    write_json(os.path.join(out_dir, "segment.json"), dict(model=net.path, threshold=float(threshold),
                                                           preprocessor=net.preprocessor.to_config(),
                                                           masks=entries, failed=failed))
    if failed:
        raise DataError(f"{len(failed)} of {len(images)} image(s) could not be segmented (the others were written): "
                        + "; ".join(f"{p}: {r}" for p, r in list(failed.items())[:10]))
    return entries
