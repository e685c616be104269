"""tf-explain's face of the heatmap engine: `GradCAM().explain((images, None), model, class_index)` -> a grid of
overlays. The engine itself (`HeatmapEngine`, `get_engine`, `compute_heatmaps`) lives in cxrkeras.explain.engine
and is importable from here as before."""

import os

import numpy as np

from cxrkeras.errors import ConfigError
from cxrkeras.explain.engine import METHODS, HeatmapEngine, compute_heatmaps, get_engine  # noqa: F401


class GradCAM:
    """tf-explain-shaped Grad-CAM: explain((images, None), model, class_index) → a uint8 RGB grid of overlays.

    Differences from tf-explain: the layer defaults to the model's recorded feature layer (the last LKA output);
    use_guided_grads defaults to False (the original Grad-CAM); method="gradcam++" gives Grad-CAM++.
    """

    @staticmethod
    def engine(model, layer_name=None, method="gradcam", use_guided_grads=False):
        """The model's cached HeatmapEngine (`get_engine`)."""
        return get_engine(model, layer_name, method, use_guided_grads)

    def heatmaps(self, images, model, class_index, layer_name=None, use_guided_grads=False, method="gradcam",
                 batch_size=16):
        """Raw maps: [N, h, w] for one class, [N, K, h, w] for a list; see compute_heatmaps."""
        return compute_heatmaps(model, images, class_index, layer_name, method, use_guided_grads, batch_size)

    def explain(self, validation_data, model, class_index, layer_name=None, use_guided_grads=False,
                method="gradcam", colormap="jet", image_weight=0.7, batch_size=16):
        """Overlay grid (uint8 [H, W, 3]) of the heatmaps of one class on `validation_data[0]` (model inputs)."""
        from cxrkeras.explain.overlay import blend, grid_display, to_display

        images = np.asarray(validation_data[0] if isinstance(validation_data, (tuple, list)) else validation_data)
        if isinstance(class_index, (list, tuple)) or np.ndim(class_index) != 0:
            raise ConfigError("explain() draws one class per grid; pass a single class index or name "
                              "(use heatmaps() or compute_heatmaps() for several classes)")
        maps = self.heatmaps(images, model, class_index, layer_name, use_guided_grads, method, batch_size)
        tiles = [blend(to_display(img), cam, colormap=colormap, image_weight=image_weight)
                 for img, cam in zip(images, maps)]
        return grid_display(np.stack(tiles))

    @staticmethod
    def save(grid, output_dir, output_name):
        """Write the grid as a PNG at output_dir/output_name (".png" added when missing); returns the path."""
        from PIL import Image

        os.makedirs(output_dir, exist_ok=True)
        name = output_name if os.path.splitext(output_name)[1] else output_name + ".png"
        path = os.path.join(output_dir, name)
        Image.fromarray(np.asarray(grid, dtype=np.uint8)).save(path)
        return path
