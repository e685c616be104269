"""HOG and LBP texture features of one grey image (scikit-image), with their dimensions stated up front."""

import dataclasses

import numpy as np

from cxrkeras.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class TextureParams:
    """size: the square the equalised image is resized to first; HOG: orientations, pixels_per_cell,
    cells_per_block (L2-Hys blocks, as Dalal & Triggs); LBP: points, radius ("uniform" patterns, a normalised
    histogram of points + 2 bins)."""

    size: int = 64
    orientations: int = 9
    pixels_per_cell: int = 8
    cells_per_block: int = 2
    lbp_points: int = 8
    lbp_radius: float = 1.0

    def __post_init__(self):
        for key, lo, hi in (("size", 16, 512), ("orientations", 1, 36), ("pixels_per_cell", 2, 128),
                            ("cells_per_block", 1, 16), ("lbp_points", 4, 32)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise ConfigError(f"{key} must be an integer in [{lo}, {hi}], got {value!r}")
        if not 1.0 <= float(self.lbp_radius) <= 16.0:
            raise ConfigError(f"lbp_radius must be in [1, 16], got {self.lbp_radius}")
        if self.size // self.pixels_per_cell < self.cells_per_block:
            raise ConfigError(f"HOG: a {self.size} px image has {self.size // self.pixels_per_cell} cells per side, "
                              f"fewer than cells_per_block={self.cells_per_block}")

    @property
    def hog_dim(self):
        """orientations * cells_per_block**2 * (cells per side - cells_per_block + 1)**2."""
        blocks = self.size // self.pixels_per_cell - self.cells_per_block + 1
        return self.orientations * self.cells_per_block ** 2 * blocks ** 2

    @property
    def lbp_dim(self):
        """points + 2: the points + 1 rotation-invariant uniform patterns and one bin for all the others."""
        return self.lbp_points + 2


def texture_features(image, params):
    """float32 [hog_dim + lbp_dim] of a (size, size) grey image with levels 0..255."""
    from skimage.feature import hog, local_binary_pattern

    image = np.asarray(image, np.float64)
    if image.shape != (params.size, params.size):
        raise ValueError(f"texture_features needs a {params.size}x{params.size} image, got {image.shape}")
    h = hog(image, orientations=params.orientations, pixels_per_cell=(params.pixels_per_cell,) * 2,
            cells_per_block=(params.cells_per_block,) * 2, block_norm="L2-Hys", feature_vector=True)
    codes = local_binary_pattern(image.astype(np.uint8), params.lbp_points, params.lbp_radius, method="uniform")
    hist = np.bincount(codes.astype(np.int64).ravel(), minlength=params.lbp_dim)[: params.lbp_dim]
    return np.concatenate([h, hist / max(1, codes.size)]).astype(np.float32)
