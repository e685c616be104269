"""Check an exported SavedModel in a FRESH process against the Keras model; print its signatures.

`python -m cxrkeras.export.verify VERSION_DIR CASE_DIR` loads VERSION_DIR with tf.saved_model.load only (no
cxrkeras model code), runs both signatures on CASE_DIR/case.npz and prints one JSON line of differences.
"""

import io
import json
import os
import subprocess
import sys

import numpy as np

TOLERANCE = 1e-5
_RESULT_MARK = "CXR_VERIFY_RESULT "
_DTYPES = {1: "DT_FLOAT", 7: "DT_STRING", 10: "DT_BOOL", 3: "DT_INT32", 9: "DT_INT64"}


def signature_summary(version_dir):
    """`saved_model_cli show --all`-style text of the signatures, read from saved_model.pb."""
    from tensorflow.core.protobuf import saved_model_pb2

    sm = saved_model_pb2.SavedModel()
    with open(os.path.join(version_dir, "saved_model.pb"), "rb") as f:
        sm.ParseFromString(f.read())
    lines = []
    for meta in sm.meta_graphs:
        tags = ", ".join(meta.meta_info_def.tags)
        lines.append(f"MetaGraphDef with tag-set: '{tags}' contains the following SignatureDefs:")
        for key in sorted(meta.signature_def, key=lambda k: (k != "serving_default", k)):
            if key.startswith("__"):
                continue
            sig = meta.signature_def[key]
            lines.append("")
            lines.append(f"signature_def['{key}']:")
            for kind, tensors in (("input", sig.inputs), ("output", sig.outputs)):
                lines.append(f"  The given SavedModel SignatureDef contains the following {kind}(s):")
                for name in sorted(tensors):
                    info = tensors[name]
                    dims = [d.size for d in info.tensor_shape.dim]
                    shape = "(" + ", ".join(str(d) for d in dims) + ("," if len(dims) == 1 else "") + ")"
                    lines.append(f"    {kind}s['{name}'] tensor_info:")
                    lines.append(f"        dtype: {_DTYPES.get(info.dtype, info.dtype)}")
                    lines.append(f"        shape: {shape}")
                    lines.append(f"        name: {info.name}")
            lines.append(f"  Method name is: {sig.method_name}")
    return "\n".join(lines)


def verification_images(sample_dir=None):
    """[(name, encoded bytes)]: gray PNG, RGBA PNG, 16-bit non-square PNG and an RGB JPEG, from the bundled sample."""
    from PIL import Image

    sample_dir = sample_dir or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                            "sample_data", "nih-512px", "images")
    files = sorted(os.listdir(sample_dir))
    rgba = next(f for f in files if Image.open(os.path.join(sample_dir, f)).mode == "RGBA")
    gray = next(f for f in files if Image.open(os.path.join(sample_dir, f)).mode == "L")
    out = [(f"{gray} (8-bit gray PNG)", open(os.path.join(sample_dir, gray), "rb").read()),
           (f"{rgba} (RGBA PNG)", open(os.path.join(sample_dir, rgba), "rb").read())]
    base = np.asarray(Image.open(os.path.join(sample_dir, gray)).convert("L"), dtype=np.float64)
    arr16 = np.round(base[60:460, 100:400] * 257.0).astype(np.uint16)  # 400x300, 16-bit
    buf = io.BytesIO()
    Image.fromarray(arr16).save(buf, format="PNG")
    out.append(("16-bit gray PNG 400x300", buf.getvalue()))
    buf = io.BytesIO()
    Image.fromarray(base.astype(np.uint8)).convert("RGB").resize((333, 280)).save(buf, format="JPEG", quality=90)
    out.append(("RGB JPEG 333x280", buf.getvalue()))
    return out


# patient values of the check (models with patient features): spellings the encoder must accept, one per image
CASE_AGES = (58.0, 34.5, 71.0, 12.0)
CASE_SEXES = ("M", "F", "f", " M ")
CASE_VIEWS = ("PA", "AP", "pa", "AP")


def write_case(case_dir, model, preprocessor, images=None, patient=None, datasets=None):
    """Keras-side reference: inputs (each file through `preprocessor`, eagerly, one at a time; with a `patient`
    encoder, also age, sex and view through it) and expected outputs of both signatures, saved to
    case_dir/case.npz."""
    import tensorflow as tf

    from cxrkeras.fileio import write_json

    images = images or verification_images()
    os.makedirs(case_dir, exist_ok=True)
    x = np.stack([preprocessor.from_bytes(tf.constant(b)).numpy() for _, b in images])
    fields = {}
    if patient is not None:
        n = len(images)
        fields = dict(age=np.resize(np.array(CASE_AGES, np.float32), n), sex=np.resize(np.array(CASE_SEXES), n),
                      view=np.resize(np.array(CASE_VIEWS), n))
        inputs = (x, patient.encode(fields["age"], fields["sex"], fields["view"]).numpy())
    elif datasets is not None:  # every dataset of the model in turn: the embedding must come through the graph
        fields = dict(dataset=np.resize(np.array(datasets.names), len(images)))
        inputs = (x, np.resize(np.arange(len(datasets.names), dtype=np.int32), len(images))[:, None])
    else:
        inputs = x
    expected = np.asarray(model(inputs, training=False), dtype=np.float32)
    blobs = {f"bytes_{i}": np.frombuffer(b, dtype=np.uint8) for i, (_, b) in enumerate(images)}
    np.savez(os.path.join(case_dir, "case.npz"), images=x.astype(np.float32), expected=expected,
             n=np.array(len(images)), **fields, **blobs)
    write_json(os.path.join(case_dir, "names.json"), [name for name, _ in images])
    return expected


def run_fresh(version_dir, case_dir, timeout=600):
    """Run this module in a new Python process; returns its result dict (raises RuntimeError if it failed)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, "-m", "cxrkeras.export.verify", version_dir, case_dir],
                          capture_output=True, text=True, timeout=timeout, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith(_RESULT_MARK):
            return json.loads(line[len(_RESULT_MARK):])
    raise RuntimeError(f"verification process failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                       f"{proc.stderr[-3000:]}")


def _summary(message):
    try:
        from cxrkeras.export.serving import error_summary
    except ImportError:  # the check must not depend on cxrkeras; only the message tidying does
        return str(message)[-300:]
    return error_summary(message)


def _check(version_dir, case_dir):
    """In the fresh process: load with tf.saved_model.load, run both signatures, a bad batch, then a good one."""
    import tensorflow as tf

    case = np.load(os.path.join(case_dir, "case.npz"))
    n = int(case["n"])
    blobs = [case[f"bytes_{i}"].tobytes() for i in range(n)]
    with open(os.path.join(version_dir, "assets", "thresholds.json"), encoding="utf-8") as f:
        thresholds = json.load(f)  # plain json: this check must not depend on cxrkeras
    thr = np.asarray(thresholds["thresholds"], dtype=np.float32)
    loaded = tf.saved_model.load(version_dir)
    serve = loaded.signatures["serving_default"]
    images_fn = loaded.signatures["predict_images"]
    fields = {k: tf.constant(case[k]) for k in ("age", "sex", "view", "dataset") if k in case.files}

    def first(k, values):  # the patient values of the first `k` images (none for an image-only model)
        return {name: v[:k] for name, v in values.items()}

    by_bytes = serve(image_bytes=tf.constant(blobs), **fields)
    by_images = images_fn(images=tf.constant(case["images"]), **fields)
    expected = case["expected"]
    result = {
        "max_abs_diff_bytes": float(np.max(np.abs(by_bytes["probabilities"].numpy() - expected))),
        "max_abs_diff_images": float(np.max(np.abs(by_images["probabilities"].numpy() - expected))),
        "findings_ok": bool(np.array_equal(by_bytes["findings"].numpy(), by_bytes["probabilities"].numpy() >= thr)),
        "batch": n,
    }
    try:
        serve(image_bytes=tf.constant([blobs[0], b"not an image at all"]), **first(2, fields))
        result["bad_bytes_error"] = None
    except tf.errors.InvalidArgumentError as exc:
        result["bad_bytes_error"] = _summary(exc.message)
    if "dataset" in fields:
        bad = dict(first(2, fields), dataset=tf.constant([case["dataset"][0], "no such dataset"]))
        try:
            serve(image_bytes=tf.constant(blobs[:2]), **bad)
            result["bad_dataset_error"] = None
        except tf.errors.InvalidArgumentError as exc:
            result["bad_dataset_error"] = _summary(exc.message)
    elif fields:
        bad = dict(first(2, fields), sex=tf.constant(["M", "X"]))
        try:
            serve(image_bytes=tf.constant(blobs[:2]), **bad)
            result["bad_patient_error"] = None
        except tf.errors.InvalidArgumentError as exc:
            result["bad_patient_error"] = _summary(exc.message)
    again = serve(image_bytes=tf.constant(blobs), **fields)
    result["after_bad_max_abs_diff"] = float(np.max(np.abs(again["probabilities"].numpy() - expected)))
    result["signatures"] = signature_summary(version_dir)
    print(_RESULT_MARK + json.dumps(result), flush=True)


if __name__ == "__main__":
    _check(sys.argv[1], sys.argv[2])
