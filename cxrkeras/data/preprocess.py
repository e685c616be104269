"""The old import path of the graph image transforms, kept for user code: every name now lives in its own module
(decode, equalize, normalize, eval_transform, augment); the one owner of the whole chain is `Preprocessor`."""

from cxrkeras.data.augment import (augment_and_normalize, augment_transforms, check_crop_scale,  # noqa: F401
                                   random_augment, warp_bilinear, warp_in_range)
from cxrkeras.data.decode import decode_image, decode_levels, to_gray, to_rgb  # noqa: F401
from cxrkeras.data.equalize import (EQUALIZE, check_equalize, clahe, equalize_batch, equalize_image,  # noqa: F401
                                    hist_equalize)
from cxrkeras.data.eval_transform import center_square_resize, central_square, preprocess_for_eval  # noqa: F401
from cxrkeras.data.normalize import (_CAFFE_BGR_MEAN, _TORCH_MEAN, _TORCH_STD, MODES, check_mode,  # noqa: F401
                                     denormalize, normalize, to_model_input)
from cxrkeras.constants import FILL_MODES  # noqa: F401
