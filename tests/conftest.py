"""Shared test fixtures: paths of the bundled real sample and a tiny records folder built from it."""

import csv
import hashlib
import io
import json
import os

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SAMPLE_DIR = os.path.join(os.path.dirname(__file__), os.pardir, "cxrkeras", "sample_data")
SAMPLE_64 = os.path.abspath(os.path.join(SAMPLE_DIR, "nih-64px"))
SAMPLE_512 = os.path.abspath(os.path.join(SAMPLE_DIR, "nih-512px"))
SAMPLE_BBOX = os.path.abspath(os.path.join(SAMPLE_DIR, "BBox_List_2017.csv"))


@pytest.fixture(scope="session")
def sample64():
    """(csv path, images dir) of the bundled 64 px NIH sample (268 images, 95 patients)."""
    return os.path.join(SAMPLE_64, "Data_Entry_2017.csv"), os.path.join(SAMPLE_64, "images")


@pytest.fixture(scope="session")
def sample512():
    return os.path.join(SAMPLE_512, "Data_Entry_2017.csv"), os.path.join(SAMPLE_512, "images")


def _write_tiny_records(out_dir, image_size=64, shard_size=40):
    """Records of the 64 px sample, split by patient (provisional: replaced by build_records once it lands)."""
    import tensorflow as tf
    from PIL import Image

    from cxrkeras.data import features
    from cxrkeras.labels import NIH_LABELS, NO_FINDING

    csv_path, images = os.path.join(SAMPLE_64, "Data_Entry_2017.csv"), os.path.join(SAMPLE_64, "images")
    with open(csv_path, newline="") as f:
        rows = list(csv.reader(f))[1:]
    by_split = {"train": [], "val": [], "test": []}
    for row in rows:
        bucket = int(hashlib.sha256(row[3].encode()).hexdigest(), 16) % 10
        split = "train" if bucket < 7 else "val" if bucket < 8 else "test"
        by_split[split].append(row)
    manifest = {"tool_version": "test", "labels": list(NIH_LABELS), "image_size": [image_size, image_size],
                "channels": 1, "dry_run": False, "splits": {}, "skipped": []}
    for split, srows in by_split.items():
        shards, n = [], max(1, -(-len(srows) // shard_size))
        for i in range(n):
            name = f"{split}-{i:05d}-of-{n:05d}.tfrecord"
            with tf.io.TFRecordWriter(os.path.join(out_dir, name)) as w:
                chunk = srows[i * shard_size:(i + 1) * shard_size]
                for row in chunk:
                    img = Image.open(os.path.join(images, row[0])).convert("L").resize((image_size, image_size))
                    buf = io.BytesIO()
                    img.save(buf, format="PNG")
                    names = row[1].split("|")
                    y = [int(lbl in names) for lbl in NIH_LABELS]
                    ex = features.make_example(buf.getvalue(), image_size, image_size, 1, y, row[0], row[3],
                                               follow_up=int(row[2]), age=int(row[4]), sex=row[5], view=row[6],
                                               split=split)
                    w.write(ex.SerializeToString())
            shards.append({"file": name, "records": len(chunk), "sha256": ""})
        pos = {lbl: sum(lbl in r[1].split("|") for r in srows) for lbl in NIH_LABELS}
        manifest["splits"][split] = {"images": len(srows), "patients": len({r[3] for r in srows}),
                                     "no_finding": sum(r[1] == NO_FINDING for r in srows), "positives": pos,
                                     "shards": shards}
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    return out_dir


@pytest.fixture(scope="session")
def tiny_records(tmp_path_factory):
    """A records folder (64 px, 1 channel, train/val/test) built once per test session from the real sample."""
    return _write_tiny_records(str(tmp_path_factory.mktemp("records")))


@pytest.fixture
def rng():
    return np.random.default_rng(0)
