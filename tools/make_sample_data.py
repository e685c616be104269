"""Rebuild the bundled demo sample `cxrkeras/sample_data/nih-64px/` (and its box file) from the real NIH data.

Usage: .venv/bin/python tools/make_sample_data.py [--shared ../shared/data] [--out cxrkeras/sample_data] [--check]

- the 1,000 images of `nih-64px/` (264 patients) are copied byte for byte, with their CSV rows unchanged;
- the 421 images of `nih-512px/` (one per patient), except the 3 that `nih-64px/` already holds, are brought to
  64 px exactly as `cxrkeras build-records --image-size 64` does (gray, PIL Lanczos with reducing gap 3:
  `cxrkeras.data.images.resize`), so records built from the copy equal records built from the 512 px files; their
  CSV rows have the 4 columns NIH's label file has (Image Index, Finding Labels, Follow-up #, Patient ID), the
  others left empty (unknown);
- `BBox_List_2017.csv`: NIH's box rows of every bundled image (64 px and the 512 px files in `nih-512px/`).
`--check` rebuilds into a temporary folder and compares it with the bundled files (exit status 1 if they differ).
"""

import argparse
import csv
import filecmp
import io
import os
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.abspath(os.path.join(HERE, os.pardir, os.pardir, "shared", "data"))
SAMPLE = os.path.abspath(os.path.join(HERE, os.pardir, "cxrkeras", "sample_data"))
SIZE = 64
CSV_NAME = "Data_Entry_2017.csv"
BOX_NAME = "BBox_List_2017.csv"


def _png(arr):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        return next(reader), list(reader)


def build(shared, out):
    """Write nih-64px/{Data_Entry_2017.csv, images/} and BBox_List_2017.csv under `out`; returns the counts."""
    from cxrkeras.data.images import read_image, resize

    src64, src512 = os.path.join(shared, "nih-64px"), os.path.join(shared, "nih-512px")
    dest = os.path.join(out, "nih-64px")
    images = os.path.join(dest, "images")
    os.makedirs(images, exist_ok=True)
    header_text = open(os.path.join(src64, CSV_NAME), encoding="utf-8").read().splitlines()
    header, rows64 = header_text[0], header_text[1:]
    names64 = [r.split(",", 1)[0] for r in rows64 if r.strip()]
    for name in names64:
        shutil.copyfile(os.path.join(src64, "images", name), os.path.join(images, name))
    width = len(next(csv.reader([rows64[0]])))  # 11 fields in NIH's data rows (the header has a trailing comma)
    _, rows512 = _rows(os.path.join(src512, CSV_NAME))
    extra = []
    for fields in rows512:
        name = fields[0]
        if name in names64:
            continue  # the 64 px copy from NIH's rows is kept (it has the full row)
        arr = resize(read_image(os.path.join(src512, "images", name), channels=1), (SIZE, SIZE))
        with open(os.path.join(images, name), "wb") as f:
            f.write(_png(arr))
        extra.append(",".join(fields + [""] * (width - len(fields))))
    with open(os.path.join(dest, CSV_NAME), "w", encoding="utf-8", newline="") as f:
        f.write("\n".join([header] + rows64 + extra) + "\n")
    bundled = set(names64) | {r[0] for r in rows512}
    box_lines = open(os.path.join(shared, "nih-labels", BOX_NAME), encoding="utf-8").read().splitlines()
    kept = [line for line in box_lines[1:] if line.split(",", 1)[0] in bundled]
    with open(os.path.join(out, BOX_NAME), "w", encoding="utf-8", newline="") as f:
        f.write("\n".join([box_lines[0]] + kept) + "\n")
    return {"images": len(names64) + len(extra), "from_64px": len(names64), "from_512px": len(extra),
            "boxes": len(kept)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", default=SHARED, help="the folder holding nih-64px/, nih-512px/, nih-labels/")
    parser.add_argument("--out", default=SAMPLE)
    parser.add_argument("--check", action="store_true", help="compare a fresh rebuild with the bundled files")
    args = parser.parse_args()
    if not args.check:
        print(build(args.shared, args.out))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        counts = build(args.shared, tmp)
        new = sorted(os.listdir(os.path.join(tmp, "nih-64px", "images")))
        old = sorted(os.listdir(os.path.join(args.out, "nih-64px", "images")))
        _, mismatch, errors = filecmp.cmpfiles(os.path.join(tmp, "nih-64px", "images"),
                                               os.path.join(args.out, "nih-64px", "images"), new, shallow=False)
        same = new == old and not mismatch and not errors and all(
            filecmp.cmp(os.path.join(tmp, p), os.path.join(args.out, p), shallow=False)
            for p in (os.path.join("nih-64px", CSV_NAME), BOX_NAME))
    print(counts, "identical to the bundled files" if same else "DIFFERS from the bundled files")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
