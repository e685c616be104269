"""Source datasets: which dataset each record comes from (meta/dataset, an index into the manifest's names).

A records folder pooled from several sources (NIH, CheXpert, PadChest, ...) names them in manifest.json:
  "datasets": {"names": [name of index 0, name of index 1, ...], "column": the CSV column read, or null}
and each split has "datasets": {name: images}. build-records reads the names from an optional CSV column
(`COLUMN`, "Dataset"), else every row is of `--dataset-name` (default `DEFAULT_NAME`); indices follow the names'
first appearance in the CSV. Folders built before the field read as one dataset, `DEFAULT_NAME`, index 0 (the
records' default value).

A model with the FPSM dataset embedding stores its names (build_args["head_dataset_embedding"]); records are read
into it by name (`index_map`), so a model trained on ["NIH", "CheXpert"] evaluated on records of ["CheXpert"]
still sees CheXpert's index 1, and records of a source the model does not know are an error.
"""

from cxrkeras.errors import ConfigError, DataError

COLUMN = "Dataset"  # the optional per-row source column of the labels CSV
DEFAULT_NAME = "NIH ChestX-ray14"  # rows of a CSV without the column, and folders built before the field
MAX_DATASETS = 64
MAX_NAME_LENGTH = 64
_RESERVED = "[]'\"\\"


def name_problem(name):
    """What is wrong with a dataset name (never quoting it), or None."""
    if not isinstance(name, str) or not name.strip():
        return "is empty"
    if len(name.strip()) > MAX_NAME_LENGTH:
        return f"has {len(name.strip())} characters (at most {MAX_NAME_LENGTH})"
    if not name.strip().isprintable():
        return "holds a control or unprintable character"
    if any(c in name for c in _RESERVED):
        return f"holds one of {' '.join(_RESERVED)} (kept out so that error messages quote names unambiguously)"
    return None


def check_name(name, where):
    """`name` stripped, or a ConfigError naming `where` (an option or a request field)."""
    problem = name_problem(name)
    if problem:
        raise ConfigError(f"{where}: the dataset name {problem}; give a short printable name such as "
                          f"{DEFAULT_NAME!r}")
    return name.strip()


def check_names(names, where):
    """A list of distinct valid names, 1 to MAX_DATASETS of them."""
    if isinstance(names, str) or not hasattr(names, "__iter__"):
        raise ConfigError(f"{where}: expected a list of dataset names, got {type(names).__name__}")
    names = [check_name(n, f"{where}[{i}]") for i, n in enumerate(names)]
    if not 1 <= len(names) <= MAX_DATASETS:
        raise ConfigError(f"{where}: {len(names)} dataset names; give 1 to {MAX_DATASETS}")
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: a dataset name is given twice ({', '.join(names)})")
    return names


def table_datasets(csv_path, values, lines, default=None):
    """(index per row int64, names in order of first appearance) of the CSV's dataset column (`values`, one per
    row, None when the CSV has no such column: every row is `default`, DEFAULT_NAME when None). Errors name the
    CSV line and column."""
    import numpy as np

    if values is None:
        name = check_name(DEFAULT_NAME if default is None else default, "--dataset-name")
        return np.zeros(len(lines), dtype=np.int64), [name]
    if default is not None:
        raise ConfigError(f"{csv_path} has a {COLUMN!r} column naming each row's dataset: leave out --dataset-name "
                          f"(it names the dataset of a CSV without that column)")
    index, names, out = {}, [], np.zeros(len(values), dtype=np.int64)
    for i, (text, line) in enumerate(zip(values, lines)):
        problem = name_problem(text)
        if problem:
            raise DataError(f"{csv_path} line {int(line)}: column {COLUMN!r} {problem}; name the source dataset of "
                            f"every row (or drop the column to use --dataset-name)")
        name = text.strip()
        if name not in index:
            if len(names) == MAX_DATASETS:
                raise DataError(f"{csv_path} line {int(line)}: column {COLUMN!r} names more than {MAX_DATASETS} "
                                f"datasets; at most {MAX_DATASETS} sources can be pooled")
            index[name] = len(names)
            names.append(name)
        out[i] = index[name]
    return out, names


def manifest_names(manifest):
    """The dataset names of a records folder, in index order (one, DEFAULT_NAME, for folders built before)."""
    names = (manifest.get("datasets") or {}).get("names")
    return list(names) if names else [DEFAULT_NAME]


def split_counts(dataset_index, names, mask):
    """{name: images} of the rows in `mask` (the manifest's per-split counts)."""
    import numpy as np

    counts = np.bincount(np.asarray(dataset_index)[mask], minlength=len(names))
    return {name: int(n) for name, n in zip(names, counts)}


def index_map(model_names, records_names):
    """[records index -> model index], -1 for a records dataset the model does not know."""
    return [model_names.index(n) if n in model_names else -1 for n in records_names]


def known(names):
    return ", ".join(names)


def resolve(model_names, name, where="--dataset"):
    """The model's index of dataset `name` (None: the first, index 0); an error listing the model's names."""
    if name is None:
        return 0
    name = str(name).strip()
    if name not in model_names:
        raise ConfigError(f"{where}: not one of the model's datasets ({known(model_names)})")
    return model_names.index(name)


def embedding_names(value, where="head_dataset_embedding"):
    """build_model's head_dataset_embedding: None/False/0 (off), a list of names, or a count N (names
    "dataset_0".., for models built outside training); True is resolved by training from the records."""
    if value is None or value is False or (isinstance(value, int) and not isinstance(value, bool) and value == 0):
        return None
    if value is True:
        raise ConfigError(f"{where}: true takes the dataset names of the training records; build_model needs the "
                          f"names (a list) or their number")
    if isinstance(value, int):
        if not 1 <= value <= MAX_DATASETS:
            raise ConfigError(f"{where}: {value} datasets; give 1 to {MAX_DATASETS}")
        return [f"dataset_{i}" for i in range(value)]
    return check_names(list(value), where)



class DatasetInput:
    """The graph side of a model's "dataset" input: source names (string [N], as a request or --dataset gives them)
    -> the model's int32 index [N, 1]. Names are matched trimmed and exactly; one the model does not know is an
    error naming the field and the model's datasets (never the value sent)."""

    FIELDS = ("dataset",)

    def __init__(self, names):
        self.names = check_names(list(names), "the model's datasets")

    def indices(self, names):
        """[N] int32: each name's index, -1 where it is none of the model's."""
        import tensorflow as tf

        text = tf.strings.strip(tf.reshape(tf.convert_to_tensor(names, tf.string), [-1]))
        hits = tf.equal(text[:, None], tf.constant(self.names)[None, :])
        return tf.where(tf.reduce_any(hits, axis=1), tf.argmax(tf.cast(hits, tf.int32), axis=1, output_type=tf.int32),
                        -1)

    def encode_checked(self, names, count=None):
        """[N, 1] int32 after an in-graph check: InvalidArgumentError "dataset[i]: ..." for the first unknown name,
        or when there is not one name per image (`count`)."""
        import tensorflow as tf

        names = tf.reshape(tf.convert_to_tensor(names, tf.string), [-1])
        index = self.indices(names)
        checks = []
        if count is not None:
            checks.append(tf.debugging.Assert(tf.equal(tf.size(names), count),
                                              ["dataset must hold one name per image"]))
        bad = index < 0
        first = tf.argmax(tf.cast(tf.concat([bad, [True]], 0), tf.int32), output_type=tf.int32)
        checks.append(tf.debugging.Assert(tf.logical_not(tf.reduce_any(bad)), [tf.strings.join([
            "dataset[", tf.strings.as_string(first), "]: not one of the datasets the model was trained on (",
            known(self.names), ")"])]))
        with tf.control_dependencies(checks):
            return tf.identity(index)[:, None]


def dataset_input(source):
    """The DatasetInput of a model source (`cxrkeras.runs.load_source`), None for a model without the input."""
    return DatasetInput(source.datasets) if getattr(source, "datasets", None) else None
