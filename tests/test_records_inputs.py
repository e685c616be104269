"""build_records input kinds (NIH 512 px with RGBA, generic binary CSV, DICOM, official lists, dry run) and bad inputs."""

import json
import os
import shutil

import pytest

from cxrkeras.data import features
from cxrkeras.data import records as rec
from cxrkeras.data.inspect import inspect_records
from cxrkeras.errors import DataError
from records_helpers import decode, make_dicom, ramp12, read_records, small_nih

QUIET = dict(workers=1, progress=False)


def test_nih_512_sample_with_rgba_files(tmp_path, sample512):
    out = str(tmp_path / "r512")
    report = rec.build_records(*sample512, out, image_size=64, shard_size=4, **QUIET)
    m = report.manifest
    assert m["skipped"] == [] and sum(s["images"] for s in m["splits"].values()) == 9
    records = read_records(out)
    assert len(records) == 9
    for r in records:
        img = decode(r)
        assert img.shape == (64, 64) and int(r[features.IMAGE_CHANNELS]) == 1 and img.std() > 5
        assert int(r[features.AGE]) == -1 and r[features.SEX] == b""  # minimal CSV: unknown, not invented
    assert inspect_records(out).problems == []


def test_bundled_64px_copies_of_512px_images_are_what_build_records_stores(tmp_path, sample512, sample64):
    """tools/make_sample_data.py brought the 512 px images to 64 px with build-records' own resize: records built
    from the 512 px files hold exactly the bundled 64 px files' pixels (00000100_000 is NIH's own 64 px copy)."""
    import numpy as np
    from PIL import Image

    out = str(tmp_path / "r64")
    rec.build_records(*sample512, out, image_size=64, shard_size=4, **QUIET)
    compared = 0
    for r in read_records(out):
        name = r[features.IMAGE_ID].decode()
        bundled = np.asarray(Image.open(os.path.join(sample64[1], name)))
        if name != "00000100_000.png":
            assert np.array_equal(decode(r), bundled), name
            compared += 1
    assert compared == 8


def test_bad_files_are_skipped_and_listed_or_fatal_with_strict(tmp_path, sample64):
    csv_path, images, rows = small_nih(tmp_path, sample64, n=24)
    img_dir = os.path.join(images, "images_001", "images")
    names = [r.split(",")[0] for r in rows]
    data = open(os.path.join(img_dir, names[1]), "rb").read()
    open(os.path.join(img_dir, names[0]), "wb").close()
    open(os.path.join(img_dir, names[1]), "wb").write(data[: len(data) // 2])
    open(os.path.join(img_dir, names[2]), "w").write("<html>not an image</html>")
    os.remove(os.path.join(img_dir, names[3]))
    shutil.copy(os.path.join(img_dir, names[5]), os.path.join(img_dir, "99999999_000.png"))  # no CSV row

    out = str(tmp_path / "out")
    m = rec.build_records(csv_path, images, out, image_size=32, shard_size=8, **QUIET).manifest
    reasons = {s["image"]: (s["row"], s["reason"]) for s in m["skipped"]}
    assert reasons[names[0]] == (2, "empty file (0 bytes)")
    assert reasons[names[1]][1].startswith("truncated or corrupt PNG file")
    assert reasons[names[2]][1].startswith("not an image file")
    assert reasons[names[3]] == (5, "file not found")
    assert len(reasons) == 4 and m["unlabelled_images"] == 1 and m["unlabelled_examples"] == [
        "images_001/images/99999999_000.png"]
    assert sum(s["images"] for s in m["splits"].values()) == 20 == len(read_records(out))
    assert inspect_records(out).problems == []

    with pytest.raises(DataError, match=rf"1 image file\(s\).*{names[3]} \(line 5: file not found\).*--strict"):
        rec.build_records(csv_path, images, str(tmp_path / "strict"), strict=True, **QUIET)
    shutil.copy(os.path.join(img_dir, names[5]), os.path.join(img_dir, names[3]))
    with pytest.raises(DataError, match=r"(empty file|truncated|not an image).*without --strict"):
        rec.build_records(csv_path, images, str(tmp_path / "strict"), strict=True, **QUIET)
    assert not [f for f in os.listdir(tmp_path / "strict") if ".tmp-" in f]


def test_csv_errors_and_folder_errors(tmp_path, sample64):
    csv_path, images, rows = small_nih(tmp_path, sample64, n=12)
    header = open(csv_path).read().splitlines()[0]
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join([header, rows[0].replace("Cardiomegaly", "Cardiomegalia")] + rows[1:]) + "\n")
    with pytest.raises(DataError, match="unknown label name.*'Cardiomegalia' \\(lines 2\\)"):
        rec.build_records(str(bad), images, str(tmp_path / "o1"), **QUIET)
    bad.write_text("\n".join([header] + rows + rows[:1]) + "\n")
    with pytest.raises(DataError, match="duplicate 'Image Index'"):
        rec.build_records(str(bad), images, str(tmp_path / "o2"), **QUIET)
    bad.write_text("\n".join([header.replace("Finding Labels", "Findings")] + rows) + "\n")
    with pytest.raises(DataError, match="'Finding Labels'"):
        rec.build_records(str(bad), images, str(tmp_path / "o3"), format="nih", **QUIET)
    (tmp_path / "list_a.txt").write_text("nothing_here.png\n")
    (tmp_path / "list_b.txt").write_text("nor_here.png\n")
    with pytest.raises(DataError, match="empty selection"):
        rec.build_records(csv_path, images, str(tmp_path / "o4"),
                          split_lists=[str(tmp_path / "list_a.txt"), str(tmp_path / "list_b.txt")], **QUIET)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(DataError, match="not writable"):
        rec.build_records(csv_path, images, str(tmp_path / "a_file" / "out"), **QUIET)
    with pytest.raises(DataError, match="images folder"):
        rec.build_records(csv_path, str(tmp_path / "no_images"), str(tmp_path / "o5"), **QUIET)
    other = tmp_path / "other.csv"
    other.write_text("\n".join([header] + rows[:6]) + "\n")
    rec.build_records(csv_path, images, str(tmp_path / "o6"), image_size=32, **QUIET)
    with pytest.raises(DataError, match="another CSV"):
        rec.build_records(str(other), images, str(tmp_path / "o6"), **QUIET)
    with pytest.raises(DataError, match="dry run would replace"):
        rec.build_records(csv_path, images, str(tmp_path / "o6"), image_size=32, dry_run=True, **QUIET)


def test_generic_csv_binary_task(tmp_path, sample64):
    _, images, rows = small_nih(tmp_path, sample64, n=30)
    lines = ["file,finding,subject"]
    for i, r in enumerate(rows):
        f = r.split(",")
        lines.append(f"images_001/images/{f[0]},{'Pneumothorax' if i % 3 == 0 else ''},s{f[3]}")
    (tmp_path / "pneumo.csv").write_text("\n".join(lines) + "\n")
    out = str(tmp_path / "g")
    m = rec.build_records(str(tmp_path / "pneumo.csv"), images, out, labels="Pneumothorax", path_column="file",
                          labels_column="finding", patient_column="subject", image_size=32, **QUIET).manifest
    assert m["labels"] == ["Pneumothorax"] and m["csv"]["format"] == "generic"
    assert sum(s["positives"]["Pneumothorax"] for s in m["splits"].values()) == 10
    records = read_records(out)
    assert len(records) == 30 and all(r[features.LABELS].shape == (1,) for r in records)
    assert all(r[features.PATIENT_ID].decode().startswith("s") for r in records)
    assert inspect_records(out).problems == []


def test_nih_csv_with_a_label_subset_through_the_cli(tmp_path, sample64):
    """--labels Effusion,Cardiomegaly on the NIH CSV: those labels in that order; stage 1 reads the images with
    either of them (the manifest's no_finding counts the rows with neither) and the records say the same."""
    from click.testing import CliRunner

    from cxrkeras.cli import cli
    from cxrkeras.data.pipeline import build_dataset, count_images
    from cxrkeras.data.sources import read_table

    out = str(tmp_path / "ec")
    res = CliRunner().invoke(cli, ["build-records", "--csv", sample64[0], "--images", sample64[1], "--out", out,
                                   "--labels", "Effusion,Cardiomegaly", "--image-size", "32", "--workers", "1",
                                   "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "none of the labels" in res.output and "\nEffusion" in res.output and "Atelectasis" not in res.output
    m = json.load(open(os.path.join(out, "manifest.json")))
    assert m["labels"] == ["Effusion", "Cardiomegaly"] and m["options"]["labels"] == m["labels"]
    full = read_table(sample64[0])
    effusion, cardio = full.y[:, 2], full.y[:, 1]
    neither = int(((effusion == 0) & (cardio == 0)).sum())
    assert sum(s["no_finding"] for s in m["splits"].values()) == neither > sum(
        int(t[1] == "No Finding") for t in full.raw)  # more rows than NIH's "No Finding" ones
    assert sum(s["positives"]["Effusion"] for s in m["splits"].values()) == int(effusion.sum())
    records = {r[features.IMAGE_ID].decode(): r for r in read_records(out)}
    for name, e, c in zip(full.image_id, effusion, cardio):
        assert list(records[name][features.LABELS]) == [e, c]
    for split in ("train", "val", "test"):
        n = count_images(out, split, stage=1)
        got = sum(int(b[1].shape[0]) for b in build_dataset(out, split, stage=1, batch_size=16, image_size=32))
        assert got == n == m["splits"][split]["images"] - m["splits"][split]["no_finding"] > 0
    res = CliRunner().invoke(cli, ["build-records", "--csv", sample64[0], "--images", sample64[1], "--out",
                                   str(tmp_path / "bad"), "--labels", "Effusion,Pneumonitis", "--dry-run"])
    assert res.exit_code != 0 and "'Pneumonitis': not a label of the NIH CSV" in res.output


@pytest.mark.parametrize("patient_column", [False, True])
def test_dicom_build_keeps_no_identifying_tag(tmp_path, patient_column):
    root = tmp_path / "dcm"
    lines = ["path,labels" + (",patient" if patient_column else "")]
    for p in range(4):
        for k in range(2):
            rel = f"site{p % 2}/P{p}_{k}.dcm"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            photometric = "MONOCHROME1" if k else "MONOCHROME2"
            make_dicom(root / rel, ramp12(), photometric, window=(2048, 4096), patient_id=f"PAT-SECRET-{p}",
                       patient_name=f"Secret^Name{p}")
            lines.append(f"{rel},{'Effusion' if p % 2 else 'No Finding'}" + (f",case{p}" if patient_column else ""))
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    out = str(tmp_path / "out")
    m = rec.build_records(str(root / "labels.csv"), str(root), out, format="dicom", labels="Effusion,Edema",
                          patient_column="patient", image_size=32, shard_size=3, **QUIET).manifest
    assert m["skipped"] == [] and sum(s["patients"] for s in m["splits"].values()) == 4
    records = read_records(out)
    pids = {r[features.PATIENT_ID].decode() for r in records}
    assert len(pids) == 4 and all(p.startswith("case" if patient_column else "dcm-") for p in pids)
    for r in records:
        img = decode(r)
        mono1 = r[features.IMAGE_ID].decode().endswith("_1.dcm")
        assert img.shape == (32, 32) and (img[0, 0] > img[-1, -1]) == mono1  # MONOCHROME1 inverted
    blob = b"".join(open(os.path.join(out, f), "rb").read() for f in os.listdir(out) if not os.path.isdir(
        os.path.join(out, f)))
    for secret in (b"SECRET", b"Secret", b"19600101"):
        assert secret not in blob
    assert inspect_records(out).problems == []


def test_official_two_lists_and_dry_run(tmp_path, sample64):
    csv_path, images = sample64
    names = [line.split(",")[0] for line in open(csv_path).read().splitlines()[1:]]
    patients = sorted({n[:8] for n in names})
    test_patients = set(patients[::5])
    (tmp_path / "train_val_list.txt").write_text("\n".join(n for n in names if n[:8] not in test_patients) +
                                                 "\n99999999_000.png\n")
    (tmp_path / "test_list.txt").write_text("\n".join(n for n in names if n[:8] in test_patients) + "\n")
    out = str(tmp_path / "dry")
    report = rec.build_records(csv_path, None, out, dry_run=True, split_lists=[
        str(tmp_path / "train_val_list.txt"), str(tmp_path / "test_list.txt")], **QUIET)
    m = json.load(open(os.path.join(out, "manifest.json")))
    assert m["dry_run"] is True and m == json.loads(json.dumps(report.manifest))
    assert m["split_method"] == "lists+stratified-val" and m["split_lists"]["listed_images_without_csv_row"] == 1
    assert m["splits"]["test"]["patients"] == len(test_patients) and m["patient_overlap"]["ok"]
    assert m["splits"]["val"]["images"] > 0 and all(not s["shards"] for s in m["splits"].values())
    assert sum(s["images"] for s in m["splits"].values()) == 268
    assert [f for f in os.listdir(out) if not f.startswith(".")] == ["manifest.json"]
    assert inspect_records(out).problems == []
