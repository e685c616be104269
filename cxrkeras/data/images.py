"""Reading any input image (PNG/JPEG, 8/16-bit, RGBA; DICOM through dicom.py) into uint8, resizing once and
encoding lossless PNG."""

import io
import os
import re

import numpy as np
from PIL import Image, UnidentifiedImageError

DICOM_EXTENSIONS = (".dcm", ".dicom")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp") + DICOM_EXTENSIONS


def describe_error(exc):
    """An exception as short printable text for messages and manifests: never the input's bytes (a decoder may
    quote them, e.g. PIL's "broken PNG file (chunk b'...')"), at most 160 characters."""
    text = re.sub(r"""b(['"])(?:\\.|(?!\1).)*\1""", "<bytes>", str(exc))
    text = "".join(c if " " <= c <= "~" else "?" for c in text).strip()
    return f"{type(exc).__name__}: {text[:160]}" if text else type(exc).__name__


class ImageError(Exception):
    """An input image that cannot be used; `reason` is the short text written to the manifest's `skipped`."""

    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


def to_uint8_minmax(arr):
    """An image of any range (16-bit, float) stretched to its own min..max onto 0..255, rounded; flat -> 0."""
    arr = np.asarray(arr, dtype=np.float64)
    lo, hi = float(np.min(arr)), float(np.max(arr))
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    return np.round((arr - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _pil_to_array(img, channels):
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # >8-bit data: X-ray PNGs often use 10-14 of 16 bits, so scale the image's own range, not 65535
        gray = to_uint8_minmax(np.asarray(img))
        return gray if channels == 1 else np.stack([gray] * 3, axis=-1)
    if channels == 1:
        return np.asarray(img.convert("L"))  # RGBA/LA: alpha dropped (NIH's RGBA files are opaque gray)
    return np.asarray(img.convert("RGB"))


MAX_FILE_BYTES = 1 << 30  # one image file; the largest radiograph DICOMs are a few tens of MB


def read_bytes(path):
    """The file's bytes; ImageError for a missing, unreadable, empty or oversized (> MAX_FILE_BYTES) file."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_FILE_BYTES:
                raise ImageError(f"file of {size:,} bytes, over the {MAX_FILE_BYTES >> 20} MiB limit for one image")
            data = f.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError as exc:
        raise ImageError("file not found") from exc
    except OSError as exc:
        raise ImageError(f"cannot be read ({exc.strerror or exc})") from exc
    if not data:
        raise ImageError("empty file (0 bytes)")
    return data


def read_image(path, channels=1, data=None):
    """uint8 array (H, W) for channels=1 or (H, W, 3); raises ImageError with a precise reason.
    `data`: the file's bytes when the caller has already read them."""
    if data is None:
        data = read_bytes(path)
    from cxrkeras.data.dicom import is_dicom, read_dicom

    if is_dicom(path, data[:132]):
        gray = read_dicom(data)
        return gray if channels == 1 else np.stack([gray] * 3, axis=-1)
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except UnidentifiedImageError as exc:
        raise ImageError(f"not an image file (unrecognised format, {len(data)} bytes)") from exc
    except Image.DecompressionBombError as exc:  # e.g. a GIF of a few bytes declaring 20000 x 20000 pixels
        raise ImageError(f"the image declares too many pixels ({describe_error(exc)})") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"truncated or corrupt {img.format or 'image'} file ({describe_error(exc)})") from exc
    return _pil_to_array(img, channels)


REDUCING_GAP = 3.0  # integer-block reduce first when the source is at least this many times the output


def resize(arr, image_size):
    """Resize once to (height, width) with an anti-aliased Lanczos filter (unchanged if already that size).

    PIL's resize(LANCZOS, reducing_gap=3) spelled out as its steps, so the result does not depend on the order in
    which a Pillow version runs the two passes (Pillow 13 resizes tall images vertically first): `reduce()` by the
    integer factors PIL would use, then the horizontal pass, then the vertical one, each over the exact region of
    the reduced image. `cxrkeras.data.resize.pil_resize` computes the same pixels as TensorFlow ops.
    """
    height, width = image_size
    if arr.shape[0] == height and arr.shape[1] == width:
        return arr
    img = Image.fromarray(arr)
    src_w, src_h = img.size
    fx = int(src_w / width / REDUCING_GAP) or 1
    fy = int(src_h / height / REDUCING_GAP) or 1
    if fx > 1 or fy > 1:
        img = img.reduce((fx, fy))
    extent_x, extent_y = src_w / fx, src_h / fy  # the part of the reduced image that maps onto the output
    if img.width != width or extent_x != width:
        img = img.resize((width, img.height), Image.Resampling.LANCZOS, box=(0, 0, extent_x, img.height))
    if img.height != height or extent_y != height:
        img = img.resize((width, height), Image.Resampling.LANCZOS, box=(0, 0, width, extent_y))
    return np.asarray(img)


def encode_png(arr):
    buf = io.BytesIO()
    # level 3: ~2.5x faster to write than the default 6; files ~14 % larger, decoding ~5 % slower (measured)
    Image.fromarray(arr).save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def encode_resized(arr, image_size, encoding="png"):
    """(bytes, height, width, channels) of a uint8 image resized to `image_size`: lossless PNG, or with
    `encoding="raw"` the pixels as they are (H x W x C uint8, row-major; about 2x the PNG's size on X-rays)."""
    arr = resize(arr, image_size)
    return encode_pixels(arr, encoding), arr.shape[0], arr.shape[1], 1 if arr.ndim == 2 else arr.shape[2]


def encode_pixels(arr, encoding="png"):
    """A record's image bytes of a uint8 image: PNG, or with `encoding="raw"` its pixels (row-major)."""
    return np.ascontiguousarray(arr).tobytes() if encoding == "raw" else encode_png(arr)


def load_encoded(path, image_size, channels=1, encoding="png"):
    """(bytes, height, width, channels) of `path` resized to `image_size` (see encode_resized); raises ImageError."""
    if path is None:
        raise ImageError("file not found")
    return encode_resized(read_image(path, channels), image_size, encoding)


def is_image_name(name):
    return name.lower().endswith(IMAGE_EXTENSIONS)


def file_size(path):
    try:
        return os.path.getsize(path)
    except OSError:
        return -1
