"""The paper's grid: its runs (cxrkeras/resources/paper_grid.csv: Table 4's ablation, Table 5's placements, Table 2's
best model, with the paper's mean AUCs), the steps of each run, their configs, and the claims to compare.

A run is a model config (configs/paper/<config>_stage1.yaml and _stage2.yaml) in one training regime:
- two-stage: stage 1 (the paper's fine_tune recipe, BCE, images with a finding), then stage 2 (fit_one_cycle,
  focal loss, all images) from stage 1's best model;
- one-stage-bce / one-stage-focal: stage 1's recipe on all images (`--stage 2 --init none`) with BCE / focal loss;
then the evaluation of its best model on the whole test split.
"""

import csv
import dataclasses
import fnmatch
import os

from cxrkeras.errors import ConfigError, CxrError

RESOURCE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "resources", "paper_grid.csv")
GRIDS = ("paper",)
REGIMES = ("one-stage-bce", "one-stage-focal", "two-stage")
REGIME_TITLES = {"one-stage-bce": "one-stage BCE", "one-stage-focal": "one-stage focal", "two-stage": "two-stage"}


def default_configs_dir():
    """configs/paper of the cxrkeras checkout this package runs from."""
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return os.path.join(here, "configs", "paper")


@dataclasses.dataclass(frozen=True)
class Step:
    kind: str  # "train" | "evaluate"
    stage: int = None
    config_file: str = None
    overrides: tuple = ()  # ((section, key, value), ...) on top of the file
    init: str = None  # stage 2: "none" for one-stage training

    @property
    def name(self):
        return f"stage {self.stage}" if self.kind == "train" else "evaluate test"


@dataclasses.dataclass(frozen=True)
class RunSpec:
    run: str
    config: str  # the configs/paper stem
    regime: str
    table4_model: str = ""
    table5_backbone: str = ""
    table5_placement: str = ""
    table2: str = ""  # the published column of Table 2 this run reproduces
    paper_mean_auc: float = None

    def steps(self, configs_dir):
        stage1 = os.path.join(configs_dir, f"{self.config}_stage1.yaml")
        stage2 = os.path.join(configs_dir, f"{self.config}_stage2.yaml")
        if self.regime == "two-stage":
            train = [Step("train", 1, stage1), Step("train", 2, stage2)]
        else:
            kind = "bce" if self.regime == "one-stage-bce" else "focal"
            train = [Step("train", 2, stage1, (("loss", "kind", kind),), init="none")]
        return train + [Step("evaluate")]


@dataclasses.dataclass(frozen=True)
class Claim:
    """One of the paper's claims as a paired comparison: run `a` beats run `b`."""

    group: str
    a: str
    b: str


def load_grid(name="paper", path=RESOURCE):
    """[RunSpec] of a named grid, in queue order."""
    if name not in GRIDS:
        raise ConfigError(f"unknown grid {name!r}; available: {', '.join(GRIDS)}")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [RunSpec(run=r["run"], config=r["config"], regime=r["regime"], table4_model=r["table4_model"],
                    table5_backbone=r["table5_backbone"], table5_placement=r["table5_placement"], table2=r["table2"],
                    paper_mean_auc=float(r["paper_mean_auc"]) if r["paper_mean_auc"] else None) for r in rows]


def claims(specs):
    """The paired comparisons behind every claim of the paper, over the runs in `specs`."""
    by_model = {}
    for s in specs:
        if s.table4_model:
            by_model.setdefault(s.table4_model, {})[s.regime] = s.run
    out = []
    for model, runs in by_model.items():
        for other in ("one-stage-bce", "one-stage-focal"):
            out.append(Claim(f"two-stage vs {REGIME_TITLES[other]}", runs.get("two-stage"), runs.get(other)))
    for with_lka, without in (("DenseNet121 + LKA", "DenseNet121"), ("VGG16 + LKA", "VGG16")):
        for regime in REGIMES:
            out.append(Claim(f"with vs without LKA ({REGIME_TITLES[regime]})", by_model.get(with_lka, {}).get(regime),
                             by_model.get(without, {}).get(regime)))
    by_backbone = {}
    for s in specs:
        if s.table5_backbone:
            by_backbone.setdefault(s.table5_backbone, []).append(s)
    for backbone, runs in by_backbone.items():
        best = max(runs, key=lambda s: s.paper_mean_auc or 0.0)
        for other in runs:
            if other is not best:
                out.append(Claim(f"best placement vs other ({backbone})", best.run, other.run))
    return [c for c in out if c.a and c.b]


def select_runs(specs, only=None):
    """The runs named by `only` (comma-separated run names or shell patterns), in grid order; all without it."""
    if not only:
        return list(specs)
    patterns = [p.strip() for p in str(only).split(",") if p.strip()]
    chosen = [s for s in specs if any(fnmatch.fnmatchcase(s.run, p) for p in patterns)]
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(s.run, p) for s in specs)]
    if unmatched:
        raise CxrError(f"--only {', '.join(unmatched)}: no run of the grid matches; its runs are "
                       f"{', '.join(s.run for s in specs)}")
    return chosen


def split_sets(sets):
    """[(pattern or None, "key=value")] of --set items; "PATTERN:key=value" applies to the runs matching PATTERN."""
    out = []
    for item in sets or ():
        head = item.split("=", 1)[0]
        if ":" in head:
            pattern, rest = item.split(":", 1)
            out.append((pattern.strip(), rest.strip()))
        else:
            out.append((None, item))
    return out


def run_sets(sets, run):
    """The --set items of `run` (those without a pattern, and those whose pattern matches it)."""
    return [item for pattern, item in split_sets(sets) if pattern is None or fnmatch.fnmatchcase(run, pattern)]


def step_config(spec, step, records, runs_root, sets=()):
    """The typed Config of a training step: its file <- the run's records, folder and name (and the step's own
    keys) <- the user's --set items for this run."""
    from cxrkeras.config import load_config

    if not os.path.isfile(step.config_file):
        raise CxrError(f"{step.config_file} does not exist: the paper grid reads its configs from configs/paper of "
                       f"the cxrkeras repository; pass --configs DIR")
    overrides = {"data": {"records": records, "verify_records": "size"},
                 "run": {"root": runs_root, "name": spec.run}}
    for section, key, value in step.overrides:
        overrides.setdefault(section, {})[key] = value
    try:
        return load_config(step.config_file, overrides, run_sets(sets, spec.run))
    except ConfigError as exc:
        raise ConfigError(f"run {spec.run}, {step.name}: {exc}") from exc
