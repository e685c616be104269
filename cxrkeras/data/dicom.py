"""DICOM: pixels to 8-bit grey as a radiologist's viewer shows them, and pseudonymous patient ids from the header."""

import hashlib
import io

import numpy as np
from PIL import Image

from cxrkeras.data.images import DICOM_EXTENSIONS, ImageError, describe_error, to_uint8_minmax
from cxrkeras.errors import DataError


def is_dicom(path, head):
    return head[128:132] == b"DICM" or path.lower().endswith(DICOM_EXTENSIONS)


def _window(arr, center, width, function):
    """DICOM PS3.3 C.11.2.1.2 windowing straight to 0..255 (LINEAR, LINEAR_EXACT, SIGMOID)."""
    x = np.asarray(arr, dtype=np.float64)
    if function == "SIGMOID":
        y = 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    elif function == "LINEAR_EXACT":
        y = np.clip((x - center) / width + 0.5, 0.0, 1.0)
    else:
        width = max(width, 1.0)
        if width == 1.0:
            y = (x > center - 0.5).astype(np.float64)
        else:
            y = np.clip((x - (center - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0)
    return np.round(y * 255.0).astype(np.uint8)


def _first(value):
    try:
        return float(value[0])
    except TypeError:
        return float(value)


def dicom_to_uint8(ds):
    """Pixels of a pydicom dataset as uint8 gray: modality LUT, then VOI LUT or window (else min-max), MONOCHROME1 inverted."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    if "PixelData" not in ds:
        raise ImageError("DICOM file has no pixel data")
    try:
        arr = ds.pixel_array
    except Exception as exc:  # pydicom raises many types for unsupported/compressed/corrupt pixel data
        raise ImageError(f"DICOM pixel data cannot be decoded ({describe_error(exc)})") from exc
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        arr = arr[0]  # a radiograph series: the first frame is the image
    if photometric in ("RGB", "YBR_FULL", "YBR_FULL_422") or arr.ndim == 3:
        if photometric.startswith("YBR"):
            from pydicom.pixels import convert_color_space

            arr = convert_color_space(arr, photometric, "RGB")
        return np.asarray(Image.fromarray(np.asarray(arr, dtype=np.uint8)).convert("L"))
    arr = apply_modality_lut(arr, ds)
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
        item = ds.VOILUTSequence[0]
        bits = int(item.LUTDescriptor[2]) or 16
        out = apply_voi_lut(arr, ds, index=0, prefer_lut=True)
        out = np.round(np.clip(np.asarray(out, dtype=np.float64) / (2**bits - 1), 0.0, 1.0) * 255.0).astype(np.uint8)
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        function = str(ds.get("VOILUTFunction", "LINEAR")).upper()
        out = _window(arr, _first(ds.WindowCenter), _first(ds.WindowWidth), function)
    else:
        out = to_uint8_minmax(arr)
    if photometric == "MONOCHROME1":  # MONOCHROME1: high values are dark; flip so bone is bright like MONOCHROME2
        out = 255 - out
    return out


def read_dicom(data):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError) as exc:
        raise ImageError(f"not a readable DICOM file ({describe_error(exc)})") from exc
    return dicom_to_uint8(ds)


def hash_patient_id(patient_id, salt=""):
    """A stable pseudonym for a DICOM PatientID: the original never leaves this function."""
    digest = hashlib.sha256(f"cxrkeras\0{salt}\0{patient_id}".encode("utf-8")).hexdigest()
    return "dcm-" + digest[:16]


def dicom_patient_reader(resolve, salt=""):
    """A function path_text → hashed PatientID read from the DICOM header (pixels not read);
    `resolve(path_text)` → path or None (ImageIndex.resolve), or (path, reason) (ImageIndex.locate)."""

    def read(path_text):
        import pydicom

        found = resolve(path_text)
        path, reason = found if isinstance(found, tuple) else (found, "file not found")
        if path is None:
            raise DataError(f"DICOM file {path_text!r}: {reason}; the patient id is read from it: "
                            f"check --images or give a patient column with --patient-column")
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientID"], force=True)
        except Exception as exc:
            raise DataError(f"{path}: cannot read the DICOM header ({describe_error(exc)}); "
                            f"give a --patient-column") from exc
        pid = str(ds.get("PatientID", "") or "").strip()
        if not pid:
            raise DataError(f"{path}: DICOM has no PatientID; give a patient column with --patient-column")
        return hash_patient_id(pid, salt)

    return read
