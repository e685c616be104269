"""cxrkeras: LKA-attention chest X-ray classifiers for NIH ChestX-ray14 in Keras 3 / TensorFlow."""

__version__ = "0.1.0"
