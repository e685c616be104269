"""The tf.data input pipeline of both training stages (and of evaluation), reading a records folder.

Order of operations:
  shard files (shuffled in training) -> parallel interleave of the shards' records, each with (shard, record
  number) -> ONE parallel map: parse (features.feature_spec), stage flag, decode the pixels as uint8 in the
  records' channels (PNG, or raw records: `tf.io.decode_raw`, no decoding work), [equalise], bring to one size -> record-integrity check -> drop the rows the stage filters out
  -> [cache] -> [online DADAM: training split, `dadam`] -> [shuffle] -> [repeat] -> batch (the GLOBAL batch)
  -> training: vectorised augmentation of the whole batch (random crop + zoom, rotation, flip: one bilinear warp
     per image, XLA-compiled, seeds from a seeded stream) -> 3 channels + ImageNet normalisation (one matmul)
  -> evaluation: the `Preprocessor`'s eval transform on the batch (central square, antialiased resize,
     normalise): the same chain serving, prediction and Grad-CAM apply to a file after bringing it to the records'
     size
  -> prefetch(AUTOTUNE).
Gray images stay 1-channel until the very end (3x less work); the 3 channels appear in the normalisation.

Changed input: before anything is read, every shard of the split must have the size and (verify="sha256", the
default) the sha256 that manifest.json lists, so a shard replaced by another one, even a valid one of the same
folder, is refused by name (`manifest.verify_shards`).
Corrupt input: a CRC/data-loss error in a shard or an undecodable image does not surface as a bare TF error.
Each shard is read with `ignore_errors` after `enumerate`, so a bad record leaves a gap in its shard's record
numbers (a CRC error ends the shard; an undecodable image drops that one element); a sentinel carrying the
manifest's record count closes each shard, and an in-graph check fails on the first gap with
"cxrkeras DataError: shard <file>: record <n> ..." (an InvalidArgumentError whose message names the shard and
the record number). `data_error_from(exc)` turns such an error into a `DataError`; `with data_errors():` does it
for a block.
"""

import contextlib
import math
import os

import tensorflow as tf

from cxrkeras.constants import FILL_MODES, STAGES
from cxrkeras.data import augment as augment_ops, features, manifest as manifest_lib
from cxrkeras.data import patient as patient_lib
from cxrkeras.data.equalize import check_equalize
from cxrkeras.data.normalize import check_mode, to_model_input
from cxrkeras.data.preprocessor import Preprocessor
from cxrkeras.errors import ConfigError, DataError

DEFAULT_SHUFFLE_BUFFER = 2048
_ERROR_MARK = "cxrkeras DataError: "


def _check_args(stage, batch_size, image_size, preprocessing, equalize, strategy, fill_mode, crop_scale):
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}: use 1 (images with at least one positive label; "
                          f"'No Finding' rows removed) or 2 (all images)")
    check_mode(preprocessing)
    check_equalize(equalize)
    if fill_mode not in FILL_MODES:
        raise ConfigError(f"unknown fill_mode {fill_mode!r}: choose one of {', '.join(FILL_MODES)}")
    augment_ops.check_crop_scale(crop_scale)
    if int(batch_size) < 1 or int(image_size) < 1:
        raise ConfigError(f"batch_size and image_size must be positive, got {batch_size!r}, {image_size!r}")
    if strategy is not None and int(batch_size) % strategy.num_replicas_in_sync:
        raise ConfigError(f"batch_size {batch_size} is the GLOBAL batch and must be divisible by the "
                          f"{strategy.num_replicas_in_sync} replicas of the distribution strategy")


def _shard_table(manifest, records_dir, split, verify, only=None):
    """(paths, record counts) of a split (`only`: of those of its shard files); shard files missing, or not the ones
    the manifest lists, refused up front."""
    paths = manifest_lib.shard_paths(manifest, records_dir, split)
    counts = [int(s.get("records", -1)) for s in manifest["splits"][split]["shards"]]
    if only is not None:
        keep = [i for i, p in enumerate(paths) if os.path.basename(p) in set(only)]
        if not keep:
            raise DataError(f"{records_dir}: split {split!r} has none of the shards {', '.join(sorted(only))}")
        paths, counts = [paths[i] for i in keep], [counts[i] for i in keep]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DataError(f"{records_dir}: shard {os.path.basename(missing[0])} listed in manifest.json is missing "
                        f"({len(missing)} missing in all); re-run `cxrkeras build-records`")
    manifest_lib.verify_shards(manifest, records_dir, split, verify)
    return paths, counts


def _work_size(manifest, image_size, training):
    """(height, width) every decoded image is brought to, so images batch before their transform: the stored size,
    except in training when records are much larger than the output: then 8/7 of the output size (antialiased,
    before the cache) so the augmentation warp never aliases. None when the manifest does not say."""
    stored = manifest.get("image_size") or [None, None]
    if not stored[0]:
        return None
    target = math.ceil(image_size * 8 / 7)
    if training and min(stored) > target:
        return target, target
    return int(stored[0]), int(stored[1])


def _read_records(paths, counts, shuffle, seed, deterministic):
    """(shard number, record number, serialized, is_end) of every record of `paths`; each shard read with
    `ignore_errors` (a CRC error ends that shard) and closed by a sentinel carrying the manifest's record count."""
    files = tf.data.Dataset.from_tensor_slices((tf.constant(paths), tf.constant(counts, tf.int64),
                                                tf.range(len(paths), dtype=tf.int64)))
    if shuffle:
        files = files.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)

    def one_shard(path, count, shard):
        records = tf.data.TFRecordDataset(path).enumerate().ignore_errors()
        records = records.map(lambda i, r: (shard, i, r, tf.constant(False)))
        return records.concatenate(tf.data.Dataset.from_tensors((shard, count, tf.constant(b""), tf.constant(True))))

    return files.interleave(one_shard, cycle_length=min(len(paths), 8), block_length=1,
                            num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)


def decode_image(ex, channels, encoding, preprocessor, work_size):
    """The uint8 [H, W, C] image of a parsed record as the element stream holds it: decoded in the records'
    encoding, [equalised], brought to `work_size` (also online DADAM's donors, cxrkeras.data.dadam_online)."""
    image = features.decode_pixels(ex, channels, encoding)
    image = preprocessor.equalize_stored(image)
    if work_size is not None:
        # records are one size by construction; a record of another size is resized, never fails the batch
        image = tf.cond(
            tf.reduce_all(tf.equal(tf.shape(image)[:2], work_size)),
            lambda: image,
            lambda: tf.cast(tf.round(tf.image.resize(image, work_size, antialias=True)), tf.uint8))
        image = tf.ensure_shape(image, [work_size[0], work_size[1], channels])
    return image


def _decoder(num_labels, channels, stage, preprocessor, work_size, patient=None, no_finding_class=False,
             encoding="png", datasets=None):
    """(shard, index, serialized, is_end) -> (shard, index, is_end, image uint8 HxWxC, labels, image id, patient id,
    keep, values [F], what is wrong with them ("" when nothing)). values: the model's extra inputs as float32, the
    patient features (5, with an encoder) then, with `datasets` ((model's names, records' names)), the model's
    index of the record's source dataset (exact in float32; -1 for one the model does not know)."""
    spec = features.feature_spec(num_labels)
    width = (patient.width if patient is not None else 0) + (1 if datasets is not None else 0)
    placeholder = (tf.zeros([1, 1, channels], tf.uint8), tf.zeros([num_labels + int(no_finding_class)], tf.int64),
                   tf.constant(""), tf.constant(""), tf.constant(False), tf.zeros([width]), tf.constant(""))

    def decode(ex):
        return decode_image(ex, channels, encoding, preprocessor, work_size)

    def parse_decode(serialized):
        ex = tf.io.parse_single_example(serialized, spec)
        labels = ex[features.LABELS]
        keep = tf.reduce_any(labels > 0) if stage == 1 else tf.constant(True)
        if no_finding_class:  # the 'No Finding' class: none of the records' labels is positive
            labels = tf.concat([labels, tf.cast([tf.reduce_all(labels <= 0)], tf.int64)], 0)
        # rows the stage drops are not decoded (cheap placeholder); they still pass the integrity check.
        image = tf.cond(keep, lambda: decode(ex), lambda: placeholder[0])
        if patient is None:
            values, problem = tf.zeros([0]), placeholder[6]
        else:
            fields = [ex[features.AGE][None], ex[features.SEX][None], ex[features.VIEW][None]]
            values, problem = patient.encode(*fields)[0], patient.problems(*fields)[0]
        if datasets is not None:
            index, problem = _dataset_index(ex[features.DATASET], *datasets, problem)
            values = tf.concat([values, tf.cast(index, tf.float32)[None]], 0)
        return image, labels, ex[features.IMAGE_ID], ex[features.PATIENT_ID], keep, values, problem

    def fn(shard, index, serialized, end):
        return (shard, index, end) + tuple(tf.cond(end, lambda: placeholder, lambda: parse_decode(serialized)))

    return fn


def _dataset_index(stored, model_names, records_names, problem):
    """(the model's index of a record's stored dataset index, -1 if unknown; `problem` or what is wrong)."""
    from cxrkeras.data.datasets import index_map, known

    table = tf.constant(index_map(model_names, records_names) + [-1], tf.int64)
    n = len(records_names)
    in_range = tf.logical_and(stored >= 0, stored < n)
    index = tf.gather(table, tf.where(in_range, stored, n))
    name = tf.where(in_range, tf.gather(tf.constant(records_names + [""]), tf.where(in_range, stored, n)),
                    "an index manifest.json does not name")
    what = tf.strings.join(["dataset: meta/dataset index ", tf.strings.as_string(stored), " (", name,
                            ") is none of the datasets the model was trained on (", known(model_names),
                            "); give it records of those"])
    return index, tf.where(tf.logical_and(tf.equal(problem, ""), index < 0), what, problem)


def _integrity_check(names, counts):
    """scan fn: per-shard record numbers must run 0, 1, 2, ... up to the manifest's count (the sentinel)."""
    names = tf.constant(names)

    def check(expected, element):
        shard, index, end = element[0], element[1], element[2]
        want = expected[shard]
        count = tf.gather(tf.constant(counts, tf.int64), shard)
        ok = tf.logical_or(tf.equal(index, want), tf.logical_and(end, tf.less(count, 0)))
        at = tf.strings.as_string(want)
        name = tf.gather(names, shard)
        message = tf.where(
            end,
            tf.strings.join([_ERROR_MARK, "shard ", name, ": only ", at, " of the ", tf.strings.as_string(count),
                             " records listed in manifest.json could be read; record ", at, " (0-based) is "
                             "truncated or has a CRC/data-loss error"]),
            tf.strings.join([_ERROR_MARK, "shard ", name, ": record ", at, " (0-based) is corrupt "
                             "(CRC/data-loss) or its image cannot be decoded"]))
        message = tf.strings.join([message, "; re-build the records with `cxrkeras build-records`"])
        with tf.control_dependencies([tf.debugging.Assert(ok, [message])]):
            state = tf.tensor_scatter_nd_update(expected, [[shard]], [index + 1])
        return state, element

    return check


def _patient_check(names, keys_wanted=True):
    """map fn: a record whose patient fields the encoder cannot take (or whose source dataset the model does not
    know) fails, naming the shard, record, image and field (after the integrity check, so a corrupt record is
    never blamed on its fields). keys_wanted False: a model without patient features."""
    names = tf.constant(names)
    keys = {"age": features.AGE, "sex": features.SEX, "view": features.VIEW}

    def check(shard, index, image, labels, image_id, patient_id, values, problem):
        where = tf.strings.join([_ERROR_MARK, "shard ", tf.gather(names, shard), ": record ",
                                 tf.strings.as_string(index), " (", image_id, "): "])
        if not keys_wanted:  # the model takes no patient features: only the dataset can be wrong
            message = tf.strings.join([where, tf.strings.regex_replace(problem, "^dataset: ", "")])
            with tf.control_dependencies([tf.debugging.Assert(tf.equal(problem, ""), [message])]):
                return tf.identity(image), labels, image_id, patient_id, values
        field = tf.strings.regex_replace(problem, ":.*", "")
        key = tf.gather(tf.constant(list(keys.values())),
                        tf.argmax(tf.cast(tf.equal(tf.constant(list(keys)), field), tf.int32)))
        message = tf.strings.join([
            _ERROR_MARK, "shard ", tf.gather(names, shard), ": record ", tf.strings.as_string(index), " (", image_id,
            "): ", tf.strings.regex_replace(problem, "^[a-z]+: ", tf.strings.join([field, " (", key, ") is "])),
            "; the model takes age, sex and view: build the records from a CSV that has them (NIH's Data_Entry: "
            "'Patient Age', 'Patient Gender', 'View Position'), or ", patient_lib.MISSING_HINT])
        with tf.control_dependencies([tf.debugging.Assert(tf.equal(problem, ""), [message])]):
            return tf.identity(image), labels, image_id, patient_id, values

    return check


def data_error_from(exc):
    """A `DataError` for an error raised by the integrity check (or None for any other error)."""
    text = getattr(exc, "message", None) or str(exc)
    if _ERROR_MARK not in text:
        return None
    detail = text.split(_ERROR_MARK, 1)[1]
    return DataError(detail.split("]", 1)[0].strip())


@contextlib.contextmanager
def data_errors():
    """Inside: an error raised by the in-graph record check surfaces as the DataError it stands for (shard and
    record named), without TensorFlow's traceback; any other error passes unchanged."""
    try:
        yield
    except tf.errors.OpError as exc:
        err = data_error_from(exc)
        if err is None:
            raise
        raise err from None


def cache_path(cache, manifest_sha, split, stage, work_size, channels, equalize, inputs=None):
    """The file prefix of a disk cache inside the folder `cache`: one per records folder, split, stage, stored size,
    channels and equalisation (and `inputs`: what the extra model inputs are encoded with), so that no two
    different streams of decoded images ever share a cache file."""
    key = (f"{manifest_sha[:16]}-{split}-stage{stage}-{'x'.join(str(v) for v in work_size or ('native',))}-"
           f"c{channels}-{equalize or 'plain'}")
    if inputs:  # the cached stream holds the encoded patient features / dataset indices
        import hashlib
        import json

        key += "-i" + hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:12]
    os.makedirs(cache, exist_ok=True)
    return os.path.join(cache, key)


def build_dataset(records_dir, split, *, stage=2, batch_size=32, training=False, image_size=224,
                  preprocessing="torch", shuffle_buffer=DEFAULT_SHUFFLE_BUFFER, cache=False, seed=None,
                  deterministic=None, drop_remainder=None, repeat=False, strategy=None, equalize=None,
                  return_ids=False, max_rotation=10.0, crop_scale=(0.8, 1.0), flip=True, fill_mode="reflect",
                  jit=True, verify="sha256", preprocessor=None, patient=None, no_finding_class=False,
                  augment=True, shards=None, datasets=None, dadam=None):
    """A tf.data.Dataset of (images float32 [B,S,S,3], labels float32 [B,L]) (+ {"image_id","patient_id"} string
    [B] with return_ids) from the shards of `split` of a records folder; with `patient`, the inputs are
    (images, patient features float32 [B,5]).

    stage: 1 = rows with no positive label ("No Finding") removed at read time; 2 = all rows.
    training: shuffle + augmentation (rotation ±max_rotation°, horizontal flip, random crop + zoom of
      crop_scale of the short side); else the deterministic eval transform of the `Preprocessor`.
    augment: False gives training batches (shuffled, repeated, full) the eval transform instead of augmentation.
    preprocessing: "torch" | "caffe", from the model variant (`get_variant(name).preprocessing`).
    preprocessor: a `Preprocessor` (e.g. a model's, `cxrkeras.runs.load_source(...).preprocessor`); when given it
      sets image_size, preprocessing and equalize.
    batch_size: the GLOBAL batch. Under a tf.distribute `strategy` keep it global (model.fit /
      strategy.experimental_distribute_dataset split it into batch_size / num_replicas_in_sync per replica);
      it must divide evenly, and drop_remainder defaults to True in training so every step is full.
    cache: False | True (memory) | a folder path (on disk; one cache file per records folder, split, stage, size,
      channels and equalisation); caches decoded (equalised) uint8 images, before augmentation.
    seed: fixes shard order, shuffle and augmentation (each epoch still differs, reproducibly).
    deterministic: element order; default True unless training without a seed.
    repeat: repeat forever (then pass steps_per_epoch). equalize: None | "hist" | "clahe".
    jit: XLA-compile the batch augmentation + normalisation (default; False: plain TF kernels, same results
      up to float rounding).
    verify: "sha256" (default) refuses shards whose size or sha256 differ from the manifest's, before reading;
      "size" checks only sizes (no hashing). Either way each shard's record count is checked as it is read.
    patient: a `cxrkeras.data.patient.PatientEncoder` (a model's, `load_source(...).patient`): each record's
      meta/age, meta/sex and meta/view encoded as the model's second input; a record whose fields the encoder
      cannot take fails, naming the shard, record, image and field (DataError under `data_errors()`).
    no_finding_class: add the label 'No Finding' (none of the records' labels positive) as the last label.
    shards: read only these shard files of the split (e.g. its DADAM shards, for preview-batch).
    datasets: the source dataset names of a model with the FPSM dataset embedding (`load_source(...).datasets`):
      the inputs are then (images, dataset index int32 [B,1]), each record's meta/dataset mapped by name from the
      records' manifest to the model's index; a record of a dataset the model does not know fails, naming the
      shard, record, image and the model's datasets. (Models take patient features or datasets, not both.)
    dadam: a `cxrkeras.data.dadam_online.OnlineDadam` (training only): box patches of the training split's tail
      classes put on the training images after the cache, drawn afresh each pass (its `counts` say what it made).
    """
    if preprocessor is not None:
        image_size, preprocessing, equalize = preprocessor.image_size, preprocessor.preprocessing, preprocessor.equalize
    _check_args(stage, batch_size, image_size, preprocessing, equalize, strategy, fill_mode, crop_scale)
    manifest = manifest_lib.load_manifest(records_dir)
    paths, counts = _shard_table(manifest, records_dir, split, verify, shards)
    num_labels = len(manifest["labels"])
    channels = 3 if int(manifest.get("channels", 1)) == 3 else 1
    image_size = int(image_size)
    if preprocessor is None:
        preprocessor = Preprocessor.for_records(manifest, image_size, preprocessing, equalize)
    if deterministic is None:
        deterministic = not (training and seed is None)
    if drop_remainder is None:
        drop_remainder = bool(training)
    work_size = _work_size(manifest, image_size, training and augment)  # no warp: the eval transform's input

    ds = _read_records(paths, counts, training, seed, deterministic)
    # one parallel map decodes for all shards; deterministic so each shard's records stay in order for the check
    if datasets is not None:
        from cxrkeras.data.datasets import manifest_names

        datasets = (list(datasets), manifest_names(manifest))
    decoder = _decoder(num_labels, channels, stage, preprocessor, work_size, patient, no_finding_class,
                       manifest_lib.records_encoding(manifest), datasets)
    ds = ds.map(decoder,
                num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=True).ignore_errors()  # a bad image: its element is dropped, the check names it
    names = [os.path.basename(p) for p in paths]
    ds = ds.scan(tf.zeros([len(paths)], tf.int64), _integrity_check(names, counts))
    ds = ds.filter(lambda shard, index, end, image, labels, image_id, patient_id, keep, values, problem:
                   tf.logical_and(tf.logical_not(end), keep))
    image_shape = [work_size[0], work_size[1], channels] if work_size else [None, None, channels]
    if patient is not None or datasets is not None:
        check = _patient_check(names, patient is not None)
        ds = ds.map(lambda shard, index, end, image, labels, image_id, patient_id, keep, values, problem:
                    check(shard, index, image, labels, image_id, patient_id, values, problem))
    else:
        ds = ds.map(lambda shard, index, end, image, labels, image_id, patient_id, keep, values, problem:
                    (image, labels, image_id, patient_id, values))
    ds = ds.map(lambda image, labels, image_id, patient_id, values:
                (tf.ensure_shape(image, image_shape), labels, image_id, patient_id, values))
    info = manifest["splits"][split]
    if "no_finding" in info and sum(counts) == int(info["images"]) and min(counts) >= 0:
        # a known length lets Keras show progress and size epochs (filter/scan make it unknown otherwise);
        # the manifest's no_finding counts exactly the all-zero label rows stage 1 drops
        ds = ds.apply(tf.data.experimental.assert_cardinality(manifest_lib.stage_images(info, stage)))
    if isinstance(cache, str):
        from cxrkeras.hashing import sha256_file

        sha = sha256_file(os.path.join(records_dir, manifest_lib.MANIFEST_NAME))
        inputs = {"patient": patient.to_config() if patient is not None else None, "datasets": datasets}
        ds = ds.cache(cache_path(cache, sha, split, stage, work_size, channels, preprocessor.equalize,
                                 inputs if patient is not None or datasets is not None else None))
    elif cache:
        ds = ds.cache()
    if dadam is not None:  # after the cache: each pass draws its own patches; training images only
        ds = dadam.apply(ds, split=split, training=training, stage=stage, seed=seed, work_size=work_size,
                         preprocessor=preprocessor, no_finding_class=no_finding_class)
    if training and shuffle_buffer and shuffle_buffer > 1:
        ds = ds.shuffle(int(shuffle_buffer), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()

    def finish(images, labels, image_id, patient_id, values):
        if datasets is not None:  # the dataset index travels as the last value (see _decoder)
            values = tf.cast(values[:, -1:], tf.int32)
        out = ((images, values) if patient is not None or datasets is not None else images,
               tf.cast(labels, tf.float32))
        return out + ({"image_id": image_id, "patient_id": patient_id},) if return_ids else out

    if training and augment:
        ds = ds.batch(int(batch_size), drop_remainder=drop_remainder)
        # one int64 per batch from a seeded stream that differs per epoch (rerandomize) but not per run.
        randoms = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)

        # XLA-compiled gathers are several times faster on CPU than ImageProjectiveTransformV3 or the same ops run
        # one kernel at a time; warp and normalisation are two compiled functions because fused into one, XLA
        # would redo the 1-channel gathers for each of the 3 output channels. jit=False: plain TF kernels, same
        # results up to float rounding. The random transforms are drawn outside (XLA draws other numbers).
        warp = tf.function(lambda images, t: augment_ops.warp_in_range(images, t, image_size, fill_mode),
                           jit_compile=bool(jit))
        to_input = tf.function(lambda images: to_model_input(images, preprocessing), jit_compile=bool(jit))

        def augmented(batch, r):
            images, labels, image_id, patient_id, values = batch
            shape = tf.shape(images)
            t = augment_ops.augment_transforms(shape[0], shape[1], shape[2], image_size, tf.stack([r, r // 7 + 1]),
                                           max_rotation=max_rotation, crop_scale=crop_scale, flip=flip)
            return finish(to_input(warp(images, t)), labels, image_id, patient_id, values)

        ds = tf.data.Dataset.zip((ds, randoms)).map(augmented, num_parallel_calls=tf.data.AUTOTUNE,
                                                    deterministic=deterministic)
    elif work_size is None:  # sizes unknown: transform each image, then batch
        ds = ds.map(lambda image, *rest: (preprocessor.model_input(image),) + rest,
                    num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
        ds = ds.batch(int(batch_size), drop_remainder=drop_remainder).map(finish)
    else:  # one size: batch first, then one vectorised transform per batch
        ds = ds.batch(int(batch_size), drop_remainder=drop_remainder)
        ds = ds.map(lambda images, *rest: finish(preprocessor.model_input(images), *rest),
                    num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)

    options = tf.data.Options()
    options.deterministic = bool(deterministic)
    ds = ds.with_options(options)
    return ds.prefetch(tf.data.AUTOTUNE)


def count_images(records_dir, split, stage=2):
    """Images of `split` a stage reads, from the manifest (stage 1: images minus 'No Finding' rows)."""
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}: use 1 or 2")
    info = manifest_lib.split_info(manifest_lib.load_manifest(records_dir), split, records_dir)
    return manifest_lib.stage_images(info, stage)


def label_statistics(records_dir, stage=2):
    """Positives per label per split from the manifest, as a pandas DataFrame (for loss weighting and reports).

    Index: label (manifest order). Columns: for each split, `<split>` (positives) and `<split>_prevalence`
    (positives / images the stage reads). df.attrs["images"] = {split: images the stage reads}.
    Stage 1 drops the 'No Finding' rows, which have no positives, so positives are the same in both stages.
    """
    import pandas as pd

    manifest = manifest_lib.load_manifest(records_dir)
    labels = list(manifest["labels"])
    data, images = {}, {}
    for split in manifest["splits"]:
        n = manifest_lib.stage_images(manifest["splits"][split], stage)
        pos = manifest_lib.label_positives(manifest, split)
        images[split] = n
        data[split] = pos
        data[f"{split}_prevalence"] = [p / n if n else float("nan") for p in pos]
    df = pd.DataFrame(data, index=pd.Index(labels, name="label"))
    df.attrs["images"] = images
    df.attrs["stage"] = stage
    return df
