"""The NIH ChestX-ray14 label set, in the fixed order used by the paper and most reproductions."""

NIH_LABELS = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)

NO_FINDING = "No Finding"


def with_no_finding(record_labels, where="the records"):
    """The labels of a model with the 'No Finding' class: the records' labels, then 'No Finding' (derived from
    them: none positive). Refused where it would not mean NIH's 'No Finding': records that already have such a
    label, or hold only some of NIH's 14 labels (then "none of them" is not "no finding")."""
    from cxrkeras.errors import ConfigError

    labels = list(record_labels)
    if NO_FINDING in labels:
        raise ConfigError(f"{where} already have a label {NO_FINDING!r}: data.no_finding_class would add it twice")
    if set(labels) < set(NIH_LABELS):
        raise ConfigError(f"{where} hold {len(labels)} of NIH's 14 labels ({', '.join(labels)}): an image with none "
                          f"of them may still have a finding, so {NO_FINDING!r} cannot be derived; use records of "
                          "all 14 labels for data.no_finding_class")
    return labels + [NO_FINDING]


def derives_no_finding(model_labels, record_labels):
    """Whether a model's outputs are the records' labels plus the derived 'No Finding' class."""
    return list(model_labels) == list(record_labels) + [NO_FINDING]


# `--labels Finding` on the NIH CSV: one binary label, 1 for an image with any of the 14 findings, 0 for "No Finding"
ANY_FINDING = "Finding"

# NIH's bounding-box file spells one label differently from the label file.
LABEL_ALIASES = {"Infiltrate": "Infiltration"}

# Output order of the paper's own checkpoints: `disease_labels`, the fastai vocabulary of all its notebooks.
PAPER_LABEL_ORDER = (
    "Atelectasis",
    "Consolidation",
    "Infiltration",
    "Pneumothorax",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Effusion",
    "Pneumonia",
    "Pleural_Thickening",
    "Cardiomegaly",
    "Nodule",
    "Mass",
    "Hernia",
)
