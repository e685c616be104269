"""The variants table (trainable parameters, GFLOPs) printed by `cxrkeras models`."""

from cxrkeras.models.build import build_model
from cxrkeras.models.flops import gflops, trainable_params
from cxrkeras.models.registry import get_variant, list_variants


def variant_rows(variants=None, image_size=224, num_classes=14):
    """One dict per variant: built (not run) at image_size to count its parameters and multiply-adds."""
    import keras

    rows = []
    for name in variants or list_variants():
        spec = get_variant(name)
        model = build_model(name, num_classes=num_classes, input_shape=(image_size, image_size, 3))
        rows.append(dict(variant=name, params=trainable_params(model), gflops=gflops(model),
                         paper_params=spec.paper_params, paper_gflops=spec.paper_gflops,
                         preprocessing=spec.preprocessing, imagenet="yes" if spec.imagenet_available else "no",
                         description=spec.description))
        del model
        keras.backend.clear_session()  # keeps memory and layer-name counters flat over 12 builds
    return rows


def format_table(rows, image_size=224):
    head = ("variant", "trainable params", f"GFLOPs@{image_size}", "paper params", "paper GFLOPs", "prep",
            "imagenet", "description")
    body = [(r["variant"], f"{r['params']:,}", f"{r['gflops']:.2f}",
             f"{r['paper_params']:,}" if r["paper_params"] else "-",
             f"{r['paper_gflops']:.2f}" if r["paper_gflops"] else "-", r["preprocessing"], r["imagenet"],
             r["description"]) for r in rows]
    widths = [max(len(str(row[i])) for row in (head, *body)) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) if i in (0, 5, 6, 7) else str(c).rjust(w)
                       for i, (c, w) in enumerate(zip(row, widths))).rstrip() for row in (head, *body)]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines) + "\nGFLOPs = multiply-adds of convolutions, dense layers and LKA (BN, pooling, " \
                              "activations not counted); paper columns are published figures (VGG16-BN)."
