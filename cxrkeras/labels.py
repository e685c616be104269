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
