"""`predict(model, files)`: per-label probabilities and findings for image/DICOM files, from an export, a run or
a .keras file; an unreadable file is reported and the others are still predicted."""

import os

import numpy as np

from cxrkeras.errors import CxrError

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
FOLDER_EXTENSIONS = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")  # what a folder argument is searched for
MAX_BATCH_SIZE = 1024


class FileError(Exception):
    """A file that cannot be predicted; the message says why."""


def read_file_bytes(path):
    """PNG/JPEG bytes of one input file: PNG/JPEG as they are (exactly what TF Serving would receive); DICOM and
    other formats through build-records' reader (cxrkeras.data.images.read_image), re-encoded as lossless PNG."""
    from cxrkeras.data import images as imglib

    try:
        data = imglib.read_bytes(path)
        if data.startswith(_PNG_MAGIC) or data.startswith(_JPEG_MAGIC):
            return data
        return imglib.encode_png(imglib.read_image(path, channels=1, data=data))
    except imglib.ImageError as exc:
        raise FileError(exc.reason) from exc


class _SavedModelPredictor:
    """An exported SavedModel: its serving_default signature does the preprocessing in the graph."""

    def __init__(self, version_dir):
        import tensorflow as tf

        from cxrkeras.fileio import read_json, read_json_or

        self.path = version_dir
        self.note = None
        self.fn = tf.saved_model.load(version_dir).signatures["serving_default"]
        self.takes_patient = "age" in self.fn.structured_input_signature[1]
        self.takes_dataset = "dataset" in self.fn.structured_input_signature[1]
        assets = os.path.join(version_dir, "assets")
        try:
            with open(os.path.join(assets, "labels.txt"), encoding="utf-8") as f:
                self.labels = [ln.strip() for ln in f if ln.strip()]
            doc = read_json(os.path.join(assets, "thresholds.json"))
        except (OSError, ValueError) as exc:
            raise CxrError(f"{version_dir}: its assets (labels.txt, thresholds.json) cannot be read ({exc}); "
                           f"export the model again with `cxrkeras export`") from exc
        self.thresholds = np.asarray(doc["thresholds"], dtype=np.float64)
        self.warning = doc.get("warning")
        info = read_json_or(os.path.join(assets, "export_info.json"))
        self.datasets = (info.get("datasets") if isinstance(info, dict) else None) or \
            (["?"] if self.takes_dataset else None)  # "?": names not recorded, --dataset must say

    def __call__(self, blobs, patient=None, dataset=None):
        import tensorflow as tf

        extra = {"dataset": tf.constant([dataset] * len(blobs))} if self.takes_dataset else {}
        out = self.fn(image_bytes=tf.constant(blobs), **patient_tensors(patient, self.takes_patient), **extra)
        return out["probabilities"].numpy().astype(np.float64), out["findings"].numpy()


class _KerasPredictor:
    """A run folder or .keras file: the model's own Preprocessor, through the serving graph's `bytes_to_inputs`."""

    def __init__(self, target, log):
        from cxrkeras.export.savedmodel import resolve_thresholds
        from cxrkeras.runs import load_source

        self.source = load_source(target)
        self.note = "\n".join(n for n in (self.source.note, self.source.preprocessor_note) if n) or None
        self.path = self.source.model_path
        self.labels = self.source.labels
        thresholds, info = resolve_thresholds(self.source, None, log=lambda *_: None)
        self.thresholds = np.asarray(thresholds, dtype=np.float64)
        self.warning = info.get("warning")
        self.takes_patient = self.source.patient is not None
        self.datasets = self.source.datasets

    def __call__(self, blobs, patient=None, dataset=None):
        import tensorflow as tf

        from cxrkeras.export.serving import bytes_to_inputs
        from cxrkeras.inference import inference_step

        x = bytes_to_inputs(tf.constant(blobs), self.source.preprocessor)
        if self.takes_patient:  # the model's own encoder, as the SavedModel's graph has it
            x = (x, self.source.patient.encode_checked(**patient_tensors(patient, True), count=tf.shape(x)[0]))
        elif self.datasets:  # the model's own names, as the SavedModel's graph maps them
            from cxrkeras.data.datasets import DatasetInput

            x = (x, DatasetInput(self.datasets).encode_checked(tf.constant([dataset] * len(blobs)), tf.shape(x)[0]))
        probs = np.asarray(inference_step(self.source.model)(x), dtype=np.float64)
        return probs, probs >= self.thresholds.astype(np.float32)


def _dataset_of(predictor, model, dataset):
    """The dataset name every file is predicted as: `dataset` (checked against the model's), else its first."""
    from cxrkeras.data.datasets import resolve

    names = getattr(predictor, "datasets", None)
    if not names:
        if dataset is not None:
            raise CxrError(f"{model} takes no dataset input (no FPSM dataset embedding): leave out --dataset")
        return None
    if names == ["?"]:  # an export without export_info.json: the graph checks the name
        if dataset is None:
            raise CxrError(f"{model} takes the source dataset's name: give --dataset NAME")
        return str(dataset).strip()
    return names[resolve(names, dataset)]


def patient_tensors(patient, takes_patient):
    """{age, sex, view} tensors of [(age, sex, view)] per image (the serving signature's extra inputs), {} for a
    model without patient features."""
    from cxrkeras.data.patient import value_tensors

    if not takes_patient:
        if patient is not None:
            raise CxrError("this model takes no patient features (age, sex, view): leave them out")
        return {}
    if patient is None or any(v is None for v in patient):
        raise CxrError("this model takes age, sex and view for every image")
    return value_tensors(patient)


def load_predictor(model, log=print):
    """An export folder (numbered versions: the highest), a SavedModel version folder, a run folder or a .keras."""
    from cxrkeras.export.savedmodel import version_dirs

    if os.path.isdir(model):
        if os.path.isfile(os.path.join(model, "saved_model.pb")):
            return _SavedModelPredictor(model)
        versions = {v: p for v, p in version_dirs(model).items() if os.path.isfile(os.path.join(p, "saved_model.pb"))}
        if versions:
            return _SavedModelPredictor(versions[max(versions)])
    elif not os.path.isfile(model):
        raise CxrError(f"--model {model!r} does not exist: give an export folder (exports/<name>), a run folder or "
                       f"a .keras file")
    return _KerasPredictor(model, log)


def expand_inputs(paths):
    """[(file, error or None)]: files as given; a folder searched recursively for PNG/JPEG/DICOM files (sorted),
    never following a link out of it (such files are listed with the error "outside the image root")."""
    from cxrkeras.data.image_index import OUTSIDE_ROOT, ImageIndex

    out = []
    for path in paths:
        if not os.path.isdir(path):
            out.append((path, None))
            continue
        index = ImageIndex(path, by_name=False)
        wanted = lambda rel: rel.lower().endswith(FOLDER_EXTENSIONS)  # noqa: E731
        found = [(index.files[rel], None) for rel in sorted(index.files) if wanted(rel)]
        found += [(os.path.join(path, rel), OUTSIDE_ROOT) for rel in sorted(index.outside) if wanted(rel)]
        out += found or [(path, f"folder holds no {'/'.join(e[1:] for e in FOLDER_EXTENSIONS)} file")]
    return out


def predict(model, files, batch_size=16, log=print, patient=None, patient_csv=None, dataset=None):
    """[{file, probabilities: {label: p}, findings: [labels], error}] in the order of `files` (folders expanded,
    see `expand_inputs`); a file that cannot be predicted has its `error` and costs the others nothing.
    A model with patient features needs `patient` ((age, sex, view) of every file) or `patient_csv` (a CSV with a
    row per file name: NIH's Data_Entry file, or columns image, age, sex, view); a bad value is that file's error.
    A model with the FPSM dataset embedding takes `dataset`, the source dataset's name for every file (default:
    the model's first dataset)."""
    if not files:
        raise CxrError("no input files: give one or more PNG/JPEG/DICOM paths")
    if not 1 <= int(batch_size) <= MAX_BATCH_SIZE:
        raise CxrError(f"--batch-size {batch_size}: must be 1 to {MAX_BATCH_SIZE}")
    import tensorflow as tf

    from cxrkeras.data.patient import values_for

    inputs = expand_inputs(files)
    predictor = load_predictor(model, log)
    if not predictor.takes_patient and (patient is not None or patient_csv is not None):
        raise CxrError(f"{model} takes no patient features: leave out --age/--sex/--view and --patient-csv")
    values = values_for([f for f, _ in inputs], patient, patient_csv) if predictor.takes_patient else None
    dataset = _dataset_of(predictor, model, dataset)
    if predictor.note:
        log(predictor.note)
    if predictor.warning:
        log(f"warning: {predictor.warning}")
    results = [{"file": f, "probabilities": None, "findings": None, "error": err} for f, err in inputs]
    ready = []
    for i, (path, err) in enumerate(inputs):
        if err is not None:
            continue
        if values is not None and values[i] is None:
            results[i]["error"] = f"no row for {os.path.basename(path)} in {patient_csv} (age, sex and view needed)"
            continue
        try:
            ready.append((i, read_file_bytes(path)))
        except FileError as exc:
            results[i]["error"] = str(exc)

    def call(chunk):
        return predictor([b for _, b in chunk], [values[i] for i, _ in chunk] if values is not None else None,
                         dataset)

    def store(i, probs, found):
        results[i]["probabilities"] = {lbl: float(p) for lbl, p in zip(predictor.labels, probs)}
        results[i]["findings"] = [lbl for lbl, f in zip(predictor.labels, found) if f]

    from cxrkeras.export.serving import item_error

    for start in range(0, len(ready), batch_size):
        chunk = ready[start:start + batch_size]
        while chunk:  # one bad file must not cost the others their prediction: drop it (the error names it), retry
            try:
                probs, found = call(chunk)
            except tf.errors.InvalidArgumentError as exc:
                at, reason = item_error(exc.message)
                if at is None or not 0 <= at < len(chunk):
                    at = 0 if len(chunk) == 1 else None
                if at is None:  # no index in the message: find the culprit one file at a time
                    for item in chunk:
                        _predict_one(call, item, results, store)
                    break
                results[chunk[at][0]]["error"] = reason
                chunk = chunk[:at] + chunk[at + 1:]
                continue
            for (i, _), p, f in zip(chunk, probs, found):
                store(i, p, f)
            break
    return {"model": predictor.path, "labels": predictor.labels, "thresholds": predictor.thresholds.tolist(),
            "warning": predictor.warning, "results": results}


def _predict_one(call, item, results, store):
    import tensorflow as tf

    from cxrkeras.export.serving import item_error

    i, _ = item
    try:
        probs, found = call([item])
        store(i, probs[0], found[0])
    except tf.errors.InvalidArgumentError as exc:
        results[i]["error"] = item_error(exc.message)[1]


def format_table(prediction):
    """Labels as rows, files as columns (#1, #2, ...); a finding is marked with '*'; errors listed below."""
    labels, results = prediction["labels"], prediction["results"]
    ok = [(n + 1, r) for n, r in enumerate(results) if r["error"] is None]
    width = max(len(lbl) for lbl in labels + ["threshold"])
    lines = []
    for n, r in enumerate(results, 1):
        lines.append(f"#{n}: {r['file']}" + (f"  -- ERROR: {r['error']}" if r["error"] else ""))
    if ok:
        lines.append("")
        head = f"{'label':<{width}}  thresh " + " ".join(f"{'#' + str(n):>8}" for n, _ in ok)
        lines.append(head)
        lines.append("-" * len(head))
        for j, lbl in enumerate(labels):
            cells = []
            for _, r in ok:
                p = r["probabilities"][lbl]
                cells.append(f"{p:>7.4f}{'*' if lbl in r['findings'] else ' '}")
            lines.append(f"{lbl:<{width}}  {prediction['thresholds'][j]:.4f} " + " ".join(cells))
        lines.append("")
        lines.append("* = finding (probability >= threshold)")
        for n, r in ok:
            lines.append(f"#{n} findings: {', '.join(r['findings']) or 'none'}")
    return "\n".join(lines)
