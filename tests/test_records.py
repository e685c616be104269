"""build_records on the real sample: content, inspect, idempotent re-run, resume after interruption, parallel = serial."""

import csv
import json
import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from cxrkeras.cli import cli
from cxrkeras.data import features
from cxrkeras.data import manifest as mf
from cxrkeras.data import records as rec
from cxrkeras.data import shards, workers
from cxrkeras.data.inspect import inspect_records
from cxrkeras.errors import DataError
from cxrkeras.labels import NIH_LABELS
from records_helpers import decode, images_by_patient, read_records, small_nih


def _mtimes(folder):
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            out[os.path.join(root, f)] = os.stat(os.path.join(root, f)).st_mtime_ns
    return out


def test_tiny_records_match_the_csv(tiny_records, sample64):
    m = json.load(open(os.path.join(tiny_records, "manifest.json")))
    assert m["labels"] == list(NIH_LABELS) and m["image_size"] == [64, 64] and m["channels"] == 1
    assert m["patient_overlap"] == {"pairs": {"train/val": 0, "train/test": 0, "val/test": 0}, "ok": True}
    # the folder holds all 1,418 bundled images; the tests' CSV names 268 of them
    assert m["skipped"] == [] and m["unlabelled_images"] == 1418 - 268 and m["dry_run"] is False
    assert len(m["splits"]["train"]["shards"]) >= 2 and m["csv"]["rows"] == 268
    assert sum(s["images"] for s in m["splits"].values()) == 268
    records = read_records(tiny_records)
    ids = [r[features.IMAGE_ID].decode() for r in records]
    assert len(ids) == len(set(ids)) == 268
    with open(sample64[0], newline="") as f:
        rows = {r[0]: r for r in list(csv.reader(f))[1:]}
    assert set(ids) == set(rows)
    by_patient = {}
    for r in records:
        row = rows[r[features.IMAGE_ID].decode()]
        assert [NIH_LABELS[j] for j in np.flatnonzero(r[features.LABELS])] == \
            [lbl for lbl in NIH_LABELS if lbl in row[1].split("|")]
        assert (r[features.PATIENT_ID].decode(), int(r[features.FOLLOW_UP]), int(r[features.AGE]),
                r[features.SEX].decode(), r[features.VIEW].decode(), r[features.SPLIT].decode()) == \
            (row[3], int(row[2]), int(row[4]), row[5], row[6], r["_split"])
        by_patient.setdefault(row[3], set()).add(r["_split"])
    assert all(len(s) == 1 for s in by_patient.values())
    img = decode(records[0])
    assert img.shape == (64, 64) and img.dtype == np.uint8 and img.std() > 5
    for split in ("train", "val", "test"):  # stratified: with 268 images every split has many labels
        assert sum(v > 0 for v in m["splits"][split]["positives"].values()) >= 8
    result = inspect_records(tiny_records)
    assert result.problems == [] and result.records == 268
    index = list(csv.DictReader(open(os.path.join(tiny_records, mf.INDEX_NAME))))
    assert len(index) == 268 and index[0]["OriginalImagePixelSpacing x"]


def test_rerun_writes_nothing_and_resume_after_interruption(tmp_path, sample64, monkeypatch):
    csv_path, images, rows = small_nih(tmp_path, sample64, n=40)
    out = str(tmp_path / "out")
    kw = dict(image_size=32, shard_size=5, workers=1, progress=False)
    real_task, calls = shards._encode_task, []

    def interrupted(task):
        calls.append(task)
        if len(calls) == 13:  # in the middle of the third shard
            raise KeyboardInterrupt
        return real_task(task)

    monkeypatch.setattr(shards, "_encode_task", interrupted)
    with pytest.raises(KeyboardInterrupt):
        rec.build_records(csv_path, images, out, **kw)
    monkeypatch.setattr(shards, "_encode_task", real_task)
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    assert len([f for f in os.listdir(out) if f.endswith(".tfrecord")]) == 2
    assert not [f for f in os.listdir(out) if ".tmp-" in f]
    (tmp_path / "out" / "val-00000-of-00001.tfrecord.tmp-999").write_bytes(b"half a shard")  # a killed run's leftover

    first = rec.build_records(csv_path, images, out, **kw)
    total_shards = sum(len(s["shards"]) for s in first.manifest["splits"].values())
    assert first.shards_kept == 2 and first.shards_written == total_shards - 2
    assert not [f for f in os.listdir(out) if ".tmp-" in f]
    result = inspect_records(out)
    assert result.problems == [] and result.records == 40

    before = _mtimes(out)
    again = rec.build_records(csv_path, images, out, **kw)
    assert (again.shards_written, again.shards_kept, again.manifest_written) == (0, total_shards, False)
    assert _mtimes(out) == before

    os.remove(os.path.join(out, first.manifest["splits"]["test"]["shards"][0]["file"]))
    damaged = os.path.join(out, first.manifest["splits"]["train"]["shards"][1]["file"])
    data = bytearray(open(damaged, "rb").read())
    data[len(data) // 2] ^= 0xFF  # same size, different bytes
    open(damaged, "wb").write(bytes(data))
    fixed = rec.build_records(csv_path, images, out, **kw)
    assert (fixed.shards_written, fixed.manifest_written) == (2, True)
    assert fixed.manifest["splits"] == first.manifest["splits"]  # same bytes again: deterministic shards

    before = _mtimes(out)
    for change in ({"shard_size": 100}, {"image_size": 48}, {"seed": 1}, {"channels": 3}):
        with pytest.raises(DataError, match=f"other options \\({list(change)[0]} .* -> .*--overwrite"):
            rec.build_records(csv_path, images, out, **dict(kw, **change))  # the old records are not replaced
    assert _mtimes(out) == before
    resized = rec.build_records(csv_path, images, out, **dict(kw, shard_size=100), overwrite=True)
    assert resized.shards_written == 3 and sorted(f for f in os.listdir(out) if f.endswith(".tfrecord")) == \
        ["test-00000-of-00001.tfrecord", "train-00000-of-00001.tfrecord", "val-00000-of-00001.tfrecord"]
    assert inspect_records(out).problems == []


def test_parallel_build_equals_serial(tmp_path, sample64, monkeypatch):
    monkeypatch.setattr(shards, "MIN_TASKS_PER_WORKER", 1)  # use the process pool even for 30 images
    contexts, get_context = [], workers.multiprocessing.get_context
    monkeypatch.setattr(workers.multiprocessing, "get_context",
                        lambda method: contexts.append(method) or get_context(method))
    csv_path, images, _ = small_nih(tmp_path, sample64, n=30)
    serial = rec.build_records(csv_path, images, str(tmp_path / "s"), image_size=48, shard_size=6, workers=1,
                               progress=False)
    parallel = rec.build_records(csv_path, images, str(tmp_path / "p"), image_size=48, shard_size=6, workers=2,
                                 progress=False)
    assert contexts == ["spawn"] and parallel.manifest["splits"] == serial.manifest["splits"]


def test_inspect_detects_tampering(tiny_records, tmp_path):
    copy = str(tmp_path / "copy")
    shutil.copytree(tiny_records, copy)
    m = json.load(open(os.path.join(copy, "manifest.json")))
    train = m["splits"]["train"]["shards"]
    os.remove(os.path.join(copy, train[0]["file"]))
    shutil.copy(os.path.join(copy, train[1]["file"]), os.path.join(copy, train[0]["file"]))  # duplicates, wrong hash
    problems = inspect_records(copy).problems
    assert any("sha256" in p and train[0]["file"] in p for p in problems)
    assert any("stored twice" in p for p in problems)
    res = CliRunner().invoke(cli, ["inspect-records", copy])
    assert res.exit_code == 1 and "MISMATCH" in res.output and "Traceback" not in res.output
    ok = CliRunner().invoke(cli, ["inspect-records", tiny_records])
    assert ok.exit_code == 0 and "OK: " in ok.output and "Hernia" in ok.output


def test_cli_build_with_three_split_lists_and_errors(tmp_path, sample64):
    csv_path, images, rows = small_nih(tmp_path, sample64, n=40)
    by_patient = images_by_patient(rows)
    patients = sorted(by_patient)
    parts = [patients[: len(patients) - 4], patients[-4:-2], patients[-2:]]
    lists = []
    for name, group in zip(("train", "val", "test"), parts):
        (tmp_path / f"{name}.txt").write_text("\n".join(i for p in group for i in by_patient[p]) + "\n")
        lists.append(str(tmp_path / f"{name}.txt"))
    out = str(tmp_path / "out")
    res = CliRunner().invoke(cli, ["build-records", "--csv", csv_path, "--images", images, "--out", out,
                                   "--split-lists", *lists, "--image-size", "32", "--workers", "1", "--no-progress"])
    assert res.exit_code == 0, res.output
    m = json.load(open(os.path.join(out, "manifest.json")))
    assert m["split_method"] == "lists" and m["splits"]["test"]["patients"] == 2
    assert m["splits"]["val"]["images"] == sum(len(by_patient[p]) for p in parts[1])
    assert "0 shard(s) written" not in res.output and "shared patients: train/val 0" in res.output
    res = CliRunner().invoke(cli, ["build-records", "--csv", str(tmp_path / "nope.csv"), "--dry-run"])
    assert res.exit_code == 1 and "nope.csv" in res.output and "Traceback" not in res.output
