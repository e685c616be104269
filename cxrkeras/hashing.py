"""File fingerprints (sha256) used by manifests, shard receipts, run folders and exports."""

import hashlib


def sha256_file(path, chunk=1 << 20):
    """Hex sha256 of a file's bytes, read in chunks (shards and models can be large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()
