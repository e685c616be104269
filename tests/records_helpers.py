"""Helpers for the records tests: small datasets made from the bundled sample, DICOM files, reading records back."""

import os
import shutil

import numpy as np


def small_nih(tmp_path, sample64, n=24, name="small"):
    """A copy of the first `n` rows of the 64 px sample in the NIH layout (images_001/images/); (csv, images, rows)."""
    csv_path, images = sample64
    with open(csv_path) as f:
        lines = f.read().splitlines()
    root = tmp_path / name
    img_dir = root / "images_001" / "images"
    img_dir.mkdir(parents=True)
    rows = lines[1:n + 1]
    for row in rows:
        shutil.copy(os.path.join(images, row.split(",")[0]), img_dir / row.split(",")[0])
    out_csv = root / "Data_Entry_2017.csv"
    out_csv.write_text("\n".join([lines[0]] + rows) + "\n")
    return str(out_csv), str(root), rows


def images_by_patient(rows):
    """{patient id: [image names]} of NIH CSV rows (as small_nih returns them)."""
    out = {}
    for r in rows:
        out.setdefault(r.split(",")[3], []).append(r.split(",")[0])
    return out


def make_dicom(path, pixels, photometric="MONOCHROME2", window=None, voi_lut=None, patient_id="PAT-0001",
               patient_name="Doe^Jane"):
    """A DX DICOM file with 12-bit pixels, identifying tags set, optional window (center, width) or VOI LUT."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.PatientName, ds.PatientBirthDate = patient_id, patient_name, "19600101"
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.asarray(pixels, dtype="<u2").tobytes()
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    if voi_lut is not None:
        item = Dataset()
        item.add_new(0x00283002, "US", [len(voi_lut), 0, 16])  # LUTDescriptor: entries, first value, bits
        item.add_new(0x00283006, "US", [int(v) for v in voi_lut])  # LUTData
        ds.VOILUTSequence = Sequence([item])
    ds.save_as(str(path), enforce_file_format=True)
    return str(path)


def ramp12(size=64):
    """A 12-bit ramp 0…4095 over the image, row-major."""
    return (np.linspace(0, 4095, size * size).reshape(size, size)).astype(np.uint16)


def read_records(out):
    """Every record of a records folder as a dict (numpy values) with its split under '_split' and shard '_file'."""
    import tensorflow as tf

    from cxrkeras.data import features
    from cxrkeras.data import manifest as mf

    m = mf.load_manifest(out)
    spec = features.feature_spec(len(m["labels"]))
    records = []
    for split, info in m["splits"].items():
        for shard in info["shards"]:
            for raw in tf.data.TFRecordDataset(os.path.join(out, shard["file"])):
                ex = {k: v.numpy() for k, v in tf.io.parse_single_example(raw, spec).items()}
                ex["_split"], ex["_file"] = split, shard["file"]
                records.append(ex)
    return records


def decode(record):
    import io

    from PIL import Image

    from cxrkeras.data import features

    return np.asarray(Image.open(io.BytesIO(record[features.IMAGE_ENCODED])))


def replace_shard(tiny_records, tmp_path, split="test"):
    """A copy of the records whose first `split` shard is replaced by the next one (both valid, same count):
    (records folder, the replaced shard's name)."""
    import json

    records = str(tmp_path / "replaced")
    shutil.copytree(tiny_records, records)
    shards = json.load(open(os.path.join(records, "manifest.json")))["splits"][split]["shards"]
    first, second = shards[0], shards[1]
    assert first["records"] == second["records"]
    shutil.copy(os.path.join(records, second["file"]), os.path.join(records, first["file"]))
    return records, first["file"]


def rewrite_shard(records, name, change):
    """Rewrite shard `name` of a records folder with `change(examples)` applied (a list of tf.train.Example), and
    list it in the manifest as it now is (size, sha256): what a faulty build would have written, so that only the
    in-graph record check can catch what is wrong inside it."""
    import json

    import tensorflow as tf

    from cxrkeras.hashing import sha256_file

    shard = os.path.join(records, name)
    examples = [tf.train.Example.FromString(r.numpy()) for r in tf.data.TFRecordDataset(shard)]
    change(examples)
    with tf.io.TFRecordWriter(shard) as w:
        for ex in examples:
            w.write(ex.SerializeToString())
    with open(os.path.join(records, "manifest.json")) as f:
        manifest = json.load(f)
    for info in manifest["splits"].values():
        for s in info["shards"]:
            if s["file"] == name:
                s.update(bytes=os.path.getsize(shard), sha256=sha256_file(shard))
    with open(os.path.join(records, "manifest.json"), "w") as f:
        json.dump(manifest, f)


def slow_encode_task(task):
    """build-records' encoder, 50 ms slower per image (a sleep): a build that lasts long enough to be killed.
    Module-level, so spawn workers find it by name."""
    import time

    time.sleep(0.05)
    return _REAL_ENCODE(task)


from cxrkeras.data.shards import _encode_task as _REAL_ENCODE  # noqa: E402 - the original, before any patching
