"""Weight files as other tools write them, for the loading tests."""

import h5py
import numpy as np


def write_legacy_h5(model, path, prefix=""):
    """The layer_names / weight_names layout of keras.applications' ImageNet .h5 files (Keras 2 save_weights), for
    the model's layers with weights whose names start with `prefix`."""
    with h5py.File(path, "w") as f:
        names = [layer.name for layer in model.layers if layer.weights and layer.name.startswith(prefix)]
        f.attrs["layer_names"] = [n.encode() for n in names]
        for name in names:
            group = f.create_group(name)
            weights = model.get_layer(name).weights
            group.attrs["weight_names"] = [f"{name}/{w.name}:0".encode() for w in weights]
            for w in weights:
                group.create_dataset(f"{name}/{w.name}:0", data=np.asarray(w))
    return path
