"""The serving graph: encoded image bytes → in-graph eval preprocessing → probabilities and thresholded findings."""

import tensorflow as tf

from cxrkeras.data.preprocess import decode_levels, preprocess_for_eval

BYTES_SIGNATURE = "serving_default"
IMAGES_SIGNATURE = "predict_images"
BYTES_INPUT = "image_bytes"
IMAGES_INPUT = "images"

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"


def check_image_bytes(contents, index):
    """Assert that one element is non-empty PNG or JPEG data; InvalidArgument naming the element otherwise.

    Truncated PNG/JPEG data passes this check and is then refused by the decoder ("Invalid PNG data",
    "jpeg::Uncompress failed. Invalid JPEG data").
    """
    size = tf.strings.length(contents)
    head = tf.strings.substr(contents, 0, 8)
    is_png = tf.equal(head, _PNG_MAGIC)
    is_jpeg = tf.equal(tf.strings.substr(contents, 0, 3), _JPEG_MAGIC)
    message = tf.strings.join([
        "image_bytes[", tf.strings.as_string(index), "]: not a PNG or JPEG image (", tf.strings.as_string(size),
        " bytes, starting with: ", tf.strings.substr(contents, 0, 8), "). Send the raw bytes of a PNG or JPEG "
        "file (in a REST request base64-encoded under the key b64)."])
    empty = tf.strings.join(["image_bytes[", tf.strings.as_string(index), "]: empty string (0 bytes), not an image."])
    checks = [tf.debugging.Assert(size > 0, [empty]), tf.debugging.Assert(tf.equal(size, 0) | is_png | is_jpeg, [message])]
    with tf.control_dependencies(checks):
        return tf.identity(contents)


def bytes_to_inputs(image_bytes, image_size, preprocessing, equalize=None):
    """[B] encoded images → [B, S, S, 3] float32 model inputs, exactly the evaluation transform."""
    image_size = int(image_size)

    def one(args):
        contents, index = args
        image = decode_levels(check_image_bytes(contents, index))
        return preprocess_for_eval(image, image_size, preprocessing, equalize)

    indices = tf.range(tf.shape(image_bytes)[0])
    return tf.map_fn(one, (image_bytes, indices),
                     fn_output_signature=tf.TensorSpec([image_size, image_size, 3], tf.float32))


def make_endpoints(model, thresholds, image_size, preprocessing, equalize=None):
    """(bytes_fn, images_fn, specs): plain functions of the two signatures and their input signatures."""
    thresholds = tf.constant(thresholds, tf.float32, name="thresholds")
    image_size = int(image_size)

    def outputs(images):
        probs = tf.cast(model(images, training=False), tf.float32)
        return {"probabilities": probs, "findings": tf.greater_equal(probs, thresholds)}

    def serve_bytes(image_bytes):
        return outputs(bytes_to_inputs(image_bytes, image_size, preprocessing, equalize))

    def serve_images(images):
        return outputs(images)

    specs = {BYTES_SIGNATURE: [tf.TensorSpec([None], tf.string, name=BYTES_INPUT)],
             IMAGES_SIGNATURE: [tf.TensorSpec([None, image_size, image_size, 3], tf.float32, name=IMAGES_INPUT)]}
    return serve_bytes, serve_images, specs


def build_archive(model, thresholds, image_size, preprocessing, equalize=None, asset_paths=None):
    """A keras.export.ExportArchive with both signatures (serving_default first) and `asset_paths` as assets."""
    import keras

    serve_bytes, serve_images, specs = make_endpoints(model, thresholds, image_size, preprocessing, equalize)
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(BYTES_SIGNATURE, serve_bytes, input_signature=specs[BYTES_SIGNATURE])
    archive.add_endpoint(IMAGES_SIGNATURE, serve_images, input_signature=specs[IMAGES_SIGNATURE])
    # tf.saved_model.Asset copies each file into <version>/assets/ and records it in the SavedModel.
    trackable = archive._tf_trackable  # noqa: SLF001 - ExportArchive offers no public hook for file assets
    for name, path in (asset_paths or {}).items():
        setattr(trackable, f"asset_{name}", tf.saved_model.Asset(path))
    return archive


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
