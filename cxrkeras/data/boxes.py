"""NIH's bounding-box file (BBox_List_2017.csv): reading it, and a box as a pixel mask of an image of any size."""

import csv
import math
import os

import numpy as np

from cxrkeras.errors import DataError

BOX_FRAME = 1024  # NIH's box coordinates are in the 1024x1024 original images


def box_mask(boxes, height, width, frame=BOX_FRAME):
    """Boolean [height, width] mask of the pixels whose centres lie in any (x, y, w, h) box given in the
    frame x frame original, scaled to this image's size."""
    mask = np.zeros((int(height), int(width)), bool)
    sx, sy = width / float(frame), height / float(frame)
    for x, y, w, h in boxes:
        x0, x1 = x * sx, (x + w) * sx
        y0, y1 = y * sy, (y + h) * sy
        c0, c1 = int(math.ceil(x0 - 0.5)), int(math.ceil(x1 - 0.5))
        r0, r1 = int(math.ceil(y0 - 0.5)), int(math.ceil(y1 - 0.5))
        # a box thinner than a pixel still covers the pixel it falls in
        c1, r1 = max(c1, c0 + 1), max(r1, r0 + 1)
        mask[max(r0, 0):min(r1, height), max(c0, 0):min(c1, width)] = True
    return mask


def read_boxes(path):
    """(boxes, bad_rows): boxes = [{image, label, box=(x, y, w, h), row}] with NIH's label aliases applied;
    bad_rows = ["file:row: reason"] for rows that were skipped."""
    from cxrkeras.labels import LABEL_ALIASES

    if not os.path.isfile(path):
        raise DataError(f"box file {path!r} not found (NIH's BBox_List_2017.csv)")
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f))
    if not rows or not rows[0] or rows[0][0].strip() != "Image Index":
        raise DataError(f"{path}: first row must be NIH's header 'Image Index,Finding Label,Bbox [x,y,w,h],...'; "
                        f"got {rows[0][:3] if rows else 'an empty file'}")
    boxes, bad = [], []
    for number, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) < 6:
            bad.append(f"{path}:{number}: expected 6 fields (image, label, x, y, w, h), got {len(row)}")
            continue
        try:
            x, y, w, h = (float(v) for v in row[2:6])
        except ValueError:
            bad.append(f"{path}:{number}: box values {row[2:6]} are not numbers")
            continue
        if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
            bad.append(f"{path}:{number}: box {row[2:6]} has a non-finite value or no area")
            continue
        label = row[1].strip()
        boxes.append(dict(image=row[0].strip(), label=LABEL_ALIASES.get(label, label), box=(x, y, w, h),
                          row=number))
    return boxes, bad
