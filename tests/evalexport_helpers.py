"""Helpers shared by the evaluation/export tests: a tiny model with cxrkeras' head and an LKA layer, test images."""

import io
import os

import numpy as np


def tiny_model(size=32, labels=None, seed=0, preprocessor=None):
    """Conv -> LargeKernelAttention -> GAP -> MultiLabelDense: model_info works, outputs vary, custom layers saved.
    preprocessor: a Preprocessor config stored with the model (as training stores it), or None (an older model)."""
    import keras

    from cxrkeras.labels import NIH_LABELS
    from cxrkeras.models import LargeKernelAttention, MultiLabelDense

    labels = list(labels or NIH_LABELS)
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((size, size, 3), name="image")
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu", name="conv")(inputs)
    x = LargeKernelAttention(name="lka")(x)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    outputs = MultiLabelDense(len(labels), labels=labels, variant="tiny-test", preprocessing="torch",
                              feature_layer="lka", build_args={}, preprocessor=preprocessor, name="predictions")(x)
    model = keras.Model(inputs, outputs, name="tiny")
    rng = np.random.default_rng(seed)
    model.set_weights([rng.normal(0, 1.5 / np.sqrt(np.prod(w.shape[:-1])), w.shape).astype("float32")
                       if len(w.shape) > 1 else w for w in model.get_weights()])
    # LKA multiplies features by their attention, which shrinks them at random init: rescale the head so the
    # logits spread over a few units and the probabilities differ between images
    probe = rng.normal(0, 1, (16, size, size, 3)).astype("float32")
    probe[8:] += np.linspace(-2, 2, size)[None, :, None, None].astype("float32")
    feats = np.asarray(keras.Model(inputs, model.get_layer("avg_pool").output)(probe), dtype=np.float64)
    head = model.get_layer("predictions")
    kernel = rng.normal(0, 1, head.kernel.shape) / (feats.std(axis=0).mean() * np.sqrt(feats.shape[1]) + 1e-12)
    head.set_weights([(2 * kernel).astype("float32"), (-2 * feats.mean(axis=0) @ kernel).astype("float32")])
    return model


def png_bytes(arr):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(arr, quality=95):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def sample_gray(name="00004296_000.png"):
    from PIL import Image

    path = os.path.join(os.path.dirname(__file__), os.pardir, "cxrkeras", "sample_data", "nih-512px", "images", name)
    return np.asarray(Image.open(path).convert("L"))


def write_dicom(path, arr16, window=None):
    """A minimal valid MONOCHROME2 16-bit DICOM file with `arr16` as pixel data."""
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(path, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = arr16.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = arr16.astype(np.uint16).tobytes()
    pydicom.dcmwrite(path, ds, enforce_file_format=True) if "enforce_file_format" in \
        pydicom.dcmwrite.__code__.co_varnames else ds.save_as(path, write_like_original=False)
    return path


def huge_gif(width=20000, height=20000):
    """A GIF of a few bytes whose header declares width x height pixels (PIL refuses it as a decompression bomb)."""
    import struct

    screen = struct.pack("<HHBBB", width, height, 0, 0, 0)
    image = b"," + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x44\x01\x00"
    return b"GIF89a" + screen + image + b";"
