"""DenseNet121 with "learn to pay attention" gates (Jetley et al., ICLR 2018), as the attention study adapts them.

Local features L1, L2, L3 are the outputs of transitions 1-3 (pool2_pool, pool3_pool, pool4_pool: 128, 256 and 512
channels in DenseNet121); the global feature g is the vector the baseline's classifier sees (norm5 -> ReLU -> global
average pool: 1024). Per scale s and pixel i, a compatibility score c_i, a softmax over the pixels and the
attention-weighted sum of the local features; the three attended vectors, concatenated, feed the one classifier
(it replaces the classifier over g).

  att-A ("a"): l^_i = W_s l_i (a 1x1 convolution to 1024 channels, no bias); c_i = <u_s, l^_i + g>; g_a = sum a_i l^_i
  att-B ("b"): c_i = <u_s, [l_i; g]> (u_s of C_s + 1024 values, no bias);          g_a = sum a_i l_i

Every gate is built from Keras layers with fixed names (att-A: `att<s>_proj`, `att<s>_u`; att-B: `att<s>_u_local`,
`att<s>_u_global`; both: `att<s>_weights`, ...), so a model saves and loads as any other; `attention_maps` reads the weights back as (H, W) maps for figures.
"""

import numpy as np

from cxrkeras.constants import ATTENTION as FORMS
from cxrkeras.errors import ConfigError

GATES = ("att1", "att2", "att3")  # one gate per transition output
LOCAL_LAYERS = ("pool2_pool", "pool3_pool", "pool4_pool")  # L1, L2, L3
FEATURE_LAYER = LOCAL_LAYERS[-1]  # Grad-CAM's default: the coarsest local feature the classifier attends to
LAYER_PREFIXES = tuple(f"{g}_" for g in GATES) + ("att_concat",)


def check_attention(value):
    """"none" | "a" | "b" from a config value (None, "att-a", "A", ...); a ConfigError naming the choices."""
    key = "none" if value is None or value is False else str(value).strip().lower()
    key = key[4:] if key.startswith("att-") else key
    if key not in FORMS:
        raise ConfigError(f"unknown attention {value!r}: choose none, a (att-A: projected local features, "
                          f"<u, l + g>) or b (att-B: <u, [l; g]>)")
    return key


def gate_param_count(local_channels, global_dim, form):
    """Trainable parameters of one gate: att-A C*G (projection) + G (u); att-B C + G (u)."""
    if form == "a":
        return local_channels * global_dim + global_dim
    return local_channels + global_dim


def apply_attention_gate(local, g, form, name):
    """One gate on local features `local` (B, H, W, C) with the global vector `g` (B, G): the attended vector
    (B, G) for att-A, (B, C) for att-B. Its attention weights are the output of layer `<name>_weights`
    (B, H*W, 1), summing to 1 over the pixels."""
    import keras

    pixels = int(local.shape[1]) * int(local.shape[2])
    dim = int(g.shape[-1])
    # The gates see the pixels as a sequence (B, H*W, C), and g is repeated over the pixels rather than broadcast:
    # Keras 3.15's ops.add turns (B, N, 1) + (B, 1, 1) into a bias_add along N whenever B == N (a wrong sum).
    repeat = keras.layers.RepeatVector(pixels, name=f"{name}_global")
    if form == "a":
        local = keras.layers.Conv2D(dim, 1, use_bias=False, name=f"{name}_proj")(local)  # l^_i = W l_i
        vectors = keras.layers.Reshape((pixels, dim), name=f"{name}_local")(local)
        summed = keras.layers.Add(name=f"{name}_sum")([vectors, repeat(g)])
        scores = keras.layers.Dense(1, use_bias=False, name=f"{name}_u")(summed)  # <u, l^_i + g>: (B, H*W, 1)
    else:  # <u, [l_i; g]> = <u_l, l_i> + <u_g, g>: the two parts of u as two bias-free layers
        vectors = keras.layers.Reshape((pixels, int(local.shape[-1])), name=f"{name}_local")(local)
        from_local = keras.layers.Dense(1, use_bias=False, name=f"{name}_u_local")(vectors)
        from_global = keras.layers.Dense(1, use_bias=False, name=f"{name}_u_global")(g)
        scores = keras.layers.Add(name=f"{name}_sum")([from_local, repeat(from_global)])
    # float32 under mixed precision: the weights are a distribution over up to thousands of pixels
    weights = keras.layers.Softmax(axis=1, dtype="float32", name=f"{name}_weights")(scores)
    pooled = keras.layers.Dot(axes=1, name=f"{name}_pool")([weights, vectors])  # sum_i a_i l_i: (B, 1, C)
    return keras.layers.Flatten(name=f"{name}_vector")(pooled)


def apply_attention_head(local_features, g, form):
    """The three gates on L1..L3 with the global vector g; their attended vectors concatenated (`att_concat`)."""
    import keras

    if len(local_features) != len(GATES):
        raise ConfigError(f"attention gates need {len(GATES)} local features (the outputs of transitions 1-3), "
                          f"got {len(local_features)}")
    vectors = [apply_attention_gate(local, g, form, name) for local, name in zip(local_features, GATES)]
    return keras.layers.Concatenate(name="att_concat")(vectors)


def has_attention(model):
    names = {layer.name for layer in model.layers}
    return all(f"{g}_weights" in names for g in GATES)


def attention_model(model):
    """A keras.Model from the model's inputs to its gates' weights ((B, H*W, 1) each, in GATES order)."""
    import keras

    if not has_attention(model):
        raise ConfigError(f"model {model.name!r} has no attention gates (build a densenet121-att-a / -att-b "
                          f"variant, or attention='a' / 'b')")
    outputs = [model.get_layer(f"{g}_weights").output for g in GATES]
    return keras.Model(model.inputs, outputs, name=f"{model.name}_attention")


def attention_maps(model, inputs, batch_size=16):
    """{gate: float32 [N, H, W]} attention weights of each gate for `inputs` (what the model takes: images, or
    (images, patient features)); each map sums to 1. The maps have the resolution of L1, L2, L3."""
    net = attention_model(model)
    shapes = [tuple(int(v) for v in model.get_layer(local).output.shape[1:3]) for local in LOCAL_LAYERS]
    outs = net.predict(inputs, batch_size=batch_size, verbose=0)
    return {g: np.asarray(w, dtype=np.float32).reshape((-1,) + hw) for g, w, hw in zip(GATES, outs, shapes)}
