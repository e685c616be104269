"""Parse LKA placements ("none", "after", "last2", "full", or an explicit list of blocks) into block positions."""

from cxrkeras.errors import ConfigError

AFTER = "after"


def resolve_placement(lka_blocks, num_blocks, named, backbone):
    """Return a sorted tuple of block numbers (1-based) and/or "after" where an LKA block goes.

    `named` maps placement names (besides "none" and "after") to block tuples, e.g. {"last2": (3, 4)}.
    Explicit lists may mix block numbers and "after", e.g. [3, 4] or (4, "after").
    """
    valid_names = ("none", AFTER, *named)
    if lka_blocks is None:
        return ()
    if isinstance(lka_blocks, str):
        key = lka_blocks.strip().lower()
        if key == "none":
            return ()
        if key == AFTER:
            return (AFTER,)
        if key in named:
            return tuple(named[key])
        if "," in key or key.isdigit():  # "3,4" from a CLI or YAML file
            return resolve_placement([p.strip() for p in key.split(",") if p.strip()], num_blocks, named, backbone)
        raise ConfigError(f"unknown LKA placement {lka_blocks!r} for {backbone}: use one of {', '.join(valid_names)} "
                          f"or a list of block numbers 1-{num_blocks} (optionally with 'after')")
    blocks = set()
    for item in lka_blocks:
        if isinstance(item, str) and item.strip().lower() == AFTER:
            blocks.add(AFTER)
            continue
        try:
            number = int(item)
        except (TypeError, ValueError):
            number = None
        if number is None or isinstance(item, float) and item != number or not 1 <= number <= num_blocks:
            raise ConfigError(f"unknown LKA block {item!r} for {backbone}: blocks are numbered 1-{num_blocks} "
                              f"(or 'after' for after the feature extractor)")
        blocks.add(number)
    numbers = sorted(b for b in blocks if b != AFTER)
    return tuple(numbers) + ((AFTER,) if AFTER in blocks else ())


def apply_lka(x, form, name):
    """One LargeKernelAttention block with a fixed layer name."""
    from cxrkeras.models.lka import LargeKernelAttention

    return LargeKernelAttention(form=form, name=name)(x)
