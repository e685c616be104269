"""The one heatmap engine: Grad-CAM and Grad-CAM++ for several classes with one forward and one backward pass per
batch. `GradCAM` (tf-explain's API), `compute_heatmaps`, the callback, `gradcam` and `localize` all call it."""

import contextlib
import logging
import warnings
import weakref

import numpy as np

from cxrkeras.constants import HEATMAP_METHODS as METHODS
from cxrkeras.errors import ConfigError
from cxrkeras.explain.target import resolve_classes, resolve_layer


def _output_layer(model):
    tensor = model.outputs[0]
    history = getattr(tensor, "_keras_history", None)
    return history[0] if history is not None else model.layers[-1]


def _activation_name(layer):
    fn = getattr(layer, "activation", None)
    return getattr(fn, "__name__", None)


class HeatmapEngine:
    """Grad-CAM of one model at one layer; call it on batches. Reuse it: the graph is traced once per batch shape.

    The class score is the pre-activation logit when the model ends in a sigmoid/softmax (Dense(activation=...) or an
    Activation layer): gradients of a saturated probability vanish, those of its logit do not, and for unsaturated
    outputs the normalised map is the same (the sigmoid's derivative is one positive factor per image and class).
    """

    def __init__(self, model, layer_name=None, method="gradcam", use_guided_grads=False):
        import keras
        import tensorflow as tf

        if method not in METHODS:
            raise ConfigError(f"method must be one of {METHODS}, got {method!r}")
        if len(model.outputs) != 1 or len(model.outputs[0].shape) != 2:
            raise ConfigError(f"Grad-CAM needs a model with one (batch, classes) output; {model.name!r} has "
                              f"outputs {[tuple(t.shape) for t in model.outputs]}")
        self._model_ref = weakref.ref(model)  # weak: engines are cached per model (get_engine)
        self.layer_name = resolve_layer(model, layer_name)
        self.method = method
        self.use_guided_grads = bool(use_guided_grads)
        self.num_outputs = int(model.outputs[0].shape[-1])
        feature = model.get_layer(self.layer_name).output
        head = _output_layer(model)
        act = _activation_name(head)
        self._head = None
        if isinstance(head, keras.layers.Dense) and act in ("sigmoid", "softmax"):
            self._head, self._final = head, act
            score = head.input
        elif isinstance(head, keras.layers.Activation) and act in ("sigmoid", "softmax"):
            self._final = act
            score = head.input
        else:
            self._final = None
            score = model.outputs[0]
        self.num_inputs = len(model.inputs)  # 2 for a model with patient features: (images, features)
        inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
        self._grad_model = keras.Model(inputs, [feature, score], name=f"gradcam_{self.layer_name}")

        def step(images, classes):  # a fresh function per engine: engines do not share tf.function traces
            return self._batch(images, classes)

        self._step = tf.function(step, reduce_retracing=True)

    @property
    def model(self):
        return self._model_ref()

    def _logits(self, x):
        import tensorflow as tf

        if self._head is None:
            return tf.cast(x, tf.float32)
        kernel = tf.cast(self._head.kernel, tf.float32)
        z = tf.matmul(tf.cast(x, tf.float32), kernel)
        if self._head.use_bias:
            z = z + tf.cast(self._head.bias, tf.float32)
        return z

    def _batch(self, images, classes):
        import tensorflow as tf

        # persistent for several classes: batch_jacobian may need a second, loop-based pass (below)
        with tf.GradientTape(persistent=classes.shape[0] != 1) as tape:
            feats, pre = self._grad_model(images, training=False)
            logits = self._logits(pre)
            selected = tf.gather(logits, classes, axis=1)  # [N, K]
            one_class = selected.shape[1] == 1
            total = tf.reduce_sum(selected) if one_class else None
        if one_class:  # images are independent in inference mode: the batch sum's gradient is per-image
            grads = tf.cast(tape.gradient(total, feats, unconnected_gradients="zero"), tf.float32)[:, None]
        else:  # batch_jacobian vectorises the K cotangents: one backward pass for all classes of the batch
            try:
                with _quiet_tf_logger():  # its failure is handled below; do not print TF's conversion errors
                    jac = tape.batch_jacobian(selected, feats, unconnected_gradients="zero")
            except ValueError:  # TF's vectoriser lacks a rule for some gradients (seen: BiasAddGrad in att-B's gates)
                jac = tape.batch_jacobian(selected, feats, unconnected_gradients="zero", experimental_use_pfor=False)
            grads = tf.cast(jac, tf.float32)  # [N, K, h, w, c]
        feats = tf.cast(feats, tf.float32)
        if self.use_guided_grads:
            grads = grads * tf.cast(feats[:, None] > 0, tf.float32) * tf.cast(grads > 0, tf.float32)
        if self.method == "gradcam":
            weights = tf.reduce_mean(grads, axis=(2, 3))  # [N, K, c]
        else:  # Grad-CAM++ (Chattopadhay et al. 2018), closed form for an exponential of the score
            g2, g3 = tf.square(grads), tf.pow(grads, 3)
            sum_a = tf.reduce_sum(feats, axis=(1, 2))[:, None, None, None, :]
            denom = 2.0 * g2 + sum_a * g3
            alpha = tf.math.divide_no_nan(g2, tf.where(denom != 0.0, denom, tf.ones_like(denom)))
            weights = tf.reduce_sum(alpha * tf.nn.relu(grads), axis=(2, 3))
        cams = tf.nn.relu(tf.einsum("nhwc,nkc->nkhw", feats, weights))
        grad_max = tf.reduce_max(tf.abs(grads), axis=(2, 3, 4))  # [N, K]
        if self._final == "softmax":
            probs = tf.nn.softmax(logits)
        elif self._final == "sigmoid":
            probs = tf.sigmoid(logits)
        else:
            probs = logits
        return cams, grad_max, probs

    def __call__(self, images, class_indices, batch_size=16):
        """(heatmaps [N, K, h, w] in [0, 1], probabilities [N, outputs]) for output indices `class_indices`.
        `images`: the model's input: a batch of images, or a tuple (images, patient features) for a model with
        patient features."""
        import tensorflow as tf

        parts = [np.asarray(p, dtype=np.float32) for p in (images if isinstance(images, tuple) else [images])]
        if len(parts) != self.num_inputs:
            raise ConfigError(f"model {self.model.name!r} takes {self.num_inputs} inputs "
                              f"({', '.join(t.name for t in self.model.inputs)}), got {len(parts)}")
        if parts[0].ndim != 4:
            raise ConfigError(f"images must be a batch (N, height, width, channels), got shape {parts[0].shape}")
        if any(len(p) != len(parts[0]) for p in parts):
            raise ConfigError(f"the inputs hold different numbers of images: {[len(p) for p in parts]}")
        classes = tf.constant(list(class_indices), dtype=tf.int32)
        cams, gmax, probs = [], [], []
        for start in range(0, len(parts[0]), max(1, int(batch_size))):
            batch = tuple(tf.constant(p[start:start + batch_size]) for p in parts)
            c, g, p = self._step(batch if len(batch) > 1 else batch[0], classes)
            cams.append(c.numpy()), gmax.append(g.numpy()), probs.append(p.numpy())
        cams, gmax, probs = np.concatenate(cams), np.concatenate(gmax), np.concatenate(probs)
        return _normalise(cams, gmax, self.layer_name), probs

    def explain(self, images, class_index, batch_size=16):
        """(heatmaps, probabilities) for `class_index`: an output index or label name -> maps [N, h, w]; a list of
        them -> [N, K, h, w] (one backward pass per batch for all K)."""
        classes, single = resolve_classes(self.model, class_index, self.num_outputs)
        maps, probs = self(images, classes, batch_size=batch_size)
        return (maps[:, 0] if single else maps), probs


@contextlib.contextmanager
def _quiet_tf_logger():
    """TensorFlow's Python logger at CRITICAL for the block (pfor logs a failed conversion as ERROR, then raises)."""
    logger = logging.getLogger("tensorflow")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _normalise(cams, grad_max, layer_name):
    """Scale each map to max 1; maps with no gradient or no positive evidence stay zero, with a warning."""
    cams = np.nan_to_num(cams, nan=0.0, posinf=0.0, neginf=0.0)
    peak = cams.max(axis=(2, 3), keepdims=True)
    ok = peak > 0
    out = np.where(ok, cams / np.where(ok, peak, 1.0), 0.0).astype(np.float32)
    no_grad = int((grad_max <= 0).sum())
    flat = int((~ok[..., 0, 0]).sum()) - no_grad
    if no_grad:
        warnings.warn(f"Grad-CAM: the gradient of the class score with respect to layer {layer_name!r} is all zero "
                      f"for {no_grad} image/class pair(s); returning zero heatmaps for them", stacklevel=3)
    if flat > 0:
        warnings.warn(f"Grad-CAM: {flat} heatmap(s) have no positive evidence at layer {layer_name!r} "
                      "(all values <= 0 after weighting); returning zero heatmaps for them", stacklevel=3)
    return np.clip(out, 0.0, 1.0)


_ENGINES = weakref.WeakKeyDictionary()


def get_engine(model, layer_name=None, method="gradcam", use_guided_grads=False):
    """The cached HeatmapEngine of this model and settings: repeated calls reuse its traced graph."""
    layer = resolve_layer(model, layer_name)
    key = (layer, method, bool(use_guided_grads))
    try:
        per_model = _ENGINES.setdefault(model, {})
    except TypeError:  # a model that cannot be weakly referenced: no cache
        return HeatmapEngine(model, layer, method, use_guided_grads)
    if key not in per_model:
        per_model[key] = HeatmapEngine(model, layer, method, use_guided_grads)
    return per_model[key]


def compute_heatmaps(model, images, class_index, layer_name=None, method="gradcam", use_guided_grads=False,
                     batch_size=16, return_probabilities=False):
    """Raw Grad-CAM maps in [0, 1] at the layer's resolution.

    class_index: an output index or label name → [N, h, w]; a list of them → [N, K, h, w] (one backward pass per
    batch for all K). With return_probabilities, also the model's outputs [N, classes].
    """
    maps, probs = get_engine(model, layer_name, method, use_guided_grads).explain(images, class_index, batch_size)
    return (maps, probs) if return_probabilities else maps
