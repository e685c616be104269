"""The demo's closing summary for a newcomer: what was trained on what, the test AUCs with their CIs against
chance, the localisation score beside its random baseline, where the files are, and the next step.

Usage: .venv/bin/python tools/demo_summary.py [--run runs/demo] [--export exports/demo] [--label Effusion]
Reads only what the demo's commands wrote (manifest.json, run_info.json, config.yaml, metrics.json,
localization.json); trains or computes nothing.
"""

import argparse
import glob
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, os.pardir))

from cxrkeras.fileio import read_json, read_yaml  # noqa: E402
from cxrkeras.runs import RunInfo  # noqa: E402

NEXT_STEP = ("download NIH ChestX-ray14 (112,120 images) and run `cxrkeras build-records --csv "
             "Data_Entry_2017_v2020.csv --images nih/`, then `cxrkeras train --config "
             "configs/densenet121_lka_last2.yaml --stage 1` and `--stage 2` (README: the full NIH workflow)")


def _ci(entry):
    if entry.get("auc") is None:
        return f"n/a ({entry.get('reason') or 'not evaluable'})"
    if entry.get("ci_low") is None:
        return f"{entry['auc']:.3f}"
    return f"{entry['auc']:.3f} (95% CI {entry['ci_low']:.3f}–{entry['ci_high']:.3f})"


def _verdict(entry):
    """Against chance (AUC 0.5), from the CI alone."""
    if entry.get("ci_low") is None:
        return ""
    if entry["ci_low"] > 0.5:
        return "above chance: the CI excludes 0.5"
    if entry["ci_high"] < 0.5:
        return "below chance: the CI excludes 0.5"
    return "cannot be told from chance: the CI includes 0.5"


def _split_of(records):
    """{image id: split} from the records' index.csv."""
    import csv

    with open(os.path.join(records, "index.csv"), newline="", encoding="utf-8") as f:
        return {row["image_id"]: row["split"] for row in csv.DictReader(f)}


def _split(manifest, name):
    info = manifest["splits"][name]
    return f"{info['images']:,} images / {info['patients']:,} patients"


def summary(run, export, label):
    stage1, stage2 = RunInfo.read(os.path.join(run, "stage1")), RunInfo.read(os.path.join(run, "stage2"))
    config = read_yaml(os.path.join(run, "stage2", "config.yaml"))
    manifest = read_json(os.path.join(stage2.records, "manifest.json"))
    test = os.path.join(run, "evaluation", "test")
    metrics = read_json(os.path.join(test, "metrics.json"))
    whole = manifest["whole"]
    model = config["model"]
    over = model.get("overrides") or {}
    shape = (f", dense blocks of {'-'.join(str(b) for b in over['blocks'])} layers" if over.get("blocks") else "") + (
        f", width x{over['width_multiplier']}" if over.get("width_multiplier") else "")
    lines = ["", "=" * 30 + " what the demo did " + "=" * 30,
             f"Data: {whole['images']:,} real NIH ChestX-ray14 images ({manifest['image_size'][0]} px) of "
             f"{whole['patients']:,} patients, split by patient: train {_split(manifest, 'train')}, "
             f"val {_split(manifest, 'val')}, test {_split(manifest, 'test')}.",
             f"Model: {model['variant']}{shape}, from scratch (no ImageNet weights), {config['data']['image_size']} px "
             f"input, {len(stage2.labels)} labels.",
             f"Training: stage 1 (binary cross-entropy, the {stage1.train_images:,} training images with a finding) "
             f"{stage1.epochs_run} epochs, then stage 2 (focal loss, all {stage2.train_images:,}) {stage2.epochs_run} "
             f"epochs; {stage1.seconds + stage2.seconds:.0f} s; the best stage-2 epoch by validation AUC is kept "
             f"(epoch {stage2.best_epoch}).",
             f"Test split ({metrics['n_images']:,} images never used in training; 95% CI: bootstrap by patient; "
             f"chance = AUC 0.5):"]
    mean = metrics["auc"]["mean"]
    lines.append(f"  mean AUC over {len(mean['labels_used'])} labels: {_ci(mean)}, {_verdict(mean)}")
    entry = metrics["auc"]["per_label"].get(label)
    if entry:
        lines.append(f"  {label}: {_ci(entry)}, {_verdict(entry)}")
    above = [name for name, e in metrics["auc"]["per_label"].items() if e.get("ci_low") is not None
             and e["ci_low"] > 0.5]
    lines.append(f"  labels whose CI lies above 0.5: {', '.join(above) if above else 'none'}; the others cannot be "
                 f"told from chance on {metrics['n_images']} images")
    loc_path = os.path.join(run, "localize", "localization.json")
    if os.path.isfile(loc_path):
        loc = read_json(loc_path)
        overall = loc.get("overall")
        if overall:
            in_test = sum(1 for r in loc["rows"] if _split_of(stage2.records).get(r["image"]) == "test")
            lines.append(f"Localisation ({loc['settings']['layer']}): Grad-CAM's maximum falls inside NIH's box in "
                         f"{overall['pointing']:.2f} of {overall['cases']} boxed cases ({in_test} of them in the "
                         f"test split), random maps {overall['random_pointing']:.2f}: far too few boxes to tell")
    heatmaps = sorted(glob.glob(os.path.join(run, "gradcam", "*.png")))
    lines += [f"Files: figures {test}/roc_test.png, pr_test.png, reliability_test.png; tables "
              f"{test}/comparison_test.md, metrics.json",
              f"       heatmaps {os.path.join(run, 'gradcam')}/ ({len(heatmaps)} PNG), localisation "
              f"{os.path.join(run, 'localize')}/, SavedModel for TF Serving {export}/",
              "Scale: a demo. The published models (ImageNet-initialised, 224 px or more, 112,120 images) reach a "
              "mean AUC of 0.74-0.88",
              f"       (comparison_test.md); this one learns a little from {whole['images']:,} images, as its CIs "
              f"show.",
              f"Next: {NEXT_STEP}."]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/demo")
    parser.add_argument("--export", default="exports/demo")
    parser.add_argument("--label", default="Effusion", help="the label the summary names (besides the mean)")
    args = parser.parse_args()
    print(summary(args.run, args.export, args.label))
    return 0


if __name__ == "__main__":
    sys.exit(main())
