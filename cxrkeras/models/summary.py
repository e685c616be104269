"""The variants table (trainable parameters, GFLOPs in two conventions) printed by `cxrkeras models`."""

from cxrkeras.models.build import build_model
from cxrkeras.models.flops import fvcore_flops, gflops, trainable_params
from cxrkeras.models.registry import get_variant, list_variants

IMAGENET = {"keras": "keras.applications", "torchvision": "torchvision"}


def variant_rows(variants=None, image_size=224, num_classes=14, skipped=None, **head):
    """One dict per variant: built (not run) at image_size to count its parameters and operations. `head`: build
    options of the head (head="fpsm", head_stages, head_merge); listing every variant, those that refuse the head
    are left out and named in `skipped` ({variant: reason}); a variant asked for by name raises. A variant with a
    `compare_to` brings that variant into the table (its ratio line needs both, measured in the same run)."""
    import keras

    from cxrkeras.errors import ConfigError

    names = list(variants or list_variants())
    for name in list(names):
        other = get_variant(name).compare_to
        if other and other not in names:
            names.append(other)
    rows = []
    for name in names:
        spec = get_variant(name)
        try:
            model = build_model(name, num_classes=num_classes, input_shape=(image_size, image_size, 3), **head)
        except ConfigError as exc:
            if variants or skipped is None:
                raise
            skipped[name] = str(exc)
            continue
        # published counts: the LKA paper's at 14 classes, the attention study's (its Table 2) at 15; another head
        # is not what they counted
        published = None if head else {14: spec.paper_params, 15: spec.study_params}.get(num_classes)
        rows.append(dict(variant=name, params=trainable_params(model), gflops=gflops(model),
                         fvcore_gflops=fvcore_flops(model), paper_params=published,
                         paper_gflops=None if head else spec.paper_gflops, preprocessing=spec.preprocessing,
                         imagenet=IMAGENET[spec.imagenet_source], description=spec.description,
                         compare_to=spec.compare_to))
        del model
        keras.backend.clear_session()  # keeps memory and layer-name counters flat over 15 builds
    return rows


def ratio_lines(rows):
    """"A vs B: params x.xx (n% fewer), GMACs x.xx" for each row with a compare_to present in the rows."""
    by_name = {r["variant"]: r for r in rows}
    out = []
    for r in rows:
        other = by_name.get(r.get("compare_to"))
        if other:
            ratio = r["params"] / other["params"]
            out.append(f"{r['variant']} vs {other['variant']} (measured here): trainable params {r['params']:,} / "
                       f"{other['params']:,} = {ratio:.3f} ({100 * (1 - ratio):.1f}% fewer), GMACs "
                       f"{r['gflops']:.2f} / {other['gflops']:.2f} = {r['gflops'] / other['gflops']:.3f}")
    return out


def format_table(rows, image_size=224):
    head = ("variant", "trainable params", "published params", f"GMACs@{image_size}", f"fvcore GFLOPs@{image_size}",
            "paper GFLOPs", "prep", "imagenet", "description")
    body = [(r["variant"], f"{r['params']:,}", f"{r['paper_params']:,}" if r["paper_params"] else "-",
             f"{r['gflops']:.2f}", f"{r['fvcore_gflops']:.2f}",
             f"{r['paper_gflops']:.2f}" if r["paper_gflops"] else "-", r["preprocessing"], r["imagenet"],
             r["description"]) for r in rows]
    left = (0, 6, 7, 8)
    widths = [max(len(str(row[i])) for row in (head, *body)) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) if i in left else str(c).rjust(w)
                       for i, (c, w) in enumerate(zip(row, widths))).rstrip() for row in (head, *body)]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines + ratio_lines(rows) + [
        "GMACs: multiply-adds of convolutions, dense layers, LSTM gates, multi-head attention and the LKA product "
        "x * attn (batch norm, pooling, activations and squeeze-excite products not counted).",
        "fvcore GFLOPs: the paper's convention (fvcore's FlopCountAnalysis of its PyTorch modules): convolutions "
        "and linear layers as multiply-adds, batch norm 2 per element, the global average pool's input; the LKA "
        "product not counted.",
        "published params: the LKA paper's at 14 classes, the attention study's Table 2 at --num-classes 15; paper "
        "GFLOPs: the LKA paper's (VGG16 with batch norm)."])
