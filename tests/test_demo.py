"""The README's first command, tools/demo.sh: its records (default suite) and its training learning (slow)."""

import csv
import json
import os
import re
import shlex
import subprocess
import sys

import pytest
from click.testing import CliRunner

from cxrkeras.cli import cli

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
DEMO = os.path.join(ROOT, "tools", "demo.sh")
SAMPLE = os.path.join(ROOT, "cxrkeras", "sample_data")
LABEL = "Effusion"  # the label the demo shows learning on (with the mean AUC)


def demo_commands():
    """The `cxrkeras ...` commands of tools/demo.sh as argument lists (continuations joined, $S expanded)."""
    with open(DEMO, encoding="utf-8") as f:
        text = f.read().replace("\\\n", " ")
    commands = [shlex.split(line.replace("$S", SAMPLE))[1:] for line in text.splitlines()
                if line.startswith("cxrkeras ")]
    return [[os.path.join(ROOT, a) if a.startswith("configs/") else a for a in c] for c in commands]


def command(name):
    found = [c for c in demo_commands() if c[0] == name]
    assert found, f"tools/demo.sh has no `cxrkeras {name}`"
    return found


def with_option(args, option, value):
    """`args` with `option` set to `value` (replaced when present, else appended)."""
    args = list(args)
    if option in args:
        args[args.index(option) + 1] = value
        return args
    return args + [option, value]


def build_demo_records(out):
    args = with_option(command("build-records")[0], "--out", out)
    res = CliRunner().invoke(cli, args + ["--workers", "1"])
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="module")
def demo_records(tmp_path_factory):
    return build_demo_records(str(tmp_path_factory.mktemp("demo") / "records"))


def test_demo_records_and_example_images(demo_records):
    """The bundled sample as the demo splits it: all 1,418 images, patient-disjoint, a 35 % test split with the
    demo's label from enough patients; the images the demo predicts and explains are test images."""
    m = json.load(open(os.path.join(demo_records, "manifest.json")))
    assert m["whole"]["images"] == 1418 and m["whole"]["patients"] == 682 and m["skipped"] == []
    assert m["unlabelled_images"] == 0 and m["patient_overlap"]["ok"]
    assert m["splits"]["test"]["images"] == 496 and m["splits"]["test"]["positives"][LABEL] == 79
    with open(os.path.join(demo_records, "index.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    split = {r["image_id"]: r["split"] for r in rows}
    positive_patients = {r["patient_id"] for r in rows if r["split"] == "test" and LABEL in r["Finding Labels"]}
    assert len(positive_patients) >= 20  # a CI needs positives from many patients, not a few
    shown = [os.path.basename(a) for c in command("predict") + command("gradcam") for a in c if a.endswith(".png")]
    assert len(shown) == 6 and all(split[name] == "test" for name in shown), shown
    assert "--class" in command("gradcam")[0] and LABEL in command("gradcam")[0]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_demo_training_learns(tmp_path):
    """The demo's own commands (stage 1, stage 2, evaluate, summary) on the bundled data: the test AUC of the demo's
    label, and the mean over the 14, have 95 % CIs above chance. About 2-3 minutes on 2 cores (slow)."""
    records = build_demo_records(str(tmp_path / "records"))
    runs = str(tmp_path / "runs")
    for args in command("train"):
        args = with_option(with_option(args, "--records", records), "--run-dir", runs)
        res = CliRunner().invoke(cli, args)
        assert res.exit_code == 0, res.output
    (evaluate,) = command("evaluate")
    res = CliRunner().invoke(cli, with_option(evaluate, "--run", os.path.join(runs, "demo")))
    assert res.exit_code == 0, res.output
    metrics = json.load(open(os.path.join(runs, "demo", "evaluation", "test", "metrics.json")))
    effusion, mean = metrics["auc"]["per_label"][LABEL], metrics["auc"]["mean"]
    assert metrics["n_images"] == 496 and effusion["positives"] == 79
    assert effusion["ci_low"] > 0.5, effusion
    assert mean["ci_low"] > 0.5, mean
    summary = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "demo_summary.py"), "--run",
                              os.path.join(runs, "demo"), "--export", "exports/demo"], capture_output=True, text=True,
                             check=True).stdout
    assert re.search(rf"{LABEL}: 0\.\d+ \(95% CI 0\.\d+–0\.\d+\), above chance", summary), summary
    assert "1,418 real NIH ChestX-ray14 images" in summary and "Next:" in summary
