"""The one Preprocessor: a file served, predicted, explained or localised reaches the model as its record does in
evaluation. References: PIL itself (build-records' decoding and resize) and the records pipeline."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf
from evalexport_helpers import png_bytes, tiny_model
from PIL import Image

from cxrkeras.data.images import read_image, resize
from cxrkeras.data.preprocessor import Preprocessor
from cxrkeras.errors import ConfigError

SAMPLE_512 = os.path.join(os.path.dirname(__file__), os.pardir, "cxrkeras", "sample_data", "nih-512px")
IMAGES_512 = os.path.join(SAMPLE_512, "images")
# measured on the 9 bundled 512 px files (3 of them RGBA): max |served - evaluated| model input 9.5e-7 and
# probability 3.6e-7 (float rounding of the batched vs single-image resize); the old serving path (equalise the
# upload at its own size, resize it straight to the model size) was 0.40-1.24 off in input, 0.016-0.053 in probability
INPUT_TOLERANCE = 1e-4
PROBABILITY_TOLERANCE = 1e-5


def _base():
    return np.asarray(Image.open(os.path.join(IMAGES_512, "00009745_000.png")).convert("L"))


@pytest.mark.parametrize("source, size", [
    ((512, 512), (256, 256)), ((512, 512), (224, 224)), ((512, 512), (64, 64)),  # 64: PIL's reduce(2) first
    ((1900, 2100), (256, 256)), ((300, 77), (256, 256)), ((77, 300), (256, 256)),  # tall/wide: pass order
    ((50, 40), (256, 256)), ((1025, 1023), (256, 256)), ((512, 512), (100, 333))])
def test_the_graph_resize_is_build_records_resize_bit_for_bit(source, size):
    from cxrkeras.data.resize import pil_resize

    image = np.asarray(Image.fromarray(_base()).resize(source[::-1], Image.BICUBIC))
    expected = resize(image, size)  # what the encoding workers store (PIL, in its fixed point)
    got = tf.function(lambda x: pil_resize(x, size))(image[..., None].astype(np.float32)).numpy()[..., 0]
    assert got.shape == expected.shape
    np.testing.assert_array_equal(got, expected.astype(np.float32))  # whole levels: exact by construction


def test_square_sources_store_the_same_bytes_as_a_plain_pil_resize():
    """images.resize spells PIL's steps out; for square sources (NIH) it is PIL's one call, byte for byte."""
    for side, out in ((1024, 256), (512, 256), (2048, 256), (512, 64)):
        image = np.asarray(Image.fromarray(_base()).resize((side, side), Image.BICUBIC))
        plain = np.asarray(Image.fromarray(image).resize((out, out), Image.Resampling.LANCZOS, reducing_gap=3.0))
        np.testing.assert_array_equal(resize(image, (out, out)), plain)


def test_colour_and_jpeg_files_decode_to_the_grey_build_records_stores(tmp_path):
    rng = np.random.default_rng(0)
    rgb = np.asarray(Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).resize((120, 90)))
    pre = Preprocessor(image_size=32, stored_size=(32, 32), channels=1)
    for name, data in (("rgb.png", png_bytes(rgb)), ("rgba.png", png_bytes(np.dstack([rgb, rgb[..., :1]])))):
        path = tmp_path / name
        path.write_bytes(data)
        np.testing.assert_array_equal(pre.decode(tf.constant(data)).numpy()[..., 0], read_image(str(path), 1))
    for quality in (75, 95):
        path = tmp_path / f"x{quality}.jpg"
        Image.fromarray(rgb).save(path, format="JPEG", quality=quality)
        np.testing.assert_array_equal(pre.decode(tf.constant(path.read_bytes())).numpy()[..., 0],
                                      read_image(str(path), 1))


@pytest.fixture(scope="module")
def records512(tmp_path_factory):
    """The 9 bundled 512 px files built into records at 256 px and at 64 px (PIL's reduce path), one split."""
    from cxrkeras.data.records import build_records

    out = {}
    for stored in (256, 64):
        folder = str(tmp_path_factory.mktemp(f"records{stored}"))
        build_records(os.path.join(SAMPLE_512, "Data_Entry_2017.csv"), IMAGES_512, folder, image_size=stored,
                      split_fractions=(1.0, 0.0, 0.0), shard_size=100, workers=1, progress=False)
        out[stored] = folder
    return out


def _evaluated(records, pre):
    """{image id: model input} of every record, through the evaluation pipeline."""
    from cxrkeras.data.pipeline import build_dataset

    out = {}
    for x, _, meta in build_dataset(records, "train", training=False, preprocessor=pre, return_ids=True,
                                    batch_size=4):
        out.update(zip((v.decode() for v in meta["image_id"].numpy()), x.numpy()))
    return out


@pytest.mark.parametrize("stored, size, equalize", [(256, 224, None), (256, 224, "hist"), (256, 224, "clahe"),
                                                    (64, 56, "clahe")])
def test_a_served_file_is_its_record_in_evaluation(records512, stored, size, equalize):
    """Issue 12: a 512 px file served, and the same file built into records and evaluated, give the model the same
    input (and so the same probabilities), with and without equalisation."""
    from cxrkeras.export.serving import bytes_to_inputs

    pre = Preprocessor(image_size=size, preprocessing="torch", equalize=equalize, stored_size=(stored, stored),
                       channels=1)
    evaluated = _evaluated(records512[stored], pre)
    names = sorted(evaluated)
    assert len(names) == 9
    blobs = [open(os.path.join(IMAGES_512, n), "rb").read() for n in names]
    served = bytes_to_inputs(tf.constant(blobs), pre).numpy()
    expected = np.stack([evaluated[n] for n in names])
    assert np.abs(served - expected).max() <= INPUT_TOLERANCE
    model = tiny_model(size=size)
    p_served, p_eval = np.asarray(model(served)), np.asarray(model(expected))
    assert np.abs(p_served - p_eval).max() <= PROBABILITY_TOLERANCE
    # the test can fail: the former serving path (no stored size) is far outside these bounds
    legacy = bytes_to_inputs(tf.constant(blobs), Preprocessor(image_size=size, equalize=equalize)).numpy()
    assert np.abs(legacy - expected).max() > 100 * INPUT_TOLERANCE


@pytest.fixture(scope="module")
def clahe_run(records512, tmp_path_factory):
    """A run folder whose model stores a CLAHE preprocessor of 256 px records (as training writes it)."""
    pre = Preprocessor(image_size=64, preprocessing="torch", equalize="clahe", stored_size=(256, 256), channels=1)
    stage = tmp_path_factory.mktemp("run") / "runs" / "clahe" / "stage2"
    stage.mkdir(parents=True)
    model = tiny_model(size=64, preprocessor=pre.to_config())
    model.save(str(stage / "best.keras"))
    return {"run": str(stage.parent), "model": model, "pre": pre,
            "evaluated": _evaluated(records512[256], pre)}


@pytest.mark.timeout(180)
def test_gradcam_localize_predict_and_export_see_the_evaluated_pixels(clahe_run, tmp_path):
    """Issue 12: gradcam, localize, predict and the SavedModel of a CLAHE model are given the pixels evaluation
    gives it (gradcam and localize used to skip the equalisation)."""
    from cxrkeras.explain.files import explain_files, read_inputs
    from cxrkeras.explain.localize import localize
    from cxrkeras.export.predict import predict
    from cxrkeras.export.savedmodel import export
    from cxrkeras.runs import load_source

    run, model, evaluated = clahe_run["run"], clahe_run["model"], clahe_run["evaluated"]
    names = sorted(evaluated)
    paths = [os.path.join(IMAGES_512, n) for n in names]
    expected = np.stack([evaluated[n] for n in names])
    probs = np.asarray(model(expected))
    source = load_source(run)
    assert source.preprocessor == clahe_run["pre"] and source.preprocessor_note is None
    _, x, good, errors = read_inputs(paths, source.preprocessor)
    assert good == list(range(9)) and not errors
    assert np.abs(x - expected).max() <= INPUT_TOLERANCE

    entries = explain_files(run, paths, str(tmp_path / "cams"), top_k=1)
    doc = json.load(open(tmp_path / "cams" / "gradcam.json"))
    assert doc["preprocessor"]["equalize"] == "clahe" and len(entries) == 9
    for e, p in zip(entries, probs):
        assert e["probability"] == pytest.approx(float(p.max()), abs=1e-5)

    boxes = tmp_path / "boxes.csv"
    boxes.write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\n" +
                     "".join(f"{n},Mass,100,100,300,300\n" for n in names))
    result = localize(run, str(boxes), IMAGES_512, random_draws=1)
    mass = source.labels.index("Mass")
    got = {r["image"]: r["probability"] for r in result["rows"]}
    assert result["settings"]["preprocessor"]["equalize"] == "clahe"
    for n, p in zip(names, probs):
        assert got[n] == pytest.approx(float(p[mass]), abs=1e-5)

    doc = predict(run, paths, log=lambda *_: None)
    served_keras = np.array([[r["probabilities"][lbl] for lbl in doc["labels"]] for r in doc["results"]])
    np.testing.assert_allclose(served_keras, probs, atol=PROBABILITY_TOLERANCE)
    exported = export(run, str(tmp_path / "exports"), verify=False, log=lambda *_: None)
    info = json.load(open(os.path.join(exported["path"], "assets", "export_info.json")))
    assert info["preprocessor"] == clahe_run["pre"].to_config()
    serve = tf.saved_model.load(exported["path"]).signatures["serving_default"]
    blobs = [open(p, "rb").read() for p in paths]
    np.testing.assert_allclose(serve(image_bytes=tf.constant(blobs))["probabilities"].numpy(), probs,
                               atol=PROBABILITY_TOLERANCE)


def test_older_models_get_their_preprocessing_from_the_run_or_a_stated_default(records512, tmp_path):
    """A model that stores no preprocessor: its run's run_info.json / config.yaml / records tell equalisation, size
    and channels; a bare .keras gets the former serving behaviour, and a note says so."""
    from cxrkeras.runs import load_source

    stage = tmp_path / "runs" / "old" / "stage1"
    stage.mkdir(parents=True)
    tiny_model(size=64).save(str(stage / "best.keras"))
    (stage / "config.yaml").write_text(f"data:\n  records: {records512[64]}\n  image_size: 64\n  equalize: hist\n")
    source = load_source(str(stage.parent))
    assert source.preprocessor == Preprocessor(image_size=64, preprocessing="torch", equalize="hist",
                                               stored_size=(64, 64), channels=1)
    assert source.preprocessor_note is None
    (stage / "run_info.json").write_text(json.dumps({"records": records512[256], "equalize": "clahe"}))
    assert load_source(str(stage.parent)).preprocessor.stored_size == (256, 256)  # run_info.json first
    assert load_source(str(stage / "best.keras")).preprocessor.equalize == "clahe"  # a stage's .keras: its run
    lone = tmp_path / "lone.keras"
    lone.write_bytes((stage / "best.keras").read_bytes())
    source = load_source(str(lone))
    assert source.preprocessor == Preprocessor(image_size=64, preprocessing="torch")
    assert "records no stored image size" in source.preprocessor_note


def test_preprocessor_config_round_trip_and_bad_values():
    pre = Preprocessor(image_size=224, preprocessing="caffe", equalize="hist", stored_size=[256, 256], channels=3)
    assert pre.stored_size == (256, 256)
    assert Preprocessor.from_config(json.loads(json.dumps(pre.to_config()))) == pre
    assert pre.region(300, 400) == (0, 0, 300, 400)  # records hold the whole image, squeezed to a square
    assert Preprocessor(image_size=224).region(300, 400) == (0, 50, 300, 300)  # the old path: the central square
    for bad, message in ((dict(image_size=0), "image_size"), (dict(preprocessing="tf"), "unknown preprocessing"),
                         (dict(equalize="ahe"), "unknown equalize"), (dict(channels=2), "channels must be 1 or 3"),
                         (dict(stored_size=(256,)), "stored_size")):
        with pytest.raises(ConfigError, match=message):
            Preprocessor(**bad)
    with pytest.raises(ConfigError, match="unknown key.*newer cxrkeras"):
        Preprocessor.from_config({**pre.to_config(), "encoding": "raw"})
