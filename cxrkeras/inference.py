"""The one inference loop: a model in inference mode over a dataset of (images, labels[, ids]) batches."""

import weakref

import numpy as np

_STEPS = weakref.WeakKeyDictionary()


def inference_step(model):
    """model(x, training=False) as a tf.function, traced once per model (and input signature) and reused."""
    import tensorflow as tf

    try:
        return _STEPS[model]
    except KeyError:
        pass
    except TypeError:  # not weakly referenceable: no cache
        return tf.function(lambda x: model(x, training=False), reduce_retracing=True)
    ref = weakref.ref(model)  # the cached step must not keep its model alive
    step = tf.function(lambda x: ref()(x, training=False), reduce_retracing=True)
    _STEPS[model] = step
    return step


def predict_dataset(model, dataset, progress=None):
    """(probabilities float64 [N, L], labels [N, L], ids {"image_id", "patient_id": [str]} or None) over every batch
    of `dataset`, in its order. progress(images so far) is called after each batch."""
    step = inference_step(model)
    probs, labels, image_ids, patient_ids = [], [], [], []
    with_ids = False
    for batch in dataset:
        x, y = batch[0], batch[1]
        probs.append(np.asarray(step(x), dtype=np.float64))
        labels.append(np.asarray(y))
        if len(batch) > 2:
            with_ids = True
            image_ids += [v.decode("utf-8") for v in batch[2]["image_id"].numpy()]
            patient_ids += [v.decode("utf-8") for v in batch[2]["patient_id"].numpy()]
        if progress:
            progress(sum(len(p) for p in probs))
    if not probs:
        return np.zeros((0, 0)), np.zeros((0, 0)), ({"image_id": [], "patient_id": []} if with_ids else None)
    ids = {"image_id": image_ids, "patient_id": patient_ids} if with_ids else None
    return np.concatenate(probs), np.concatenate(labels), ids
