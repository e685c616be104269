"""DICOM decoding: window, VOI LUT, MONOCHROME1 inversion, 8-bit scaling, hashed patient ids."""

import numpy as np
import pytest

from cxrkeras.data import images as imglib
from cxrkeras.data import dicom
from records_helpers import make_dicom, ramp12


def test_full_window_maps_12_bits_to_8(tmp_path):
    path = make_dicom(tmp_path / "a.dcm", ramp12(), window=(2048, 4096))
    out = imglib.read_image(path)
    assert out.dtype == np.uint8 and out.shape == (64, 64)
    assert out[0, 0] == 0 and out[-1, -1] == 255 and np.all(np.diff(out.ravel().astype(int)) >= 0)


def test_monochrome1_is_inverted(tmp_path):
    m2 = imglib.read_image(make_dicom(tmp_path / "m2.dcm", ramp12(), window=(2048, 4096)))
    m1 = imglib.read_image(make_dicom(tmp_path / "m1.dcm", ramp12(), "MONOCHROME1", window=(2048, 4096)))
    assert np.array_equal(m1, 255 - m2) and m1[0, 0] == 255


def test_narrow_window_clips_and_centres(tmp_path):
    pixels = np.full((8, 8), 1000, dtype=np.uint16)
    pixels[0, 0], pixels[0, 1] = 500, 2000
    out = imglib.read_image(make_dicom(tmp_path / "w.dcm", pixels, window=(1000, 201)))
    assert out[0, 0] == 0 and out[0, 1] == 255 and abs(int(out[1, 1]) - 128) <= 1


def test_voi_lut_sequence_is_applied(tmp_path):
    lut = [65535 - 16 * i for i in range(4096)]  # an inverting 16-bit LUT: no windowing or min-max gives this
    pixels = ramp12()
    out = imglib.read_image(make_dicom(tmp_path / "l.dcm", pixels, voi_lut=lut))
    expected = np.round((65535 - 16 * pixels.astype(float)) / 65535 * 255).astype(np.uint8)
    assert np.array_equal(out, expected) and out[0, 0] == 255


def test_no_window_falls_back_to_min_max(tmp_path):
    pixels = (ramp12() // 4 + 100).astype(np.uint16)
    out = imglib.read_image(make_dicom(tmp_path / "n.dcm", pixels))
    assert out.min() == 0 and out.max() == 255


def test_not_a_dicom_with_dcm_name(tmp_path):
    (tmp_path / "x.dcm").write_bytes(b"\x00" * 200 + b"garbage")
    with pytest.raises(imglib.ImageError, match="DICOM"):
        imglib.read_image(str(tmp_path / "x.dcm"))


def test_hashed_patient_id_hides_the_original(tmp_path):
    path = make_dicom(tmp_path / "p.dcm", ramp12(8), patient_id="PAT-0001")
    read = dicom.dicom_patient_reader(lambda p: p if p == path else None)
    pid = read(path)
    assert pid.startswith("dcm-") and "PAT" not in pid and pid == dicom.hash_patient_id("PAT-0001")
    assert dicom.dicom_patient_reader(lambda p: path, salt="s")(path) != pid
