"""`PatientEncoder`: the one encoding of a patient's age, sex and view position for models that take them.

  age  -> (age - mean) / sd, with the mean and sd of the training split's images (stored with the model)
  sex  -> one-hot over ("M", "F")
  view -> one-hot over ("PA", "AP")
  = 5 float32 values in FEATURES order, the model's second input (`patient`).

The records pipeline (from meta/age, meta/sex, meta/view), the serving graph (its `age`, `sex`, `view` inputs),
`cxrkeras predict`, Grad-CAM and `cxrkeras serve` all call `problems` and `encode` of the model's encoder, so they
apply one set of rules. Text is trimmed and case-insensitive ("m", " pa "). A negative age and an empty sex or view
are unknown (records store -1 and ""); a non-finite age (text that is no number) is invalid. With missing="error"
(the default) an unknown value is an error naming the field; with missing="encode" it has the documented
missing-value encoding: an unknown age is the training mean (0 after normalisation), an unknown sex or view is all
zeros. An invalid value, or one that is not one of the choices (sex "X", view "LL"), is an error either way.
"""

import dataclasses
import math
from typing import Optional

from cxrkeras.constants import PATIENT_MISSING as MISSING
from cxrkeras.constants import PATIENT_SEXES as SEXES
from cxrkeras.constants import PATIENT_VIEWS as VIEWS
from cxrkeras.errors import ConfigError, DataError

FEATURES = ("age", "sex_M", "sex_F", "view_PA", "view_AP")
FIELDS = ("age", "sex", "view")
STUDY_AGE = (46.63, 16.6)  # the attention study's normalisation (its training split); ours is fitted per run
CONFIG_KEYS = ("age_mean", "age_sd", "missing", "fitted_on")
MISSING_HINT = ("set data.patient_missing: encode for the documented missing-value encoding (an unknown age -> the "
                "training mean, an unknown sex or view -> all-zero one-hot)")


@dataclasses.dataclass(frozen=True)
class PatientEncoder:
    """age_mean / age_sd: the training split's (years); missing: "error" | "encode"; fitted_on: what they were
    computed from ({records, split, images, known_ages, ...}), None for a default encoder."""

    age_mean: float = STUDY_AGE[0]
    age_sd: float = STUDY_AGE[1]
    missing: str = "error"
    fitted_on: Optional[dict] = None

    def __post_init__(self):
        for name in ("age_mean", "age_sd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"patient features: {name} must be a finite number, got {value!r}")
            object.__setattr__(self, name, float(value))
        if self.age_sd <= 0:
            raise ConfigError(f"patient features: age_sd must be > 0, got {self.age_sd}")
        if self.missing not in MISSING:
            raise ConfigError(f"patient features: missing must be one of {', '.join(MISSING)}, got {self.missing!r}")

    width = len(FEATURES)

    # --- storage ---

    def to_config(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_config(cls, config, where="patient features"):
        if isinstance(config, PatientEncoder):
            return config
        unknown = sorted(set(config) - set(CONFIG_KEYS))
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(CONFIG_KEYS)}); it "
                              "was written by a newer cxrkeras")
        return cls(**config)

    @classmethod
    def of(cls, value):
        """None for None/False; the default encoder for True; else an encoder or its config."""
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        return cls.from_config(dict(value) if not isinstance(value, PatientEncoder) else value)

    def describe(self):
        source = (f"the {self.fitted_on.get('split')} split's {self.fitted_on.get('known_ages')} known ages"
                  if self.fitted_on else "defaults")
        return (f"age (years - {self.age_mean:.2f}) / {self.age_sd:.2f} ({source}), sex one-hot "
                f"{'/'.join(SEXES)}, view one-hot {'/'.join(VIEWS)}; unknown values: "
                + ("error" if self.missing == "error" else "encoded (age = mean, one-hot all zero)"))

    # --- graph ops: the rules ---

    @staticmethod
    def _norm(text):
        import tensorflow as tf

        return tf.strings.upper(tf.strings.strip(tf.convert_to_tensor(text, tf.string)))

    def problems(self, age, sex, view):
        """[N] strings: "" where the values can be encoded, else "<field>: <what is wrong>" (the first field)."""
        import tensorflow as tf

        age = tf.cast(tf.convert_to_tensor(age), tf.float32)
        sex, view = self._norm(sex), self._norm(view)
        allow_unknown = self.missing == "encode"

        def field(name, unknown, invalid, choices):
            what = tf.where(invalid, f"{name}: not one of {', '.join(choices)}" if choices else
                            f"{name}: not a number of years", "")
            if not allow_unknown:
                what = tf.where(unknown, f"{name}: unknown (missing in the input)", what)
            return what

        age_invalid = tf.logical_not(tf.math.is_finite(age))
        out = field("age", tf.logical_and(tf.logical_not(age_invalid), age < 0), age_invalid, ())
        for name, text, choices in (("sex", sex, SEXES), ("view", view, VIEWS)):
            unknown = tf.equal(text, "")
            known = tf.reduce_any(tf.equal(text[:, None], tf.constant(choices)[None, :]), axis=1)
            this = field(name, unknown, tf.logical_and(tf.logical_not(unknown), tf.logical_not(known)), choices)
            out = tf.where(tf.equal(out, ""), this, out)
        return out

    def encode(self, age, sex, view):
        """[N, 5] float32 features (FEATURES order); unknown values get the missing-value encoding (check them with
        `problems` first where they are errors)."""
        import tensorflow as tf

        age = tf.cast(tf.convert_to_tensor(age), tf.float32)
        known = tf.logical_and(tf.math.is_finite(age), age >= 0)
        z = tf.where(known, (age - self.age_mean) / self.age_sd, 0.0)
        parts = [z[:, None]]
        for text, choices in ((self._norm(sex), SEXES), (self._norm(view), VIEWS)):
            parts.append(tf.cast(tf.equal(text[:, None], tf.constant(choices)[None, :]), tf.float32))
        return tf.concat(parts, axis=1)

    def encode_checked(self, age, sex, view, count=None, names=FIELDS):
        """`encode` after an in-graph check: InvalidArgumentError "<field>[i]: ..." naming the first bad item (the
        serving graph's inputs); `count`: the number of images the values go with."""
        import tensorflow as tf

        sizes = [tf.size(tf.convert_to_tensor(v)) for v in (age, sex, view)]
        n = sizes[0] if count is None else count
        same = tf.reduce_all(tf.stack([tf.equal(s, n) for s in sizes]))
        shape_check = tf.debugging.Assert(same, [f"{', '.join(names)} must each hold one value per image"])
        with tf.control_dependencies([shape_check]):
            age, sex, view = (tf.identity(tf.reshape(v, [-1])) for v in (age, sex, view))
        problems = self.problems(age, sex, view)
        bad = tf.not_equal(problems, "")
        first = tf.argmax(tf.cast(tf.concat([bad, [True]], 0), tf.int32), output_type=tf.int32)
        what = tf.gather(tf.concat([problems, [""]], 0), first)
        message = tf.strings.regex_replace(what, "^([a-z]+): ", tf.strings.join(["\\1[", tf.strings.as_string(first),
                                                                                "]: "]))
        with tf.control_dependencies([tf.debugging.Assert(tf.logical_not(tf.reduce_any(bad)), [message])]):
            return tf.identity(self.encode(age, sex, view))

    # --- Python-side (predict, the web page, CSV files) ---

    def check_values(self, age, sex, view):
        """[problem or None] for lists of values (as typed: numbers or text); the graph's rules, run eagerly."""
        import tensorflow as tf

        problems = self.problems(**value_tensors(list(zip(age, sex, view))))
        return [p.decode("utf-8") or None for p in problems.numpy()]


def value_tensors(values):
    """{age, sex, view} tensors of [(age, sex, view)] per image, as typed (the serving signature's extra inputs)."""
    import tensorflow as tf

    return {"age": tf.constant([age_value(a) for a, _, _ in values], tf.float32, shape=[len(values)]),
            "sex": tf.constant([text_value(s) for _, s, _ in values], tf.string, shape=[len(values)]),
            "view": tf.constant([text_value(v) for _, _, v in values], tf.string, shape=[len(values)])}


def text_value(value):
    return "" if value is None else str(value)


def age_value(value):
    """An age as typed ("58", 58, "058Y", "", None) -> years as float; -1 when unknown or unreadable (the graph
    then calls it unknown, or not a number)."""
    if value is None:
        return -1.0
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    from cxrkeras.data.sources import _int_or_unknown  # NIH's "058Y" and DICOM's "003M" units

    text = str(value).strip()
    try:
        return float(text) if text else -1.0
    except ValueError:
        years, readable = _int_or_unknown(text, age=True)
        return float(years) if readable else float("nan")


def fit_encoder(records_dir, split="train", missing="error", log=None):
    """The encoder of a model trained on `split` of `records_dir`: the mean and sd (ddof 0) of its images' known
    ages, read from the records (meta/age, meta/sex, meta/view); with missing="error", a record with an unknown
    field is a DataError naming it, before any training."""
    import numpy as np
    import tensorflow as tf

    from cxrkeras.data import features
    from cxrkeras.data import manifest as manifest_lib

    if missing not in MISSING:
        raise ConfigError(f"data.patient_missing must be one of {', '.join(MISSING)}, got {missing!r}")
    manifest = manifest_lib.load_manifest(records_dir)
    paths = manifest_lib.shard_paths(manifest, records_dir, split)
    spec = {k: features.feature_spec(1)[k] for k in (features.IMAGE_ID, features.AGE, features.SEX, features.VIEW)}
    checker = PatientEncoder(missing=missing)
    ages, counts = [], {"images": 0, "unknown": {f: 0 for f in FIELDS}, "age_over_120": 0}
    for path in paths:
        ds = tf.data.TFRecordDataset(path).batch(4096).map(lambda s: tf.io.parse_example(s, spec))
        try:
            for batch in ds:
                age = tf.cast(batch[features.AGE], tf.float32)
                problems = checker.problems(age, batch[features.SEX], batch[features.VIEW]).numpy()
                bad = np.flatnonzero(problems != b"")
                if len(bad):
                    field, what = problems[bad[0]].decode().split(": ", 1)
                    raise DataError(
                        f"{records_dir}: split {split!r}, record {batch[features.IMAGE_ID].numpy()[bad[0]].decode()} "
                        f"(shard {path.rsplit('/', 1)[-1]}): {field} ({_KEY[field]}) is {what}; the model takes age, "
                        f"sex and view: build the records from a CSV that has them (NIH's Data_Entry: 'Patient "
                        f"Age', 'Patient Gender', 'View Position'), or {MISSING_HINT}")
                a = age.numpy()
                counts["images"] += len(a)
                counts["age_over_120"] += int((a > 120).sum())
                ages.append(a[a >= 0].astype(np.float64))
                for field, values in (("sex", batch[features.SEX]), ("view", batch[features.VIEW])):
                    counts["unknown"][field] += int((tf.strings.strip(values) == b"").numpy().sum())
                counts["unknown"]["age"] += int((a < 0).sum())
        except tf.errors.OpError as exc:
            raise DataError(f"{records_dir}: shard {path.rsplit('/', 1)[-1]} cannot be read ({type(exc).__name__}); "
                            "re-build the records with `cxrkeras build-records`") from None
    known = np.concatenate(ages) if ages else np.zeros(0)
    if len(known) < 2 or float(known.std()) <= 0:
        raise DataError(f"{records_dir}: split {split!r} has {len(known)} known age(s)"
                        + (" all equal" if len(known) >= 2 else "") + ": the age normalisation needs at least two "
                        "different ages; build the records from a CSV with 'Patient Age'")
    encoder = PatientEncoder(float(known.mean()), float(known.std()), missing,
                             fitted_on={"records": records_dir, "split": split, "images": counts["images"],
                                        "known_ages": int(len(known)), "unknown": counts["unknown"],
                                        "age_over_120": counts["age_over_120"]})
    if log and counts["age_over_120"]:
        log(f"note: {counts['age_over_120']} training image(s) give an age over 120 years (NIH's 2017 CSV has a few "
            f"such typos); they are kept in the normalisation")
    return encoder


_KEY = {"age": "meta/age", "sex": "meta/sex", "view": "meta/view"}


# --- values of files (predict, gradcam, localize): given once for all, or read from a CSV ---

_CSV_COLUMNS = {"image": ("Image Index", "image", "path", "file"), "age": ("Patient Age", "age"),
                "sex": ("Patient Gender", "sex"), "view": ("View Position", "view")}


def read_patient_csv(path):
    """{file name: (age, sex, view)} of a CSV with NIH's columns ('Image Index', 'Patient Age', 'Patient Gender',
    'View Position': its Data_Entry file) or plain ones (image, age, sex, view); rows are matched by file name."""
    import os

    from cxrkeras.data.sources import read_csv_rows

    columns, rows = read_csv_rows(path)
    found = {}
    for key, names in _CSV_COLUMNS.items():
        found[key] = next((columns.index(n) for n in names if n in columns), None)
        if found[key] is None:
            raise DataError(f"{path}: no {key} column (one of {', '.join(repr(n) for n in names)}); the header has "
                            f"{', '.join(repr(c) for c in columns)}")
    out = {}
    for _, fields in rows:
        name = os.path.basename(fields[found["image"]].strip())
        out[name] = tuple(fields[found[k]].strip() for k in ("age", "sex", "view"))
    return out


def values_for(files, given=None, csv_path=None):
    """[(age, sex, view) or None] per file: `given` (one triple) for every file, else the CSV's row of each file's
    name (None for a file the CSV lacks); a ConfigError for both or neither."""
    import os

    if (given is None) == (csv_path is None):
        raise ConfigError("the model takes age, sex and view: give them (--age, --sex, --view) for all files, or "
                          "--patient-csv FILE with a row per file" if given is None else
                          "give --age/--sex/--view or --patient-csv, not both")
    if given is not None:
        return [tuple(given)] * len(files)
    table = read_patient_csv(csv_path)
    return [table.get(os.path.basename(f)) for f in files]
