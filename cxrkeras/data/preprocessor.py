"""`Preprocessor`: the one chain from an image file to model input, shared by evaluation, serving, prediction,
Grad-CAM, localisation and preview, and stored with the model so that every one of them rebuilds the same chain.

  bytes -> decode (8/16 bit; alpha dropped) -> the records' channels (PIL's grey for colour files) -> build-records'
  resize to the stored size (PIL Lanczos, reducing gap 3, whole levels) -> [equalise at the stored size]
  -> central square -> antialiased bilinear resize to the model size -> normalisation.

Records hold the result of the first part; the pipeline applies the rest (`equalize_stored`, `model_input`), so a
file served or explained reaches the model as its record does in evaluation (`tests/test_preprocessor.py` measures
how closely). A model that records no stored size or channels (trained before they were stored) is served as it
was then: decoded as RGB and brought straight to the model size.
"""

import dataclasses
from typing import Optional

from cxrkeras.constants import CHANNELS
from cxrkeras.errors import ConfigError

CONFIG_KEYS = ("image_size", "preprocessing", "equalize", "stored_size", "channels")


@dataclasses.dataclass(frozen=True)
class Preprocessor:
    """image_size: the model's square input; preprocessing: its normalisation ("torch" | "caffe"); equalize: None |
    "hist" | "clahe", applied at the stored size; stored_size: (height, width) of the records the model was trained
    on (None: not recorded); channels: the records' channels, 1 or 3 (None: not recorded)."""

    image_size: int = 224
    preprocessing: str = "torch"
    equalize: Optional[str] = None
    stored_size: Optional[tuple] = None
    channels: Optional[int] = None

    def __post_init__(self):
        from cxrkeras.constants import EQUALIZE, PREPROCESSING

        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or self.image_size < 1:
            raise ConfigError(f"image_size must be a positive integer, got {self.image_size!r}")
        if self.preprocessing not in PREPROCESSING:
            raise ConfigError(f"unknown preprocessing {self.preprocessing!r}: choose one of {', '.join(PREPROCESSING)}")
        if self.equalize is not None and self.equalize not in EQUALIZE:
            raise ConfigError(f"unknown equalize {self.equalize!r}: choose None, 'hist' or 'clahe'")
        if self.channels is not None and self.channels not in CHANNELS:
            raise ConfigError(f"channels must be 1 or 3 (or None: not recorded), got {self.channels!r}")
        if self.stored_size is not None:
            try:
                size = tuple(int(v) for v in self.stored_size)
            except (TypeError, ValueError):
                size = ()
            if len(size) != 2 or min(size) < 1:
                raise ConfigError(f"stored_size must be (height, width) of the records, got {self.stored_size!r}")
            object.__setattr__(self, "stored_size", size)

    # --- construction and storage ---

    @classmethod
    def for_records(cls, manifest, image_size, preprocessing, equalize=None):
        """The preprocessor of a model trained at `image_size` on the records of `manifest`."""
        stored = manifest.get("image_size")
        return cls(image_size=int(image_size), preprocessing=preprocessing, equalize=equalize,
                   stored_size=tuple(stored) if stored else None, channels=int(manifest.get("channels", 1)))

    def to_config(self):
        """A plain dict (JSON, YAML, a Keras layer config) that `from_config` turns back into this preprocessor."""
        config = dataclasses.asdict(self)
        config["stored_size"] = list(self.stored_size) if self.stored_size else None
        return config

    @classmethod
    def from_config(cls, config, where="preprocessor"):
        unknown = sorted(set(config) - set(CONFIG_KEYS))
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(CONFIG_KEYS)}); "
                              "it was written by a newer cxrkeras")
        return cls(**config)

    def describe(self):
        """One line for logs, e.g. "224 px, torch normalisation, from 256x256 grey records, clahe"."""
        stored = (f"from {self.stored_size[0]}x{self.stored_size[1]} {'grey' if self.channels == 1 else 'RGB'} "
                  "records" if self.stored_size else "no stored size recorded (resized straight to the model size)")
        return f"{self.image_size} px, {self.preprocessing} normalisation, {stored}" + \
            (f", {self.equalize} equalisation" if self.equalize else "")

    # --- the chain, as graph ops ---

    def decode(self, contents):
        """PNG/JPEG bytes -> float32 (H, W, channels) whole levels at the file's own size."""
        from cxrkeras.data.decode import decode_levels, to_channels

        return to_channels(decode_levels(contents), self.channels)

    def to_stored(self, image):
        """(H, W, C) levels -> float32 whole levels at the stored size, as build-records resizes (unchanged when the
        stored size is not recorded or already the image's)."""
        import tensorflow as tf

        if self.stored_size is None:
            return tf.cast(image, tf.float32)
        from cxrkeras.data.resize import pil_resize

        return pil_resize(image, self.stored_size)

    def equalize_stored(self, image):
        """Equalise an image (or batch) at the stored size; uint8 in, uint8 out (as the pipeline does)."""
        from cxrkeras.data.equalize import equalize_batch

        return equalize_batch(image, self.equalize)

    def model_input(self, images):
        """(..., H, W, C) levels at the stored size (after `equalize_stored`) -> float32 (..., S, S, 3) model input:
        central square, antialiased bilinear resize, normalisation."""
        from cxrkeras.data.eval_transform import center_square_resize
        from cxrkeras.data.normalize import to_model_input

        return to_model_input(center_square_resize(images, self.image_size), self.preprocessing)

    def from_levels(self, image):
        """One (H, W, C) image of levels 0..255 at any size (a decoded file) -> float32 (S, S, 3) model input."""
        import tensorflow as tf

        from cxrkeras.data.decode import to_channels

        stored = self.to_stored(to_channels(image, self.channels))
        levels = tf.cast(tf.clip_by_value(tf.round(stored), 0.0, 255.0), tf.uint8)  # records hold uint8
        return self.model_input(self.equalize_stored(levels))

    def from_bytes(self, contents):
        """One encoded PNG/JPEG (scalar string) -> float32 (S, S, 3) model input."""
        return self.from_levels(self.decode(contents))

    # --- for display ---

    def region(self, height, width):
        """(top, left, height, width) of an original image that the model sees: all of it when the stored size is
        known (build-records squeezes every image into the square records), else its central square."""
        if self.stored_size is not None:
            return 0, 0, int(height), int(width)
        from cxrkeras.data.eval_transform import central_square

        return central_square(height, width)

    def denormalize(self, images):
        """Model input -> RGB float in [0, 255], for display."""
        from cxrkeras.data.normalize import denormalize

        return denormalize(images, self.preprocessing)
