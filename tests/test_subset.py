"""Class-targeted subsets (`build-records --subset`): targets hit on NIH's 112,120-row table (a dry run), whole
patients, rarest labels first, all images of a rare label, seeded; recorded in the manifest; checked with pandas."""

import json
import os

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from cxrkeras.cli import cli
from cxrkeras.data import sources, split
from cxrkeras.data.subset import parse_subset, select_subset
from cxrkeras.errors import ConfigError
from cxrkeras.labels import NIH_LABELS, NO_FINDING

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL_LABELS = os.path.join(REPO, os.pardir, "shared", "data", "nih-labels", "all_labels.csv")
TARGETS = "per-label=2000,no-finding=10000"


def _frame(csv_path):
    """The table as pandas reads it: one row per image, the label columns, whether it is 'No Finding'."""
    df = pd.read_csv(csv_path, index_col=False, usecols=["Image Index", "Finding Labels", "Patient ID"])
    for label in NIH_LABELS:
        df[label] = df["Finding Labels"].str.split("|").apply(lambda names, l=label: l in names)
    df[NO_FINDING] = df["Finding Labels"] == NO_FINDING
    return df


@pytest.mark.skipif(not os.path.isfile(ALL_LABELS), reason="needs ../shared/data/nih-labels beside the repository")
def test_dry_run_on_the_whole_nih_table_hits_the_targets(tmp_path):
    out = str(tmp_path / "subset")
    res = CliRunner().invoke(cli, ["build-records", "--csv", ALL_LABELS, "--dry-run", "--out", out, "--subset",
                                   TARGETS])
    assert res.exit_code == 0, res.output
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    subset = manifest["subset"]
    df = _frame(ALL_LABELS)
    assert subset["of"] == {"images": 112120, "patients": 30805} and manifest["options"]["subset"] == TARGETS
    for label in list(NIH_LABELS) + [NO_FINDING]:
        target = 10000 if label == NO_FINDING else 2000
        available = int(df[label].sum())
        assert subset["targets"][label] == target and subset["available"][label] == available
        assert subset["reached"][label] >= min(target, available), label  # hit, or all there is
        if available <= target:
            assert subset["reached"][label] == available and label in subset["all_taken"]
    assert subset["short"] == [] and sorted(subset["all_taken"]) == ["Fibrosis", "Hernia", "Pneumonia"]
    rarest = df[list(NIH_LABELS)].sum().sort_values(kind="stable").index.tolist()
    assert subset["order"] == rarest
    assert manifest["patient_overlap"] == {"pairs": {"train/val": 0, "train/test": 0, "val/test": 0}, "ok": True}
    assert sum(s["images"] for s in manifest["splits"].values()) == subset["images"] < 112120
    assert "subset per-label=2000,no-finding=10000 (seed 0)" in res.output and "(all taken)" in res.output


@pytest.mark.skipif(not os.path.isfile(ALL_LABELS), reason="needs ../shared/data/nih-labels beside the repository")
def test_subset_takes_whole_patients_and_is_seeded():
    table = sources.read_table(ALL_LABELS)
    mask, report = select_subset(table, parse_subset(TARGETS, table.labels), seed=0)
    df = _frame(ALL_LABELS).assign(taken=mask)
    per_patient = df.groupby("Patient ID")["taken"].agg(["min", "max"])
    assert (per_patient["min"] == per_patient["max"]).all()  # every patient wholly in or wholly out
    taken = df[df["taken"]]
    assert report["patients"] == taken["Patient ID"].nunique() and report["images"] == len(taken)
    for label in list(NIH_LABELS) + [NO_FINDING]:
        assert report["reached"][label] == int(taken[label].sum())  # what pandas counts
    # the split of the subset: patient-wise (pandas: one split per patient)
    sub = table.select(mask)
    assign = split.stratify_patients(sub.patient_id, sub.y, (0.7, 0.1, 0.2), seed=0)
    assert pd.DataFrame({"p": sub.patient_id, "s": assign}).groupby("p")["s"].nunique().max() == 1
    again, _ = select_subset(table, parse_subset(TARGETS, table.labels), seed=0)
    other, _ = select_subset(table, parse_subset(TARGETS, table.labels), seed=1)
    assert np.array_equal(mask, again) and not np.array_equal(mask, other)


def _table(rows):
    """A sources.Table of (patient, labels) rows with labels A (rare), B (common)."""
    labels = ("A", "B")
    y = np.array([[int(name in ls) for name in labels] for _, ls in rows], dtype=np.uint8)
    n = len(rows)
    return sources.Table("t.csv", "generic", labels, [f"i{i}" for i in range(n)], [f"i{i}" for i in range(n)],
                         [p for p, _ in rows], y, np.arange(2, n + 2), np.full(n, -1), np.full(n, -1), [""] * n,
                         [""] * n)


def test_rarest_first_all_of_a_rare_label_and_pure_no_finding_patients_first():
    rows = [("p1", "A"), ("p1", "B"), ("p2", "A"), ("p3", "B"), ("p3", ""), ("p4", ""), ("p4", ""), ("p5", "B"),
            ("p6", "B"), ("p7", ""), ("p8", "B")]
    table = _table(rows)
    patients = sorted(set(table.patient_id))
    for seed in range(8):
        mask, report = select_subset(table, parse_subset("per-label=3", table.labels), seed=seed)
        picked = {table.patient_id[i] for i in np.flatnonzero(mask)}
        for p in patients:  # whole patients
            assert len({bool(mask[i]) for i in range(len(rows)) if table.patient_id[i] == p}) == 1
        # A first (rarer): it has 2 images < 3, so both A patients; then 2 of the 4 one-B patients (p1 has one B)
        assert report["order"] == ["A", "B"] and {"p1", "p2"} <= picked and report["all_taken"] == ["A"]
        assert report["reached"] == {"A": 2, "B": 3, NO_FINDING: int("p3" in picked)}
        assert len(picked & {"p3", "p5", "p6", "p8"}) == 2 and not picked & {"p4", "p7"}
        # 'No Finding' only: patients whose images all have no finding (p4, p7) before p3 (B and no finding)
        mask, report = select_subset(table, parse_subset("no-finding=2", table.labels), seed=seed)
        picked = {table.patient_id[i] for i in np.flatnonzero(mask)}
        assert picked and picked <= {"p4", "p7"} and report["reached"][NO_FINDING] >= 2
    mask, report = select_subset(table, parse_subset("per-label=0,A=1", table.labels), seed=0)
    assert report["targets"]["A"] == 1 and report["targets"]["B"] == 0 and report["reached"]["A"] == 1
    assert {table.patient_id[i] for i in np.flatnonzero(mask)} in ({"p1"}, {"p2"})


@pytest.mark.parametrize("spec, message", [
    ("", "is empty"), ("per-label", "write KEY=N"), ("per-label=-1", "whole number from 0"),
    ("per-label=2.5", "KEY=N"), ("Lung=3", "unknown key 'Lung'"), ("per-label=99999999999", "10,000,000"),
])
def test_bad_subset_specs(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_subset(spec, NIH_LABELS)


def test_subset_records_build_resume_and_refusal(sample64, tmp_path):
    """A real build of a subset of the 64 px sample: index.csv holds exactly the subset, a re-run changes
    nothing, another subset into the same folder is refused naming --subset."""
    from cxrkeras.data.records import build_records
    from cxrkeras.errors import DataError

    csv_path, images = sample64
    out = str(tmp_path / "sub")
    spec = "per-label=5,no-finding=20"
    report = build_records(csv_path, images, out, image_size=16, shard_size=50, workers=1, progress=False,
                           subset=spec)
    subset = report.manifest["subset"]
    index = pd.read_csv(os.path.join(out, "index.csv"), index_col=False)
    assert len(index) == subset["images"] < 268 and report.manifest["whole"]["images"] == subset["images"]
    assert subset["reached"][NO_FINDING] == int((index["Finding Labels"] == NO_FINDING).sum()) >= 20
    assert index.groupby("patient_id")["split"].nunique().max() == 1
    again = build_records(csv_path, images, out, image_size=16, shard_size=50, workers=1, progress=False,
                          subset=spec)
    assert again.shards_written == 0 and not again.manifest_written
    with pytest.raises(DataError, match="--subset 'per-label=5,no-finding=20' -> 'per-label=6'"):
        build_records(csv_path, images, out, image_size=16, shard_size=50, workers=1, progress=False,
                      subset="per-label=6")
