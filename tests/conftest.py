"""Shared test fixtures: paths of the bundled real sample and a tiny records folder built from it."""

import os

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SAMPLE_DIR = os.path.join(os.path.dirname(__file__), os.pardir, "cxrkeras", "sample_data")
SAMPLE_64 = os.path.abspath(os.path.join(SAMPLE_DIR, "nih-64px"))
SAMPLE_512 = os.path.abspath(os.path.join(SAMPLE_DIR, "nih-512px"))
SAMPLE_BBOX = os.path.abspath(os.path.join(SAMPLE_DIR, "BBox_List_2017.csv"))
# the tests' sample: 268 of the bundled 1,418 images (95 patients) with their real NIH rows; the other images of
# the folder have no row in it (the demo uses the folder's own CSV, all 1,418)
SAMPLE_64_CSV = os.path.abspath(os.path.join(os.path.dirname(__file__), "data", "nih-64px-268.csv"))


@pytest.fixture(scope="session")
def sample64():
    """(csv path, images dir) of the tests' 64 px NIH sample (268 images, 95 patients)."""
    return SAMPLE_64_CSV, os.path.join(SAMPLE_64, "images")


@pytest.fixture(scope="session")
def sample512():
    return os.path.join(SAMPLE_512, "Data_Entry_2017.csv"), os.path.join(SAMPLE_512, "images")


def _write_tiny_records(out_dir, image_size=64, shard_size=40, encoding="png"):
    """Records of the 64 px sample made by `build_records` (patient-wise stratified split, ≥ 2 train shards)."""
    from cxrkeras.data.records import build_records

    csv_path, images = SAMPLE_64_CSV, os.path.join(SAMPLE_64, "images")
    build_records(csv_path, images, out_dir, image_size=image_size, channels=1, shard_size=shard_size, seed=0,
                  workers=1, progress=False, encoding=encoding)
    return out_dir


@pytest.fixture(scope="session")
def tiny_records(tmp_path_factory):
    """A records folder (64 px, 1 channel, train/val/test) built once per test session from the real sample."""
    return _write_tiny_records(str(tmp_path_factory.mktemp("records")))


@pytest.fixture(scope="session")
def tiny_raw_records(tmp_path_factory):
    """The same records as `tiny_records`, built with `encoding="raw"` (uint8 pixels, no PNG)."""
    return _write_tiny_records(str(tmp_path_factory.mktemp("records-raw")), encoding="raw")


@pytest.fixture(params=["png", "raw"])
def any_records(request):
    """(encoding, records folder): each test that takes it runs on the PNG and on the raw records."""
    name = "tiny_records" if request.param == "png" else "tiny_raw_records"
    return request.param, request.getfixturevalue(name)


@pytest.fixture(scope="session")
def thin_model(tmp_path_factory):
    """A thin untrained DenseNet121 + LKA (after norm5) at 64 px, saved as .keras: the explain tests' classifier."""
    from cxrkeras import models

    model = models.build_model("densenet121-lka-after", input_shape=(64, 64, 3), width_multiplier=0.125,
                               blocks=(1, 1, 1, 1))
    path = str(tmp_path_factory.mktemp("model") / "thin.keras")
    model.save(path)
    return path


@pytest.fixture(scope="session")
def trained_unet(tmp_path_factory):
    """A small U-Net trained on 48 synthetic disc images (32 px): its folder, data and metrics."""
    from segmentation_helpers import write_shapes

    from cxrkeras.segmentation.train import SegmentationConfig, train_segmentation

    root = str(tmp_path_factory.mktemp("shapes"))
    images, masks = write_shapes(root, 48, size=32)
    out = os.path.join(root, "unet")
    config = SegmentationConfig(images=images, masks=masks, out=out, image_size=32, depth=2, width=8, epochs=15,
                                batch_size=8, lr=3e-3, seed=0)
    metrics = train_segmentation(config, log=lambda *_: None)
    return dict(root=root, images=images, masks=masks, out=out, metrics=metrics)


@pytest.fixture
def offline_downloads(monkeypatch):
    """keras.utils.get_file failing as it does on a machine without internet (the ImageNet-weights error paths)."""
    import keras

    def offline(*args, **kwargs):
        raise Exception("URL fetch failure: [Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(keras.utils, "get_file", offline)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def serve_export(tiny_records, tmp_path_factory):
    """A tiny model's .keras and its export (thresholds chosen on the records' validation split), for serve tests."""
    from evalexport_helpers import tiny_model

    from cxrkeras.export import export

    root = tmp_path_factory.mktemp("serve-model")
    keras_path = str(root / "tiny.keras")
    tiny_model().save(keras_path)
    result = export(keras_path, str(root / "exports" / "tiny"), records_dir=tiny_records, verify=False,
                    log=lambda *_: None)
    return {"keras": keras_path, "base": str(root / "exports" / "tiny"), "version_dir": result["path"],
            "labels": result["labels"], "thresholds": [result["thresholds"][k] for k in result["labels"]],
            "info": result["thresholds_info"]}


@pytest.fixture(scope="session")
def server(serve_export, tmp_path_factory):
    """`cxrkeras serve` on that export, its own process on a loopback port (uploads limited to 2 MiB, 8 images)."""
    from serve_helpers import running_server

    with running_server(serve_export["base"], tmp_path_factory.mktemp("server"), "--max-upload-mb", "2",
                        "--max-images", "8") as srv:
        yield srv


def _background_checks(session):
    """The BackgroundCheck of each selected test module that has one (tests/background_helpers.py)."""
    checks = {}
    for item in session.items:
        check = getattr(getattr(item, "module", None), "BACKGROUND", None)
        if check is not None:
            checks[id(check)] = check
    return list(checks.values())


def pytest_collection_finish(session):
    """Start those fresh-process checks as soon as the tests to run are known: they need no fixture, so they run
    beside the in-process tests instead of after them; their tests then wait for the result."""
    if not session.config.option.collectonly:
        for check in _background_checks(session):
            check.start()


def pytest_sessionfinish(session):
    for check in _background_checks(session):
        check.stop()
