"""Features of every record of a split, batched through tf.data: HOG + LBP of the equalised image (the project's
Preprocessor at the texture size) and the trained model's embedding (its global pool) with its own outputs."""

import dataclasses

import numpy as np

from cxrkeras.errors import CxrError, DataError

EMBEDDING_INPUT_OF = "head_dropout"  # the head's dropout takes the pooled features (GAP, or the sequence pool)


def embedding_model(model):
    """keras.Model: the model's inputs -> [embedding (its pooled features), its outputs], one forward pass."""
    import keras

    try:
        pooled = model.get_layer(EMBEDDING_INPUT_OF).input
    except ValueError:
        raise CxrError(f"model {model.name!r} has no {EMBEDDING_INPUT_OF!r} layer: the hybrid features need a model "
                       "built by cxrkeras (its global pool feeds the head)") from None
    return keras.Model(model.inputs, [pooled, model.outputs[0]])


def texture_preprocessor(preprocessor, params, equalize):
    """The model's Preprocessor at the texture size, with `equalize` (None: the model's own)."""
    return dataclasses.replace(preprocessor, image_size=params.size, preprocessing="torch",
                               equalize=equalize or preprocessor.equalize)


def extract_split(source, records_dir, split, params, equalize="hist", batch_size=32, log=print):
    """dict(texture [N, hog+lbp], embedding [N, C], probs [N, L] (the model alone), labels [N, L], image_ids,
    patient_ids) of every image of `split`, in record order."""
    import tensorflow as tf

    from cxrkeras.data.manifest import load_manifest
    from cxrkeras.data.pipeline import build_dataset, data_errors
    from cxrkeras.evaluation.evaluate import check_labels, split_size
    from cxrkeras.hybrid.texture import texture_features
    from cxrkeras.inference import inference_step

    manifest = load_manifest(records_dir)
    no_finding = check_labels(source.labels, manifest["labels"], f"the records {records_dir}")
    expected = split_size(manifest, split, records_dir)
    common = dict(stage=2, batch_size=int(batch_size), training=False, drop_remainder=False, deterministic=True,
                  return_ids=True, no_finding_class=no_finding)
    for_model = build_dataset(records_dir, split, preprocessor=source.preprocessor, patient=source.patient,
                              datasets=source.datasets, **common)
    texture_pre = texture_preprocessor(source.preprocessor, params, equalize)
    for_texture = build_dataset(records_dir, split, preprocessor=texture_pre, **common)
    embed = embedding_model(source.model)  # kept alive: inference_step holds only a weak reference
    step = inference_step(embed)
    texture, embedding, probs, labels, image_ids, patient_ids = [], [], [], [], [], []
    with data_errors():
        for (x, y, ids), (xt, _, ids_t) in tf.data.Dataset.zip((for_model, for_texture)):
            if not np.array_equal(ids["image_id"].numpy(), ids_t["image_id"].numpy()):
                raise DataError(f"{records_dir}: the two passes over split {split!r} read records in different "
                                "orders")
            emb, p = step(x)
            embedding.append(np.asarray(emb, np.float32))
            probs.append(np.asarray(p, np.float64))
            labels.append(np.asarray(y))
            grey = np.clip(np.round(np.asarray(texture_pre.denormalize(xt))[..., 0]), 0, 255)
            texture.append(np.stack([texture_features(g, params) for g in grey]))
            image_ids += [v.decode() for v in ids["image_id"].numpy()]
            patient_ids += [v.decode() for v in ids["patient_id"].numpy()]
    if len(image_ids) != expected:
        raise DataError(f"{records_dir}: split {split!r} yielded {len(image_ids)} images but manifest.json lists "
                        f"{expected}; re-build the records")
    if not image_ids:
        raise DataError(f"{records_dir}: split {split!r} has no images")
    log(f"{split}: {len(image_ids)} images, {texture[0].shape[1]} texture + {embedding[0].shape[1]} CNN features")
    return dict(texture=np.concatenate(texture), embedding=np.concatenate(embedding), probs=np.concatenate(probs),
                labels=np.concatenate(labels), image_ids=image_ids, patient_ids=patient_ids)
