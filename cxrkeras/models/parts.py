"""Which layers a pretrained backbone never has: LKA blocks, attention gates, the sequence head (LSTM, self-attention),
the patient branch and the head (FPSM's included).

Backbone weight files leave them at their initial values, and `train.freeze_backbone_epochs` keeps them trainable.
"""

from cxrkeras.models.attention import LAYER_PREFIXES as ATTENTION_PREFIXES

HEAD_LAYERS = ("avg_pool", "head_dropout", "head_concat", "predictions")
FPSM_PREFIX = "fpsm"  # the feature-pyramid head's pooling and concatenation (cxrkeras.models.fpsm)
PATIENT_PREFIX = "patient_"
SEQUENCE_PREFIX = "seq_"  # models/efficientnet.py's sequence head


def is_added(layer):
    """True for an LKA block, an attention-gate layer, the sequence head, the patient branch or a head layer."""
    from cxrkeras.models.lka import LargeKernelAttention

    name = layer.name
    return (isinstance(layer, LargeKernelAttention) or name in HEAD_LAYERS
            or name.startswith((PATIENT_PREFIX, FPSM_PREFIX, SEQUENCE_PREFIX) + tuple(ATTENTION_PREFIXES)))


def added_layers(model):
    """Names of the model's added layers that have weights, in model order."""
    return [layer.name for layer in model.layers if layer.weights and is_added(layer)]
