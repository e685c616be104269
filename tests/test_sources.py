"""Input tables: NIH CSV quirks, generic CSV, label lists, bad CSVs, and image decoding (8/16-bit, RGBA, broken)."""

import os

import numpy as np
import pytest
from PIL import Image

from cxrkeras.data import images as imglib
from cxrkeras.data import image_index, sources
from cxrkeras.errors import ConfigError, DataError
from cxrkeras.labels import NIH_LABELS

HEADER_2017 = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
               "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],")
HEADER_V2020 = HEADER_2017[:-1]
ROWS = ["00000001_000.png,Cardiomegaly,0,1,58,M,PA,2682,2749,0.143,0.143",
        "00000001_001.png,Cardiomegaly|Emphysema,1,1,058Y,M,PA,2894,2729,0.143,0.143",
        "00000002_000.png,No Finding,0,2,81,M,PA,2500,2048,0.171,0.171"]


def _write(tmp_path, name, lines):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_bundled_2017_csv_with_trailing_comma_header(sample64):
    table = sources.read_table(sample64[0])
    assert table.format == "nih" and len(table) == 268 and len(set(table.patient_id)) == 95
    assert table.columns[7:11] == ["OriginalImage Width", "OriginalImage Height",
                                   "OriginalImagePixelSpacing x", "OriginalImagePixelSpacing y"]
    i = table.image_id.index("00000001_001.png")
    assert [NIH_LABELS[j] for j in np.flatnonzero(table.y[i])] == ["Cardiomegaly", "Emphysema"]
    assert (table.follow_up[i], table.age[i], table.sex[i], table.view[i], table.rows[i]) == (1, 58, "M", "PA", 3)


@pytest.mark.parametrize("header", [HEADER_2017, HEADER_V2020,
                                    HEADER_V2020.replace("[Width,Height]", '["Width,Height"]')])
def test_2017_and_v2020_headers_read_the_same(tmp_path, header):
    header = header.replace('["Width,Height"]', '"OriginalImage[Width,Height]"').replace(
        "OriginalImage\"OriginalImage", "\"OriginalImage")
    table = sources.read_table(_write(tmp_path, "d.csv", [header] + ROWS))
    assert table.image_id == ["00000001_000.png", "00000001_001.png", "00000002_000.png"]
    assert table.patient_id == ["1", "1", "2"] and list(table.age) == [58, 58, 81]
    assert table.y.sum() == 3 and table.y[2].sum() == 0
    assert "OriginalImage Height" in table.columns and table.raw[0][8] == "2749"


def test_minimal_four_column_csv(sample512):
    table = sources.read_table(sample512[0])
    assert len(table) == 9 and list(table.follow_up[:1]) == [0] and list(table.age) == [-1] * 9
    assert table.sex == [""] * 9


def test_unknown_label_lists_names_and_lines(tmp_path):
    path = _write(tmp_path, "d.csv", [HEADER_V2020, ROWS[0], ROWS[1].replace("Emphysema", "Emphysemia"),
                                      ROWS[2].replace("No Finding", "Hernia|Pneumo")])
    with pytest.raises(DataError) as err:
        sources.read_table(path)
    msg = str(err.value)
    assert "'Emphysemia' (lines 3)" in msg and "'Pneumo' (lines 4)" in msg and "Finding Labels" in msg
    assert "--labels" in msg


def test_nih_label_subset_in_the_given_order_and_any_finding(sample64):
    csv_path = sample64[0]
    full = sources.read_table(csv_path)
    table = sources.read_table(csv_path, labels=("Effusion", "Cardiomegaly"))
    assert table.labels == ("Effusion", "Cardiomegaly") and len(table) == len(full) == 268
    want = full.y[:, [NIH_LABELS.index("Effusion"), NIH_LABELS.index("Cardiomegaly")]]
    assert (table.y == want).all() and want.sum() > 0 and table.image_id == full.image_id
    # every NIH row is read: labels outside the subset are known, not "unknown"
    finding = sources.read_table(csv_path, labels=("Finding",))
    texts = [r[1] for r in full.raw]
    assert finding.labels == ("Finding",) and finding.y.shape == (268, 1)
    assert [int(v) for v in finding.y[:, 0]] == [int(t != "No Finding") for t in texts]
    assert 0 < finding.y.sum() < 268
    assert sources.read_table(csv_path, labels=("Infiltrate",)).labels == ("Infiltration",)


def test_nih_label_subset_errors(tmp_path, sample64):
    with pytest.raises(ConfigError, match=r"'Efusion'.*not a label of the NIH CSV.*Hernia.*'Finding': 1 for an image"):
        sources.read_table(sample64[0], labels=("Effusion", "Efusion"))
    with pytest.raises(ConfigError, match="given twice"):
        sources.read_table(sample64[0], labels=("Infiltrate", "Infiltration"))
    path = _write(tmp_path, "d.csv", [HEADER_V2020, ROWS[0].replace("Cardiomegaly", "Cardiomegalia")])
    with pytest.raises(DataError, match="'Cardiomegalia' \\(lines 2\\)"):  # unknown in the CSV: still an error
        sources.read_table(path, labels=("Effusion",))


def test_infiltrate_alias_is_accepted(tmp_path):
    path = _write(tmp_path, "d.csv", [HEADER_V2020, ROWS[0].replace("Cardiomegaly", "Infiltrate")])
    assert sources.read_table(path).y[0, NIH_LABELS.index("Infiltration")] == 1


def test_duplicate_image_index_is_an_error(tmp_path):
    path = _write(tmp_path, "d.csv", [HEADER_V2020] + ROWS + [ROWS[1]])
    with pytest.raises(DataError, match=r"duplicate 'Image Index': '00000001_001.png' \(lines 3 and 5\)"):
        sources.read_table(path)


def test_missing_required_column_is_named(tmp_path):
    header = HEADER_V2020.replace("Patient ID", "PatientID")
    with pytest.raises(DataError, match="'Patient ID' missing"):
        sources.read_table(_write(tmp_path, "d.csv", [header] + ROWS), fmt="nih")


def test_empty_labels_and_patient_fields_are_errors(tmp_path):
    with pytest.raises(DataError, match="'Finding Labels' is empty on lines 2"):
        sources.read_table(_write(tmp_path, "a.csv", [HEADER_V2020, ROWS[0].replace("Cardiomegaly", "")]))
    with pytest.raises(DataError, match="'Patient ID' is empty on lines 3"):
        sources.read_table(_write(tmp_path, "b.csv", [HEADER_V2020, ROWS[0], ROWS[1].replace(",1,058Y", ",,058Y")]))


def test_too_many_fields_names_the_line(tmp_path):
    with pytest.raises(DataError, match="line 3: 13 fields"):
        sources.read_table(_write(tmp_path, "d.csv", [HEADER_V2020, ROWS[0], ROWS[1] + ",x,y"]))


def test_short_rows_name_the_line_and_the_field_counts(tmp_path):
    """Issue 11 row 10: a 2-field row was padded and reported as "column 'Patient ID' is empty on lines 31"."""
    lines = [HEADER_2017] + [f"{i:08d}_000.png" + ROWS[i % 3][ROWS[i % 3].index(","):] for i in range(29)]
    sources.read_table(_write(tmp_path, "ok.csv", lines))  # 29 good rows
    lines.insert(30, "00000099_000.png,Effusion")  # CSV line 31
    with pytest.raises(DataError, match=r"line 31 has 2 fields, 11 expected \(Image Index, Finding Labels"):
        sources.read_table(_write(tmp_path, "short.csv", lines))
    lines += ["00000098_000.png,Effusion,0", "00000097_000.png"]
    with pytest.raises(DataError, match="line 31 has 2 fields; line 32 has 3 fields; line 33 has 1 field, 11 expected"):
        sources.read_table(_write(tmp_path, "short.csv", lines))
    latin = tmp_path / "latin.csv"
    latin.write_bytes((HEADER_V2020 + "\n" + ROWS[0]).encode() + b",\xff\xfe\n")
    with pytest.raises(DataError, match=r"not a UTF-8 text CSV \(invalid byte at offset \d+\)") as info:
        sources.read_table(str(latin))
    assert "0xff" not in str(info.value)  # no input byte in the message


def test_unreadable_ages_are_recorded(tmp_path):
    rows = [ROWS[0], ROWS[1].replace("058Y", "abc"), ROWS[2].replace(",81,", ",003M,")]
    table = sources.read_table(_write(tmp_path, "ages.csv", [HEADER_V2020] + rows))
    assert table.age.tolist() == [58, -1, 0] and table.unreadable == {"Patient Age": [3]}


def test_generic_csv_with_label_list_file(tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("# binary task\nPneumothorax\n")
    path = _write(tmp_path, "g.csv", ["file,finding,subject", "a/1.png,Pneumothorax,p1", "a/2.png,,p1",
                                      "b/3.png,No Finding,p2"])
    table = sources.read_table(path, "auto", sources.read_label_list(str(labels)), "file", "finding", "subject")
    assert table.format == "generic" and table.labels == ("Pneumothorax",)
    assert table.y[:, 0].tolist() == [1, 0, 0] and table.patient_id == ["p1", "p1", "p2"]
    with pytest.raises(ConfigError, match="needs the label list"):
        sources.read_table(path, "generic", None, "file", "finding", "subject")
    with pytest.raises(DataError, match="'patient' missing"):
        sources.read_table(path, "generic", ("Pneumothorax",), "file", "finding", "patient")
    assert sources.read_label_list("A, B") == ("A", "B")
    with pytest.raises(ConfigError, match="repeats"):
        sources.read_label_list("A,A")


def test_image_index_searches_recursively_and_finds_unlabelled(tmp_path):
    for rel in ("images_001/images/x.png", "images_002/images/y.png", "notes.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    index = image_index.ImageIndex(str(tmp_path), by_name=True)
    assert index.resolve("y.png").endswith("images_002/images/y.png") and index.resolve("z.png") is None
    assert [os.path.basename(p) for p in index.unlabelled([index.resolve("x.png")])] == ["y.png"]
    with pytest.raises(DataError, match="not found"):
        image_index.ImageIndex(str(tmp_path / "nope"), by_name=True)


def test_decode_rgba_16bit_and_palette(tmp_path, sample512):
    rgba = [f for f in sorted(os.listdir(sample512[1])) if Image.open(os.path.join(sample512[1], f)).mode == "RGBA"]
    assert len(rgba) == 3
    path = os.path.join(sample512[1], rgba[0])
    gray = imglib.read_image(path, 1)
    assert gray.shape == (512, 512) and gray.dtype == np.uint8
    rgb = np.asarray(Image.open(path))[..., :3].astype(float)
    assert abs(gray.mean() - rgb.mean()) < 2.0 and gray.std() > 10
    ramp = (np.arange(64 * 64).reshape(64, 64) % 4096).astype(np.uint16) + 100  # 12-bit data in 16 bits
    Image.fromarray(ramp).save(tmp_path / "d16.png")
    assert Image.open(tmp_path / "d16.png").mode.startswith("I")
    out = imglib.read_image(str(tmp_path / "d16.png"), 1)
    assert out.min() == 0 and out.max() == 255 and out[1, 0] > out[0, 0]
    png, h, w, c = imglib.load_encoded(str(tmp_path / "d16.png"), (32, 32), 3)
    assert (h, w, c) == (32, 32, 3) and Image.open(__import__("io").BytesIO(png)).mode == "RGB"


def test_broken_files_have_precise_reasons(tmp_path, sample64):
    good = os.path.join(sample64[1], "00000001_000.png")
    data = open(good, "rb").read()
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.png").write_text("this is not an image\n")
    cases = {"empty.png": "empty file (0 bytes)", "trunc.png": "truncated or corrupt PNG",
             "text.png": "not an image file", "missing.png": "file not found"}
    for name, reason in cases.items():
        with pytest.raises(imglib.ImageError) as err:
            imglib.read_image(str(tmp_path / name))
        assert err.value.reason.startswith(reason), (name, err.value.reason)
