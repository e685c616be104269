"""The tf.data input pipeline of both training stages (and of evaluation), reading a records folder.

Order of operations:
  shard files (shuffled in training) -> parallel interleave of the shards' records, each with (shard, record
  number) -> ONE parallel map: parse (features.feature_spec), stage flag, decode the pixels as uint8 in the
  records' channels (PNG, or raw records: `tf.io.decode_raw`, no decoding work), [equalise], bring to one size
  -> record-integrity (+ patient-field, source-dataset) check on batches of 64 elements, dropping the rows the
  stage filters out, back to one element per image (the order and the first error named are those of a
  record-at-a-time check; batched because each per-element tf.data op costs about as much CPU as decoding a raw
  record)
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
manifest's record count closes each shard, and an in-graph check fails on the first gap (in element order) with
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


_SHARD_SHIFT, _END_BIT = 40, 1 << 39  # a record's place packed in one int64: shard << 40 | [end bit] | number


def _read_records(paths, counts, shuffle, seed, deterministic):
    """(place, serialized) of every record of `paths`, place = shard number << 40 | record number (`_unpack`);
    each shard read with `ignore_errors` (a CRC error ends that shard) and closed by a sentinel (the end bit set,
    carrying the manifest's record count). One int64 from `enumerate(start=...)` instead of a map adding the
    shard: a map per record costs about as much as reading the record."""
    files = tf.data.Dataset.from_tensor_slices((tf.constant(paths), tf.constant(counts, tf.int64),
                                                tf.range(len(paths), dtype=tf.int64)))
    if shuffle:
        files = files.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)

    def one_shard(path, count, shard):
        start = tf.bitwise.left_shift(shard, _SHARD_SHIFT)
        records = tf.data.TFRecordDataset(path).enumerate(start=start).ignore_errors()
        return records.concatenate(tf.data.Dataset.from_tensors((start + _END_BIT + count + 1, tf.constant(b""))))

    return files.interleave(one_shard, cycle_length=min(len(paths), 8), block_length=1,
                            num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)


def _unpack(place):
    """(shard, record number, is_end) of a place of `_read_records` (a sentinel's number: the manifest's count)."""
    low = tf.bitwise.bitwise_and(place, 2 * _END_BIT - 1)
    end = low >= _END_BIT
    return tf.bitwise.right_shift(place, _SHARD_SHIFT), tf.where(end, low - _END_BIT - 1, low), end


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
    """(place, serialized) -> (shard, index, is_end, image uint8 HxWxC, labels, image id, patient id,
    keep, values [F], what is wrong with them ("" when nothing)). values: the model's extra inputs as float32, the
    patient features (5, with an encoder) then, with `datasets` ((model's names, records' names)), the model's
    index of the record's source dataset (exact in float32; -1 for one the model does not know)."""
    spec = features.feature_spec(num_labels)
    width = (patient.width if patient is not None else 0) + (1 if datasets is not None else 0)
    # a placeholder image of the work size, so that decoded elements batch for the integrity check
    placeholder = (tf.zeros([*(work_size or (1, 1)), channels], tf.uint8),
                   tf.zeros([num_labels + int(no_finding_class)], tf.int64), tf.constant(""), tf.constant(""),
                   tf.constant(False), tf.zeros([width]), tf.constant(""))

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

    def fn(place, serialized):
        shard, index, end = _unpack(place)
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


CHECK_BATCH = 64  # elements checked together (one scan step instead of one per record)


def _first(flags):
    """Position of the first True of a vector (its length when none)."""
    n = tf.shape(flags, out_type=tf.int64)[0]
    return tf.reduce_min(tf.where(flags, tf.range(n, dtype=tf.int64), n))


def _integrity_message(names, counts, shard, want, end):
    """What is wrong when a shard's record `want` is not the next element of that shard (`end`: the sentinel)."""
    at = tf.strings.as_string(want)
    name = tf.gather(names, shard)
    count = tf.gather(counts, shard)
    message = tf.cond(
        end,
        lambda: tf.strings.join([_ERROR_MARK, "shard ", name, ": only ", at, " of the ", tf.strings.as_string(count),
                                 " records listed in manifest.json could be read; record ", at, " (0-based) is "
                                 "truncated or has a CRC/data-loss error"]),
        lambda: tf.strings.join([_ERROR_MARK, "shard ", name, ": record ", at, " (0-based) is corrupt "
                                 "(CRC/data-loss) or its image cannot be decoded"]))
    return tf.strings.join([message, "; re-build the records with `cxrkeras build-records`"])


def _patient_message(names, shard, index, image_id, problem, keys_wanted=True):
    """What is wrong with a record's patient fields (`problem`: the encoder's "<field>: ..." text) or source
    dataset (keys_wanted False: a model without patient features, where only the dataset can be wrong)."""
    if not keys_wanted:
        return tf.strings.join([_ERROR_MARK, "shard ", tf.gather(names, shard), ": record ",
                                tf.strings.as_string(index), " (", image_id, "): ",
                                tf.strings.regex_replace(problem, "^dataset: ", "")])
    keys = {"age": features.AGE, "sex": features.SEX, "view": features.VIEW}
    field = tf.strings.regex_replace(problem, ":.*", "")
    key = tf.gather(tf.constant(list(keys.values())),
                    tf.argmax(tf.cast(tf.equal(tf.constant(list(keys)), field), tf.int32)))
    return tf.strings.join([
        _ERROR_MARK, "shard ", tf.gather(names, shard), ": record ", tf.strings.as_string(index), " (", image_id,
        "): ", tf.strings.regex_replace(problem, "^[a-z]+: ", tf.strings.join([field, " (", key, ") is "])),
        "; the model takes age, sex and view: build the records from a CSV that has them (NIH's Data_Entry: "
        "'Patient Age', 'Patient Gender', 'View Position'), or ", patient_lib.MISSING_HINT])


def _checked(names, counts, check_patient, image_shape, keys_wanted=True):
    """scan fn over batches of decoded elements: per-shard record numbers must run 0, 1, 2, ... up to the
    manifest's count (the sentinel); with `check_patient`, a kept record whose patient fields the encoder cannot
    take (or whose source dataset the model does not know; keys_wanted False: a model without patient features)
    fails too. The first failure in element order is raised, as a check one element at a time would (a
    corrupt record is never blamed on its fields). Returns the batch's kept rows (image, labels, image_id,
    patient_id, values), the images of `image_shape`."""
    shards = len(names)
    names = tf.constant(names)
    counts = tf.constant(counts, tf.int64)

    def check(expected, batch):
        shard, index, end, image, labels, image_id, patient_id, keep, values, problem = batch
        hot = tf.one_hot(shard, shards, dtype=tf.int64)  # [K, shards]
        # the record each element must be: the shard's next one, plus its shard's earlier elements in this batch
        want = tf.gather(expected, shard) + tf.reduce_sum(tf.cumsum(hot, axis=0, exclusive=True) * hot, axis=1)
        ok = tf.logical_or(tf.equal(index, want), tf.logical_and(end, tf.less(tf.gather(counts, shard), 0)))
        rows = tf.logical_and(tf.logical_not(end), keep)
        bad = _first(tf.logical_not(ok))
        wrong = _first(tf.logical_and(rows, tf.not_equal(problem, ""))) if check_patient else tf.size(ok, tf.int64)

        def fail():  # messages are built only on failure: string ops on every element cost more than the check
            at = tf.minimum(bad, wrong)
            message = tf.cond(
                bad <= wrong,
                lambda: _integrity_message(names, counts, shard[at], want[at], end[at]),
                lambda: _patient_message(names, shard[at], index[at], image_id[at], problem[at], keys_wanted))
            return tf.debugging.Assert(False, [message])

        failed = tf.less(tf.minimum(bad, wrong), tf.size(ok, tf.int64))
        with tf.control_dependencies([tf.cond(failed, fail, tf.no_op)]):
            state = expected + tf.reduce_sum(hot, axis=0)
        image = tf.ensure_shape(tf.boolean_mask(image, rows), [None, *image_shape])
        return state, (image,) + tuple(tf.boolean_mask(x, rows) for x in (labels, image_id, patient_id, values))

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
    image_shape = [work_size[0], work_size[1], channels] if work_size else [None, None, channels]
    # checked in batches (images of unknown size cannot batch: then one by one); the stream is one element per
    # image again after the check
    ds = ds.batch(CHECK_BATCH if work_size else 1)
    ds = ds.scan(tf.zeros([len(paths)], tf.int64),
                 _checked(names, counts, patient is not None or datasets is not None, image_shape,
                          patient is not None))
    # (not `unbatch`: TF 2.21's unbatch crashes on the zero-width patient features of a model without them)
    ds = ds.flat_map(lambda *rows: tf.data.Dataset.from_tensor_slices(rows))
    info = manifest["splits"][split]
    if "no_finding" in info and sum(counts) == int(info["images"]) and min(counts) >= 0:
        # a known length lets Keras show progress and size epochs (the check makes it unknown otherwise);
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
