"""File fingerprints (sha256) used by manifests, shard receipts, run folders and exports."""

import hashlib


def sha256_file(path, chunk=1 << 20):
    """Hex sha256 of a file's bytes, read in chunks (shards and models can be large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def images_fingerprint(image_ids, y_true):
    """Hex sha256 of a split's images and their labels, independent of their order: two evaluations with the same
    fingerprint scored the same images with the same ground truth (what a paired comparison needs)."""
    import numpy as np

    y = np.asarray(y_true)
    rows = sorted(f"{image_id}\t{''.join('1' if v > 0.5 else '0' for v in np.atleast_1d(labels))}"
                  for image_id, labels in zip(image_ids, y))
    return hashlib.sha256("\n".join(rows).encode("utf-8")).hexdigest()
