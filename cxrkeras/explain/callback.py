"""Keras callback writing Grad-CAM overlays of fixed validation images to TensorBoard during training."""

import warnings

import keras
import numpy as np

from cxrkeras.errors import ConfigError


def display_images(model, images):
    """Model inputs → uint8 RGB for display: undo the model's ImageNet normalisation when model_info knows it."""
    from cxrkeras.explain.overlay import to_display
    from cxrkeras.models.build import model_info

    info = model_info(model, strict=False)
    if info and info.get("preprocessing"):
        from cxrkeras.data.normalize import denormalize

        return np.stack([to_display(np.asarray(img)) for img in np.asarray(denormalize(images, info["preprocessing"]))])
    return np.stack([to_display(img) for img in images])


def take_images(dataset, num_images):
    """The model inputs of the first `num_images` images of a tf.data dataset of (inputs, labels[, ...]) batches:
    a NumPy array of images, or a tuple (images, patient features) for a model that takes them."""
    chunks, n = [], 0
    for batch in dataset:
        inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
        parts = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
        chunks.append([np.asarray(p) for p in parts])
        n += len(chunks[-1][0])
        if n >= num_images:
            break
    if not chunks:
        raise ConfigError("the validation dataset is empty: no images for Grad-CAM")
    joined = tuple(np.concatenate([c[k] for c in chunks])[:num_images] for k in range(len(chunks[0])))
    return joined if len(joined) > 1 else joined[0]


class GradCAMCallback(keras.callbacks.Callback):
    """Every `every` epochs, write a grid of Grad-CAM overlays to TensorBoard (tf.summary.image) in `output_dir`.

    validation_data: (images, labels or None) as model inputs (tf-explain's convention), or a tf.data dataset of
    batches (the first `max_images` are taken once). class_index: an output index, a label name, a list of them
    (one grid per class), or None: each image's highest-scoring class (one grid per such class).
    """

    def __init__(self, validation_data, class_index, output_dir, layer_name=None, method="gradcam",
                 use_guided_grads=False, every=1, max_images=8, image_weight=0.6, colormap="jet"):
        super().__init__()
        if isinstance(validation_data, (tuple, list)):
            inputs = validation_data[0]
        elif hasattr(validation_data, "element_spec"):
            inputs = take_images(validation_data, max_images)
        else:
            inputs = validation_data
        # a model with patient features takes (images, features); the images alone are shown
        parts = tuple(np.asarray(p, dtype=np.float32)[:max_images] for p in
                      (inputs if isinstance(inputs, tuple) else (inputs,)))
        images = parts[0]
        if images.ndim != 4 or len(images) == 0:
            raise ConfigError(f"GradCAMCallback needs a batch of images (N, height, width, channels), got shape "
                              f"{images.shape}")
        if int(every) < 1:
            raise ConfigError(f"GradCAMCallback every must be >= 1 epoch, got {every}")
        self.images = images
        self.inputs = parts if len(parts) > 1 else images
        self.class_index = class_index
        self.output_dir = output_dir
        self.layer_name = layer_name
        self.method = method
        self.use_guided_grads = use_guided_grads
        self.every = int(every)
        self.image_weight = image_weight
        self.colormap = colormap
        self._engine = None
        self._writer = None

    def on_train_begin(self, logs=None):
        import tensorflow as tf

        from cxrkeras.explain.engine import get_engine

        # checked now, not at the first epoch's end, so a bad layer/class fails before any training time is spent
        self._engine = get_engine(self.model, self.layer_name, self.method, self.use_guided_grads)
        self._classes()
        self._writer = tf.summary.create_file_writer(self.output_dir)

    def _classes(self):
        from cxrkeras.explain.target import resolve_classes

        if self.class_index is None:
            return None
        classes, _ = resolve_classes(self.model, self.class_index, self._engine.num_outputs)
        return classes

    def _label(self, index):
        from cxrkeras.explain.target import model_labels

        labels = model_labels(self.model)
        return labels[index] if labels else f"class_{index}"

    def grids(self):
        """{tag: uint8 grid [H, W, 3]} of the current model: one per explained class, or per top-1 label."""
        from cxrkeras.explain.overlay import blend, grid_display

        shown = display_images(self.model, self.images)
        classes = self._classes()
        if classes is None:
            probs = np.asarray(self.model(self.inputs, training=False))
            top = probs.argmax(axis=1)
            uniq = sorted(set(int(t) for t in top))
            maps, _ = self._engine(self.inputs, uniq)
            out = {}
            for k, index in enumerate(uniq):  # one grid per predicted label, so each tile's class is known
                tiles = [blend(shown[i], maps[i, k], self.colormap, self.image_weight)
                         for i in np.flatnonzero(top == index)]
                out[f"gradcam/top1/{self._label(index)}"] = grid_display(np.stack(tiles))
            return out
        maps, _ = self._engine(self.inputs, classes)
        out = {}
        for k, index in enumerate(classes):
            tiles = [blend(img, m, self.colormap, self.image_weight) for img, m in zip(shown, maps[:, k])]
            out[f"gradcam/{self._label(index)}"] = grid_display(np.stack(tiles))
        return out

    def on_epoch_end(self, epoch, logs=None):
        import tensorflow as tf

        if (epoch + 1) % self.every:
            return
        with warnings.catch_warnings():  # zero maps are common in early epochs; the image shows them anyway
            warnings.simplefilter("ignore", UserWarning)
            grids = self.grids()
        with self._writer.as_default():
            for tag, grid in grids.items():
                tf.summary.image(tag, grid[None], step=epoch)
        self._writer.flush()

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
