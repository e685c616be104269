"""`cxrkeras serve`: a web page and TF Serving's REST API over one model (upload → findings + Grad-CAM)."""


def serve(*args, **kwargs):
    # lazy: the web stack (an optional extra) and TensorFlow are imported only when serving
    from cxrkeras.serve.server import serve as _serve

    return _serve(*args, **kwargs)


__all__ = ["serve"]
