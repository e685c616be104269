"""Input tables: the NIH Data_Entry CSV (2017 and v2020), a generic path/labels/patient CSV, label and split lists."""

import contextlib
import csv
import os
import re
from dataclasses import dataclass, field

import numpy as np

from cxrkeras.constants import RECORD_FORMATS
from cxrkeras.errors import ConfigError, DataError
from cxrkeras.labels import ANY_FINDING, LABEL_ALIASES, NIH_LABELS, NO_FINDING

NIH_IMAGE, NIH_LABELS_COL, NIH_PATIENT = "Image Index", "Finding Labels", "Patient ID"
NIH_FOLLOW_UP, NIH_AGE, NIH_SEX, NIH_VIEW = "Follow-up #", "Patient Age", "Patient Gender", "View Position"
FORMATS = RECORD_FORMATS
_MAX_LISTED = 10


@dataclass
class Table:
    """One row per input image, in CSV order; `rows` are CSV line numbers (header = line 1)."""

    csv_path: str
    format: str
    labels: tuple
    image_id: list
    path: list  # path as written in the CSV (NIH: the file name), resolved against --images later
    patient_id: list
    y: np.ndarray  # uint8 [n, num_labels]
    rows: np.ndarray
    follow_up: np.ndarray
    age: np.ndarray
    sex: list
    view: list
    columns: list = field(default_factory=list)
    raw: list = field(default_factory=list)  # the CSV rows as read, for index.csv
    unreadable: dict = field(default_factory=dict)  # column -> CSV lines whose value could not be read (stored -1)
    dataset: np.ndarray = None  # int64 [n]: index of each row's source dataset into `datasets`
    datasets: list = field(default_factory=list)  # source dataset names (cxrkeras.data.datasets), index order
    dataset_column: str = None  # the CSV column they were read from, None: every row is --dataset-name

    def __len__(self):
        return len(self.image_id)

    def select(self, mask):
        idx = np.flatnonzero(mask)
        pick = lambda seq: [seq[i] for i in idx]  # noqa: E731
        return Table(self.csv_path, self.format, self.labels, pick(self.image_id), pick(self.path),
                     pick(self.patient_id), self.y[idx], self.rows[idx], self.follow_up[idx], self.age[idx],
                     pick(self.sex), pick(self.view), self.columns, pick(self.raw), self.unreadable,
                     self.dataset[idx], self.datasets, self.dataset_column)


def _rows_text(rows):
    text = ", ".join(str(r) for r in rows[:_MAX_LISTED])
    return text + (f" and {len(rows) - _MAX_LISTED} more" if len(rows) > _MAX_LISTED else "")


def normalize_header(header):
    """Column names as data columns: trailing empty fields dropped, `Name[a,b]` (quoted or split) → `Name a`, `Name b`."""
    names = [h.strip() for h in header]
    while names and not names[-1]:
        names.pop()  # NIH 2017: the header ends with a comma that no data row has
    out, i = [], 0
    while i < len(names):
        name = names[i]
        quoted = re.fullmatch(r"(.*)\[([^,\]]+),([^\]]+)\]", name)
        split = re.fullmatch(r"(.*)\[([^,\]]+)", name)
        if quoted:
            out += [f"{quoted.group(1)} {quoted.group(2)}", f"{quoted.group(1)} {quoted.group(3)}"]
        elif split and i + 1 < len(names) and names[i + 1].endswith("]"):
            out += [f"{split.group(1)} {split.group(2)}", f"{split.group(1)} {names[i + 1][:-1]}"]
            i += 1
        else:
            out.append(name)
        i += 1
    return out


@contextlib.contextmanager
def _csv_reader(csv_path):
    """(csv.reader, normalised columns) of a UTF-8 CSV file with a header; errors name the file (not found, empty,
    not UTF-8, not a CSV)."""
    if not os.path.isfile(csv_path):
        raise DataError(f"CSV file {csv_path!r} not found: give the labels CSV with --csv")
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise DataError(f"{csv_path}: the file is empty; expected a header row and one row per image")
            yield reader, normalize_header(header)
    except UnicodeDecodeError as exc:
        raise DataError(f"{csv_path}: not a UTF-8 text CSV (invalid byte at offset {exc.start}); "
                        f"save it as UTF-8 CSV") from exc
    except csv.Error as exc:
        raise DataError(f"{csv_path}: not a readable CSV ({exc})") from exc


def read_header(csv_path):
    """The normalised column names (header row only)."""
    with _csv_reader(csv_path) as (_, columns):
        return columns


def read_csv_rows(csv_path):
    """(columns, [(line, fields)]) with the NIH header quirks resolved; errors name the file and line."""
    with _csv_reader(csv_path) as (reader, columns):
        rows, short = [], []
        for fields in reader:
            if not any(x.strip() for x in fields):
                continue
            while len(fields) > len(columns) and not fields[-1].strip():
                fields = fields[:-1]
            if len(fields) > len(columns):
                raise DataError(
                    f"{csv_path} line {reader.line_num}: {len(fields)} fields but the header has "
                    f"{len(columns)} columns ({', '.join(columns)}); fix the row or the header")
            if len(fields) < len(columns):
                short.append((reader.line_num, len(fields)))
            rows.append((reader.line_num, fields))
    if short:
        # a short row is a broken row (a lost separator or quote), never silently padded with empty fields
        listed = "; ".join(f"line {line} has {n} field{'s' if n != 1 else ''}" for line, n in short[:_MAX_LISTED])
        more = f" and {len(short) - _MAX_LISTED} more short lines" if len(short) > _MAX_LISTED else ""
        raise DataError(f"{csv_path}: {listed}{more}, {len(columns)} expected ({', '.join(columns)}); "
                        f"fix those rows (a missing separator or an unclosed quote?)")
    return columns, rows


def _require(csv_path, columns, names, hint):
    missing = [n for n in names if n not in columns]
    if missing:
        raise DataError(
            f"{csv_path}: required column(s) {', '.join(repr(m) for m in missing)} missing; the header has "
            f"{', '.join(repr(c) for c in columns)}. {hint}")


_AGE_UNITS = {"": 1, "Y": 1, "M": 12, "W": 52, "D": 365}  # DICOM AS units, as whole years


def _int_or_unknown(text, age=False):
    """(value, readable): -1 for an empty field (unknown) or an unreadable one (readable False).
    NIH ages appear as "58" or "058Y"; DICOM-style "003M" / "010W" / "020D" become whole years."""
    text = (text or "").strip()
    if not text:
        return -1, True
    match = re.fullmatch(r"(\d+)\s*([YyMmWwDd]?)" if age else r"(\d+)", text)
    if not match:
        return -1, False
    value = int(match.group(1))
    return (value // _AGE_UNITS[match.group(2).upper()] if age else value), True


def _parse_ints(values, rows, age, unreadable, column):
    out = np.full(len(rows), -1, dtype=np.int64)
    if values is None:
        return out
    bad = []
    for i, (text, row) in enumerate(zip(values, rows)):
        out[i], ok = _int_or_unknown(text, age)
        if not ok:
            bad.append(int(row))
    if bad:
        unreadable[column] = bad
    return out


def parse_labels(csv_path, column, texts, rows, label_names, empty_is_negative):
    """Multi-hot matrix; unknown names → one error listing each name with its rows."""
    index = {name: i for i, name in enumerate(label_names)}
    y = np.zeros((len(texts), len(label_names)), dtype=np.uint8)
    unknown, empty = {}, []
    for r, text in enumerate(texts):
        names = [t.strip() for t in text.split("|") if t.strip()]
        if not names and not empty_is_negative:
            empty.append(int(rows[r]))
        for name in names:
            name = LABEL_ALIASES.get(name, name)
            if name == NO_FINDING:
                continue
            j = index.get(name)
            if j is None:
                unknown.setdefault(name, []).append(int(rows[r]))
            else:
                y[r, j] = 1
    if unknown:
        listed = "; ".join(f"{name!r} (lines {_rows_text(r)})" for name, r in sorted(unknown.items()))
        raise DataError(
            f"{csv_path}: unknown label name(s) in column {column!r}: {listed}. Known labels: "
            f"{', '.join(label_names)} (and {NO_FINDING!r}). Fix the CSV, or give the label list with --labels")
    if empty:
        raise DataError(f"{csv_path}: column {column!r} is empty on lines {_rows_text(empty)}; "
                        f"write {NO_FINDING!r} for images without findings")
    return y


def _check_unique(csv_path, column, values, rows):
    seen, dups = {}, []
    for v, r in zip(values, rows):
        if v in seen:
            dups.append(f"{v!r} (lines {seen[v]} and {int(r)})")
        else:
            seen[v] = int(r)
    if dups:
        more = f" and {len(dups) - _MAX_LISTED} more" if len(dups) > _MAX_LISTED else ""
        raise DataError(f"{csv_path}: duplicate {column!r}: {', '.join(dups[:_MAX_LISTED])}{more}; "
                        f"each image must appear once: remove the repeated rows")


def _check_filled(csv_path, column, values, rows):
    empty = [int(r) for v, r in zip(values, rows) if not v]
    if empty:
        raise DataError(f"{csv_path}: column {column!r} is empty on lines {_rows_text(empty)}; fill it in")


def _read_text(path, what):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as exc:
        raise DataError(f"{what} {path}: not a UTF-8 text file (invalid byte at offset {exc.start})") from exc


def read_label_list(spec):
    """--labels: "A,B,C" or a text file with one label per line (or comma-separated)."""
    if spec is None:
        return None
    if os.path.isfile(spec):
        text = _read_text(spec, "label list --labels")
        names = [n.strip() for n in re.split(r"[,\n]", text) if n.strip() and not n.strip().startswith("#")]
    else:
        names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise ConfigError(f"--labels {spec!r} gives no label names; write them comma-separated or one per line in a file")
    if len(set(names)) != len(names):
        raise ConfigError(f"--labels {spec!r} repeats a label name: {', '.join(names)}")
    if NO_FINDING in names:
        raise ConfigError(f"--labels must not contain {NO_FINDING!r}: it is the absence of every label")
    return tuple(names)


def nih_label_subset(labels):
    """--labels on the NIH CSV: names among the 14 (aliases such as 'Infiltrate' accepted) or ANY_FINDING, in the
    order given; an unknown name is an error listing what may be chosen."""
    names = tuple(LABEL_ALIASES.get(name, name) for name in labels)
    unknown = [name for name in names if name not in NIH_LABELS and name != ANY_FINDING]
    if unknown:
        raise ConfigError(f"--labels {', '.join(repr(n) for n in unknown)}: not a label of the NIH CSV; choose "
                          f"any of {', '.join(NIH_LABELS)} (in the order you want them), or {ANY_FINDING!r}: "
                          f"1 for an image with any finding, 0 for {NO_FINDING!r}")
    if len(set(names)) != len(names):
        raise ConfigError(f"--labels {', '.join(labels)}: a label is given twice")
    return names


def select_labels(y_nih, names):
    """Columns `names` (NIH labels or ANY_FINDING) of a [n, 14] NIH multi-hot matrix, in that order."""
    columns = [y_nih.max(axis=1) if name == ANY_FINDING else y_nih[:, NIH_LABELS.index(name)] for name in names]
    return np.stack(columns, axis=1).astype(np.uint8) if columns else y_nih[:, :0]


def detect_format(columns):
    return "nih" if NIH_IMAGE in columns and NIH_LABELS_COL in columns else "generic"


def read_table(csv_path, fmt="auto", labels=None, path_column="path", labels_column="labels",
               patient_column="patient_id", dicom_patient=None, dataset_name=None):
    """Read the labels CSV into a Table. `dicom_patient(path_text) -> id` supplies patient ids in DICOM mode.
    Each row's source dataset: its 'Dataset' column (cxrkeras.data.datasets.COLUMN) if the CSV has one, else
    `dataset_name` (default datasets.DEFAULT_NAME)."""
    from cxrkeras.data import datasets
    if fmt not in FORMATS:
        raise ConfigError(f"unknown --format {fmt!r}: choose one of {', '.join(FORMATS)}")
    columns, rows = read_csv_rows(csv_path)
    if fmt == "auto":
        fmt = detect_format(columns)
    col = {name: i for i, name in enumerate(columns)}
    lines = np.array([r for r, _ in rows], dtype=np.int64)
    get = lambda name: [f[col[name]].strip() for _, f in rows] if name in col else None  # noqa: E731
    if fmt == "nih":
        # every row is read against all 14 labels (an unknown name is still an error), then the chosen ones kept
        label_names = nih_label_subset(labels) if labels else NIH_LABELS
        _require(csv_path, columns, [NIH_IMAGE, NIH_LABELS_COL, NIH_PATIENT],
                 "Give NIH's Data_Entry_2017(_v2020).csv, or use --format generic with --path-column etc.")
        image_col, label_col, patient_col = NIH_IMAGE, NIH_LABELS_COL, NIH_PATIENT
        empty_negative = False
    else:
        if labels is None:
            raise ConfigError("a generic CSV needs the label list: --labels 'A,B' or --labels FILE (one per line)")
        label_names = labels
        needed = [path_column, labels_column] + ([] if fmt == "dicom" and patient_column not in col else [patient_column])
        _require(csv_path, columns, needed,
                 "Name the columns with --path-column, --labels-column and --patient-column"
                 + ("" if fmt == "dicom" else " (or --format dicom to take patient ids from the DICOM files)"))
        image_col, label_col, patient_col = path_column, labels_column, patient_column
        empty_negative = True
    if not rows:
        raise DataError(f"{csv_path}: no data rows after the header; nothing to build")
    image_id = get(image_col)
    _check_filled(csv_path, image_col, image_id, lines)
    _check_unique(csv_path, image_col, image_id, lines)
    if fmt == "nih":
        y = select_labels(parse_labels(csv_path, label_col, get(label_col), lines, NIH_LABELS, False), label_names)
    else:
        y = parse_labels(csv_path, label_col, get(label_col), lines, label_names, empty_negative)
    if patient_col in col:
        patient = get(patient_col)
        _check_filled(csv_path, patient_col, patient, lines)
    else:
        patient = [dicom_patient(p) for p in image_id]
    n = len(rows)
    unreadable = {}
    follow = _parse_ints(get(NIH_FOLLOW_UP) if fmt == "nih" else None, lines, False, unreadable, NIH_FOLLOW_UP)
    age = _parse_ints(get(NIH_AGE) if fmt == "nih" else None, lines, True, unreadable, NIH_AGE)
    dataset, dataset_names = datasets.table_datasets(csv_path, get(datasets.COLUMN), lines, dataset_name)
    return Table(
        csv_path=csv_path, format=fmt, labels=tuple(label_names), image_id=image_id, path=list(image_id),
        patient_id=patient, y=y, rows=lines, follow_up=follow, age=age,
        sex=(get(NIH_SEX) if fmt == "nih" and NIH_SEX in col else [""] * n),
        view=(get(NIH_VIEW) if fmt == "nih" and NIH_VIEW in col else [""] * n),
        columns=columns, raw=[f for _, f in rows], unreadable=unreadable, dataset=dataset, datasets=dataset_names,
        dataset_column=datasets.COLUMN if datasets.COLUMN in col else None)


def read_split_list(path):
    """Image names of one split list file (one per line; blank lines and # comments ignored)."""
    if not os.path.isfile(path):
        raise DataError(f"split list {path!r} not found; give existing files with --split-lists")
    lines = _read_text(path, "split list").splitlines()
    names = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not names:
        raise DataError(f"split list {path} is empty; it should list one image name per line")
    return names
