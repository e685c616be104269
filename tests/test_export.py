"""`export` (TF Serving SavedModel) and `predict`: fresh-process equality, input formats, bad bytes, versions."""

import json
import os

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from evalexport_helpers import huge_gif, jpeg_bytes, png_bytes, sample_gray, tiny_model, write_dicom


@pytest.fixture(scope="module")
def run_and_export(tiny_records, tmp_path_factory):
    """A run folder (stage2/best.keras + config + run_info), its evaluation, and its export (checked on write)."""
    from cxrkeras.evaluation.evaluate import evaluate
    from cxrkeras.export.savedmodel import export

    root = tmp_path_factory.mktemp("export")
    stage = root / "runs" / "tiny" / "stage2"
    stage.mkdir(parents=True)
    model = tiny_model()
    model.save(str(stage / "best.keras"))
    (stage / "config.yaml").write_text(yaml.safe_dump({"data": {"records": tiny_records, "image_size": 32,
                                                                "equalize": None}, "model": {"variant": "tiny"}}))
    (stage / "run_info.json").write_text(json.dumps({"records": tiny_records, "image_size": 32}))
    run = str(root / "runs" / "tiny")
    evaluation = evaluate(run, n_boot=20, figures_on=False, log=lambda *_: None)
    base = str(root / "exports" / "tiny")
    result = export(run, base, log=lambda *_: None)
    return {"run": run, "base": base, "result": result, "evaluation": evaluation, "model": model, "root": root,
            "records": tiny_records}


@pytest.fixture(scope="module")
def loaded(run_and_export):
    import tensorflow as tf

    return tf.saved_model.load(run_and_export["result"]["path"]).signatures["serving_default"]


def _record_probs(model, blobs, records, size=32):
    """The model on each file as evaluation sees it once build-records has stored it: PIL decoding and resizing
    to the records' size (cxrkeras.data.images, what the encoding workers run), then the eval transform."""
    from cxrkeras.data.images import read_image, resize
    from cxrkeras.data.manifest import load_manifest
    from cxrkeras.data.preprocess import preprocess_for_eval

    stored = tuple(load_manifest(records)["image_size"])
    stored_images = [resize(read_image("upload.png", channels=1, data=b), stored)[..., None] for b in blobs]
    x = np.stack([preprocess_for_eval(img.astype(np.float32), size, "torch").numpy() for img in stored_images])
    return np.asarray(model(x, training=False))


def test_export_matches_keras_in_a_fresh_process(run_and_export):
    r = run_and_export["result"]
    check = r["verification"]
    assert r["version"] == 1 and r["path"].endswith(os.path.join("tiny", "1"))
    assert check["max_abs_diff_bytes"] <= 1e-5 and check["max_abs_diff_images"] <= 1e-5
    assert check["findings_ok"] and check["after_bad_max_abs_diff"] <= 1e-5 and check["batch"] == 4
    assert "image_bytes[1]: not a PNG or JPEG image" in check["bad_bytes_error"]
    sig = check["signatures"]
    assert "signature_def['serving_default']" in sig and "inputs['image_bytes']" in sig and "DT_STRING" in sig
    assert "signature_def['predict_images']" in sig and "shape: (-1, 32, 32, 3)" in sig and "DT_BOOL" in sig


def test_assets_and_thresholds_from_the_runs_evaluation(run_and_export):
    r = run_and_export["result"]
    assets = os.path.join(r["path"], "assets")
    assert sorted(os.listdir(assets)) == ["config.yaml", "export_info.json", "labels.txt", "test_metrics.json",
                                          "thresholds.json"]
    labels = open(os.path.join(assets, "labels.txt")).read().split()
    assert labels == run_and_export["evaluation"]["labels"]
    thr = json.load(open(os.path.join(assets, "thresholds.json")))
    assert thr["source"] == "evaluation" and thr["method"] == "youden" and r["warning"] is None
    chosen = run_and_export["evaluation"]["thresholds"]["youden"]
    assert thr["thresholds"] == pytest.approx([chosen[lbl]["threshold"] for lbl in labels])
    assert json.load(open(os.path.join(assets, "test_metrics.json")))["split"] == "test"


def test_png_jpeg_rgba_16bit_inputs(loaded, run_and_export):
    import tensorflow as tf

    gray = sample_gray()[40:440, 90:390].copy()  # 400x300, not square: the central square is used
    gray[0, 0], gray[0, 1] = 0, 255  # full range, so its 16-bit copy (stretched to its own range) is the same image
    rgba = np.dstack([gray, gray, gray, np.full_like(gray, 255)])
    la = np.dstack([gray, np.full_like(gray, 255)])
    blobs = [png_bytes(gray), png_bytes(gray.astype(np.uint16) * 257), png_bytes(rgba), png_bytes(la),
             jpeg_bytes(np.dstack([gray] * 3))]
    out = loaded(image_bytes=tf.constant(blobs))
    probs = out["probabilities"].numpy()
    assert probs.shape == (5, 14) and out["findings"].dtype == tf.bool
    # 16-bit (v*257, stretched back), RGBA and gray+alpha versions of one image are the same image to the model
    np.testing.assert_allclose(probs[1:4], np.repeat(probs[:1], 3, axis=0), atol=1e-6)
    # each file, JPEG included, reaches the model as its record would: build-records' PIL decoding and resize to the
    # records' 64 px, then the eval transform
    np.testing.assert_allclose(probs, _record_probs(run_and_export["model"], blobs, run_and_export["records"]),
                               atol=1e-5)
    assert np.ptp(probs[:, :]) > 0.05  # the tiny model's outputs really differ across labels


def _png_declaring(width, height):
    """A small valid-looking PNG whose header declares width x height pixels (a decompression bomb)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 4096))
            + chunk(b"IEND", b""))


@pytest.mark.timeout(120)
def test_bad_bytes_are_invalid_argument_naming_the_item_and_the_model_keeps_serving(loaded, run_and_export):
    """Issue 11 row 7: every bad item is an InvalidArgumentError naming its index in printable text, never its raw
    bytes (random bytes used to raise UnicodeDecodeError in the client; a truncated PNG had no index)."""
    import tensorflow as tf

    good = png_bytes(sample_gray()[:200, :200])
    jpg = jpeg_bytes(sample_gray()[:200, :200])
    middle = bytearray(good)
    middle[len(good) // 2: len(good) // 2 + 64] = b"\0" * 64
    random_bytes = np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes()
    expected = loaded(image_bytes=tf.constant([good]))["probabilities"].numpy()
    cases = [(b"<html>oops</html>", r"not a PNG or JPEG image \(17 bytes: text\)"),
             (random_bytes, r"not a PNG or JPEG image \(300 bytes: unrecognised binary data\)"),
             (b"\x80\xff\xfe" * 40, "not a PNG or JPEG image"),
             (good[: len(good) // 2], rf"truncated or corrupt PNG data \({len(good) // 2} bytes\)"),
             (bytes(middle), "truncated or corrupt PNG data"),
             (jpg[: len(jpg) // 2], "truncated or corrupt JPEG data"),
             (b"iVBORw0KGgoAAAANSUhEUgAAAAEAAAAB", "base64 text of a PNG"),
             (b"\0" * 128 + b"DICM" + b"\0" * 64, "a DICOM file"),
             (_png_declaring(100_000, 100_000), "declares 100000x100000 pixels, over the limit"),
             (b"", "empty string")]
    for bad, pattern in cases:
        with pytest.raises(tf.errors.InvalidArgumentError, match=r"image_bytes\[2\]: .*" + pattern) as info:
            loaded(image_bytes=tf.constant([good, jpg, bad, good]))
        message = info.value.message
        assert all(ch.isprintable() or ch in "\n\t" for ch in message), repr(message)
        if len(bad) >= 8:
            assert bad[:8].decode("latin-1") not in message and repr(bad[:8])[2:-1] not in message
        again = loaded(image_bytes=tf.constant([good, good]))["probabilities"].numpy()  # the next request is served
        np.testing.assert_allclose(again, np.repeat(expected, 2, axis=0), atol=1e-6)
    with pytest.raises(tf.errors.InvalidArgumentError, match="image_bytes holds no image"):
        loaded(image_bytes=tf.constant([], dtype=tf.string))


def test_version_numbering_and_default_thresholds_warning(run_and_export, tmp_path):
    from cxrkeras.export.savedmodel import export, next_version

    assert next_version(str(tmp_path / "none")) == 1
    for d in ("1", "3", "notes", ".export-abc"):
        (tmp_path / d).mkdir()
    assert next_version(str(tmp_path)) == 4
    # a bare .keras with no evaluation and no records: version 2 beside the fixture's 1, thresholds 0.5 + warning
    keras_path = os.path.join(run_and_export["run"], "stage2", "best.keras")
    copy = str(tmp_path / "model.keras")
    with open(keras_path, "rb") as src, open(copy, "wb") as dst:
        dst.write(src.read())
    r = export(copy, run_and_export["base"], verify=False, log=lambda *_: None)
    assert r["version"] == 2 and os.path.isdir(os.path.join(run_and_export["base"], "1"))
    assert set(r["thresholds"].values()) == {0.5} and "threshold 0.5" in r["warning"]
    info = json.load(open(os.path.join(r["path"], "assets", "export_info.json")))
    assert info["thresholds_source"] == "default" and info["warning"]
    assert not [d for d in os.listdir(run_and_export["base"]) if d.startswith(".export-")]


def test_a_decompression_bomb_is_a_file_error_not_a_traceback(tmp_path):
    """A GIF of a few bytes declaring 20000 x 20000 pixels: PIL's DecompressionBombError becomes the file's error."""
    from cxrkeras.export.predict import FileError, read_file_bytes

    bomb = tmp_path / "bomb.gif"
    bomb.write_bytes(huge_gif())
    with pytest.raises(FileError, match="the image declares too many pixels"):
        read_file_bytes(str(bomb))


@pytest.mark.timeout(180)
def test_predict_reports_bad_files_and_predicts_the_others(run_and_export, loaded, tmp_path):
    """Issue 11 row 9: every readable file is predicted and printed, and the exit status is 1 when any failed;
    folders are searched recursively for PNG/JPEG/DICOM, never following a link out of them."""
    import tensorflow as tf

    from cxrkeras.cli import cli
    from cxrkeras.data.images import encode_png, read_image

    gray = sample_gray()
    good = tmp_path / "good.png"
    good.write_bytes(png_bytes(gray))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not an image")
    trunc = tmp_path / "trunc.png"
    trunc.write_bytes(png_bytes(gray)[:5000])
    dcm = write_dicom(str(tmp_path / "scan.dcm"), gray[:300, :300].astype(np.uint16) * 16, window=(2048, 4096))
    files = [str(good), str(bad), str(trunc), dcm, str(tmp_path / "missing.png")]
    res = CliRunner().invoke(cli, ["predict", "--model", run_and_export["base"], "--json", *files])
    assert res.exit_code == 1 and "3 of 5 input(s) could not be predicted" in res.stderr
    doc = json.loads(res.stdout[res.stdout.index("{"):])
    by_file = {os.path.basename(r["file"]): r for r in doc["results"]}
    assert [os.path.basename(r["file"]) for r in doc["results"]] == [os.path.basename(f) for f in files]
    assert "not an image" in by_file["bad.png"]["error"]
    assert by_file["trunc.png"]["error"] == "truncated or corrupt PNG data (5000 bytes): the decoder refused it"
    assert by_file["missing.png"]["error"] == "file not found"
    from cxrkeras.export.savedmodel import version_dirs

    latest = version_dirs(run_and_export["base"])
    latest = latest[max(latest)]  # 1, or 2 when the version-numbering test has exported the bare .keras before
    assert doc["model"] == latest
    served = tf.saved_model.load(latest).signatures["serving_default"](
        image_bytes=tf.constant([good.read_bytes(), encode_png(read_image(dcm))]))
    for row, name in enumerate(("good.png", "scan.dcm")):
        probs = [by_file[name]["probabilities"][lbl] for lbl in doc["labels"]]
        np.testing.assert_allclose(probs, served["probabilities"].numpy()[row], atol=1e-5)
    keras_file = os.path.join(run_and_export["run"], "stage2", "best.keras")
    table = CliRunner().invoke(cli, ["predict", "--model", keras_file, str(good), str(bad)])
    assert table.exit_code == 1 and "#2: " in table.output and "ERROR" in table.output and "Atelectasis" in table.output

    folder = tmp_path / "folder"
    (folder / "a" / "b").mkdir(parents=True)
    (folder / "a" / "b" / "deep.png").write_bytes(png_bytes(gray))
    (folder / "a" / "photo.jpeg").write_bytes(jpeg_bytes(gray))
    (folder / "z.dcm").write_bytes(open(dcm, "rb").read())
    (folder / "notes.txt").write_text("not searched")
    os.symlink(good, folder / "link_out.png")  # a link leading out of the folder: not read
    res = CliRunner().invoke(cli, ["predict", "--model", keras_file, "--json", str(folder)])
    doc = json.loads(res.stdout[res.stdout.index("{"):])
    got = {os.path.relpath(r["file"], folder): r["error"] for r in doc["results"]}
    assert got == {"a/b/deep.png": None, "a/photo.jpeg": None, "z.dcm": None, "link_out.png": "outside the image root"}
    assert res.exit_code == 1
    os.remove(folder / "link_out.png")
    res = CliRunner().invoke(cli, ["predict", "--model", keras_file, str(folder), str(good)])
    assert res.exit_code == 0 and "#4: " in res.output and "#5" not in res.output
    (tmp_path / "empty").mkdir()
    res = CliRunner().invoke(cli, ["predict", "--model", keras_file, str(tmp_path / "empty")])
    assert res.exit_code == 1 and "folder holds no png/jpg/jpeg/dcm/dicom file" in res.output
