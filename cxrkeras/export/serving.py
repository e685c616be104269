"""The serving graph: encoded image bytes → the model's `Preprocessor` in the graph → probabilities and findings.

`bytes_to_inputs` is also how predict, Grad-CAM and localisation turn files into model inputs, so every consumer
sees the pixels a served request sees, and those are the pixels evaluation sees in the records.
"""

import re

import numpy as np
import tensorflow as tf

from cxrkeras.data.preprocessor import Preprocessor

BYTES_SIGNATURE = "serving_default"
IMAGES_SIGNATURE = "predict_images"
BYTES_INPUT = "image_bytes"
IMAGES_INPUT = "images"
PATIENT_INPUTS = ("age", "sex", "view")  # models with patient features: float32 years, "M"/"F", "PA"/"AP"
DATASET_INPUT = "dataset"  # models with the FPSM dataset embedding: string [batch], the source dataset's name

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
# Decoding bombs: a few-kB PNG can declare 100000 x 100000 pixels. Chest X-rays are at most ~4300 px a side.
MAX_IMAGE_SIDE = 16384
MAX_IMAGE_PIXELS = 32 * 1024 * 1024
_SEND = "Send the raw bytes of a PNG or JPEG file (in a REST request base64-encoded under the key b64)."
# (first bytes, what the data is): named in the message instead of quoting the bytes themselves
_KINDS = ((b"GIF8", "a GIF image"), (b"BM", "a BMP image"), (b"II*\0", "a TIFF image"), (b"MM\0*", "a TIFF image"),
          (b"RIFF", "a RIFF (WebP?) file"), (b"%PDF", "a PDF document"), (b"PK\x03\x04", "a ZIP archive"),
          (b"\x1f\x8b", "gzip data"), (b"iVBOR", "base64 text of a PNG (decode it before sending)"),
          (b"/9j/", "base64 text of a JPEG (decode it before sending)"))


def _first_true(flags):
    """Index of the first True of a [B] bool vector (B when there is none; safe for B = 0)."""
    return tf.argmax(tf.cast(tf.concat([flags, [True]], 0), tf.int32), output_type=tf.int32)


def _pick(strings, i):
    return tf.gather(tf.concat([strings, [""]], 0), i)


def _padded(contents, n):
    """The strings with n zero bytes appended: tf.strings.substr fails on a position past a string's end."""
    return tf.strings.join([contents, b"\0" * n])


def _describe(contents):
    """[B] printable descriptions of data that is not PNG/JPEG, from its first bytes (never the bytes)."""
    head = tf.strings.substr(contents, 0, 16)
    text = tf.where(tf.strings.regex_full_match(head, "[\\x20-\\x7e\\t\\r\\n]+"), "text", "unrecognised binary data")
    what = tf.where(tf.equal(tf.strings.substr(_padded(contents, 132), 128, 4), b"DICM"),
                    "a DICOM file (convert it to PNG first; `cxrkeras predict` reads DICOM)", text)
    for magic, kind in reversed(_KINDS):
        what = tf.where(tf.equal(tf.strings.substr(contents, 0, len(magic)), magic), kind, what)
    return what


def check_image_bytes(image_bytes):
    """[B] encoded images, asserted to be non-empty PNG or JPEG data: InvalidArgument naming the first bad item
    ("image_bytes[i]: ...") with its size and a description, never its bytes. Data that passes this check but
    cannot be decoded (truncated, corrupt) is named by `bytes_to_inputs`."""
    size = tf.strings.length(image_bytes)
    known = tf.logical_or(tf.equal(tf.strings.substr(image_bytes, 0, 8), _PNG_MAGIC),
                          tf.equal(tf.strings.substr(image_bytes, 0, 3), _JPEG_MAGIC))
    problem = tf.where(tf.equal(size, 0), "empty string (0 bytes), not an image",
                       tf.where(known, "", tf.strings.join(["not a PNG or JPEG image (", tf.strings.as_string(size),
                                                            " bytes: ", _describe(image_bytes), ")"])))
    bad = tf.not_equal(problem, "")
    first = _first_true(bad)
    message = tf.strings.join(["image_bytes[", tf.strings.as_string(first), "]: ", _pick(problem, first), ". ", _SEND])
    checks = [tf.debugging.Assert(tf.size(image_bytes) > 0, ["image_bytes holds no image: send at least one"]),
              tf.debugging.Assert(tf.logical_not(tf.reduce_any(bad)), [message])]
    with tf.control_dependencies(checks):
        return tf.identity(image_bytes)


def _declared_size(contents):
    """(height, width) int64 that PNG/JPEG data declares in its header, without decoding the pixels."""
    def png():
        header = tf.strings.substr(_padded(contents, 24), 16, 8)  # IHDR: width, height (big-endian)
        b = tf.cast(tf.io.decode_raw(header, tf.uint8), tf.int64)
        weights = tf.constant([1 << 24, 1 << 16, 1 << 8, 1], tf.int64)
        return tf.stack([tf.reduce_sum(b[4:] * weights), tf.reduce_sum(b[:4] * weights)])

    return tf.cond(tf.equal(tf.strings.substr(contents, 0, 3), _JPEG_MAGIC),
                   lambda: tf.cast(tf.io.extract_jpeg_shape(contents)[:2], tf.int64), png)


def as_preprocessor(preprocessor, preprocessing=None, equalize=None):
    """A Preprocessor, or one made from the former (image_size, preprocessing, equalize) arguments."""
    if isinstance(preprocessor, Preprocessor):
        return preprocessor
    return Preprocessor(image_size=int(preprocessor), preprocessing=preprocessing or "torch", equalize=equalize)


def bytes_to_inputs(image_bytes, preprocessor, preprocessing=None, equalize=None):
    """[B] encoded images → [B, S, S, 3] float32 model inputs through `preprocessor` (a Preprocessor; an image size
    with `preprocessing` and `equalize`, as this function took before, makes one that records no stored size).

    Every bad item fails the whole request with one InvalidArgumentError "image_bytes[i]: ..." naming the first bad
    item: not PNG/JPEG, empty, over MAX_IMAGE_SIDE / MAX_IMAGE_PIXELS, or undecodable (truncated/corrupt). The
    images are decoded in a tf.data pipeline whose `ignore_errors` drops an item the decoder refuses, so the
    missing index names it (a decoder error alone would not say which item it was).
    """
    preprocessor = as_preprocessor(preprocessor, preprocessing, equalize)
    image_size = preprocessor.image_size
    image_bytes = check_image_bytes(tf.convert_to_tensor(image_bytes, tf.string))
    n = tf.shape(image_bytes)[0]
    blank = tf.zeros([image_size, image_size, 3], tf.float32)

    def one(contents, index):
        hw = _declared_size(contents)
        too_big = tf.logical_or(tf.reduce_any(hw > MAX_IMAGE_SIDE), hw[0] * hw[1] > MAX_IMAGE_PIXELS)
        image = tf.cond(too_big, lambda: blank, lambda: preprocessor.from_bytes(contents))
        return tf.ensure_shape(image, blank.shape), index, too_big, hw

    items = tf.data.Dataset.from_tensor_slices((image_bytes, tf.range(n)))
    items = items.map(one, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).ignore_errors()
    end = tf.data.Dataset.from_tensors((blank, tf.constant(-1), tf.constant(False), tf.zeros([2], tf.int64)))
    images, got, too_big, hw = items.concatenate(end).batch(tf.cast(n, tf.int64) + 1).get_single_element()
    images, got, too_big, hw = images[:-1], got[:-1], too_big[:-1], hw[:-1]

    # the first item missing from `got` (all present: n)
    padded = tf.concat([got, tf.fill([n - tf.shape(got)[0] + 1], n)], 0)[: n + 1]
    lost = _first_true(tf.not_equal(padded[:n], tf.range(n)))
    kind = tf.where(tf.equal(tf.strings.substr(_padded(_pick(image_bytes, lost), 4), 1, 3), b"PNG"), "PNG", "JPEG")
    undecodable = tf.strings.join([
        "image_bytes[", tf.strings.as_string(lost), "]: truncated or corrupt ", kind, " data (",
        tf.strings.as_string(tf.strings.length(_pick(image_bytes, lost))), " bytes): the decoder refused it. ", _SEND])
    big = _first_true(too_big)
    big_hw = tf.gather(tf.concat([hw, tf.zeros([1, 2], tf.int64)], 0), big)
    oversized = tf.strings.join([
        "image_bytes[", tf.strings.as_string(_pick(tf.strings.as_string(got), big)), "]: the image declares ",
        tf.strings.as_string(big_hw[1]), "x", tf.strings.as_string(big_hw[0]), " pixels, over the limit of ",
        str(MAX_IMAGE_SIDE), " a side and ", str(MAX_IMAGE_PIXELS), " pixels; send a smaller image"])
    checks = [tf.debugging.Assert(tf.equal(tf.shape(got)[0], n), [undecodable]),
              tf.debugging.Assert(tf.logical_not(tf.reduce_any(too_big)), [oversized])]
    with tf.control_dependencies(checks):
        return tf.identity(images)


def make_endpoints(model, thresholds, preprocessor, preprocessing=None, equalize=None, patient=None, datasets=None):
    """(bytes_fn, images_fn, specs): plain functions of the two signatures and their input signatures. With a
    `patient` encoder (a model with patient features) both also take `age`, `sex` and `view`, one per image,
    encoded in the graph by the model's encoder (a bad value: InvalidArgumentError "sex[i]: ..."). With `datasets`
    (a `cxrkeras.data.datasets.DatasetInput`: a model with the dataset embedding) both take `dataset`, the source
    dataset's name per image (an unknown name: InvalidArgumentError "dataset[i]: ...")."""
    preprocessor = as_preprocessor(preprocessor, preprocessing, equalize)
    thresholds = tf.constant(thresholds, tf.float32, name="thresholds")
    image_size = preprocessor.image_size

    def outputs(images, fields=None, encoded=None):
        if fields is not None:
            encoded = patient.encode_checked(*fields, count=tf.shape(images)[0])
        x = images if encoded is None else (images, encoded)
        probs = tf.cast(model(x, training=False), tf.float32)
        return {"probabilities": probs, "findings": tf.greater_equal(probs, thresholds)}

    specs = {BYTES_SIGNATURE: [tf.TensorSpec([None], tf.string, name=BYTES_INPUT)],
             IMAGES_SIGNATURE: [tf.TensorSpec([None, image_size, image_size, 3], tf.float32, name=IMAGES_INPUT)]}
    if patient is None and datasets is None:
        def serve_bytes(image_bytes):
            return outputs(bytes_to_inputs(image_bytes, preprocessor))

        def serve_images(images):
            return outputs(images)

        return serve_bytes, serve_images, specs
    if datasets is not None:
        def with_dataset(images, names):
            return outputs(images, encoded=datasets.encode_checked(names, count=tf.shape(images)[0]))

        def serve_bytes_dataset(image_bytes, dataset):
            return with_dataset(bytes_to_inputs(image_bytes, preprocessor), dataset)

        def serve_images_dataset(images, dataset):
            return with_dataset(images, dataset)

        spec = tf.TensorSpec([None], tf.string, name=DATASET_INPUT)
        return serve_bytes_dataset, serve_images_dataset, {name: s + [spec] for name, s in specs.items()}

    def serve_bytes_patient(image_bytes, age, sex, view):
        return outputs(bytes_to_inputs(image_bytes, preprocessor), (age, sex, view))

    def serve_images_patient(images, age, sex, view):
        return outputs(images, (age, sex, view))

    fields = [tf.TensorSpec([None], tf.float32, name="age"), tf.TensorSpec([None], tf.string, name="sex"),
              tf.TensorSpec([None], tf.string, name="view")]
    specs = {name: spec + fields for name, spec in specs.items()}
    return serve_bytes_patient, serve_images_patient, specs


def build_archive(model, thresholds, preprocessor, asset_paths=None, patient=None, datasets=None):
    """A keras.export.ExportArchive with both signatures (serving_default first) and `asset_paths` as assets;
    `patient`: the model's PatientEncoder (the signatures then take age, sex and view too)."""
    import keras

    serve_bytes, serve_images, specs = make_endpoints(model, thresholds, preprocessor, patient=patient,
                                                      datasets=datasets)
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(BYTES_SIGNATURE, serve_bytes, input_signature=specs[BYTES_SIGNATURE])
    archive.add_endpoint(IMAGES_SIGNATURE, serve_images, input_signature=specs[IMAGES_SIGNATURE])
    # tf.saved_model.Asset copies each file into <version>/assets/ and records it in the SavedModel.
    trackable = archive._tf_trackable  # noqa: SLF001 - ExportArchive offers no public hook for file assets
    for name, path in (asset_paths or {}).items():
        setattr(trackable, f"asset_{name}", tf.saved_model.Asset(path))
    return archive


def inputs_of(blobs, preprocessor, batch_size=16):
    """(model inputs float32 [n, S, S, 3] of the good items, their indices, {index: reason} of the bad ones) for
    encoded images `blobs`, through `bytes_to_inputs`: a bad item is named and costs the others nothing."""
    preprocessor = as_preprocessor(preprocessor)
    good, index, errors = [], [], {}

    def convert(items):
        return bytes_to_inputs(tf.constant([blobs[i] for i in items]), preprocessor).numpy()

    for start in range(0, len(blobs), max(1, int(batch_size))):
        chunk = list(range(start, min(start + max(1, int(batch_size)), len(blobs))))
        while chunk:
            try:
                x = convert(chunk)
            except tf.errors.InvalidArgumentError as exc:
                at, reason = item_error(exc.message)
                if at is not None and 0 <= at < len(chunk):
                    errors[chunk[at]] = reason
                    chunk = chunk[:at] + chunk[at + 1:]
                    continue
                for i in chunk:  # no index in the message: one item at a time finds the culprit
                    try:
                        good.append(convert([i])[0])
                        index.append(i)
                    except tf.errors.InvalidArgumentError as one:
                        errors[i] = item_error(one.message)[1]
                break
            good += list(x)
            index += chunk
            break
    size = preprocessor.image_size
    return (np.stack(good) if good else np.zeros((0, size, size, 3), np.float32)), index, errors


def item_error(message):
    """(index of the bad item or None, reason) of a serving InvalidArgument message; the reason without the
    "image_bytes[i]: " prefix and the advice to serving clients (a patient field keeps its name: "sex: ...")."""
    text = error_summary(message)
    match = re.match(r"(image_bytes|age|sex|view|dataset)\[(\d+)\]: (.*)", text, re.S)
    if not match:
        return None, text
    reason = match.group(3).split(" " + _SEND)[0].rstrip(".")
    return int(match.group(2)), reason if match.group(1) == BYTES_INPUT else f"{match.group(1)}: {reason}"


def error_summary(message):
    """The useful line of a serving InvalidArgument message (our assertion text, or the decoder's complaint)."""
    lines = [ln.strip() for ln in str(message).splitlines() if ln.strip()]
    for line in lines:
        if "assertion failed: [" in line:
            return line.split("assertion failed: [", 1)[1].rsplit("]", 1)[0]
    for line in lines:
        for key in ("Invalid PNG", "Invalid JPEG", "jpeg::", "Unknown image file format", "Input is empty"):
            if key in line:
                text = line.split("}}", 1)[-1].strip()
                return text.split(" [Op:", 1)[0].split("\t")[0].strip()
    return lines[-1] if lines else str(message)
