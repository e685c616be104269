"""Print how far cxrkeras' networks are from plain-PyTorch references, and what convert-weights prints per layout.

Table 1: max |delta probability| and |delta logit| (float32) of the paper's six modules and the two baselines
(tests/torch_reference.py: random weights, batch-norm statistics from a training-mode pass), loaded through
build_model(weights=<state_dict .pth>), at 224x224 and 227x199. Then `cxrkeras convert-weights` on files in each
layout it reads, with torchvision's / timm's real tensor shapes. Needs torch. Usage: python tools/torch_equivalence.py
"""

import os
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "tests"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch_reference import REFERENCES, DenseNet121, PaperVGGLKA, VGG16BN, randomize  # noqa: E402

SIZES = ((224, 224), (227, 199))


def equivalence_table(folder):
    from cxrkeras.labels import NIH_LABELS, PAPER_LABEL_ORDER
    from cxrkeras.models import build_model

    perm = [PAPER_LABEL_ORDER.index(label) for label in NIH_LABELS]
    print(f"{'variant':24s} " + " ".join(f"{f'|dp| {h}x{w}':>14s} {f'|dlogit| {h}x{w}':>16s}" for h, w in SIZES))
    for variant, (factory, paper_layout) in REFERENCES.items():
        reference = randomize(factory(), seed=0)
        path = os.path.join(folder, f"{variant}.pth")
        torch.save(reference.state_dict(), path)
        cells = []
        for size in SIZES:
            x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                logits = reference(x).numpy()
            logits = logits[:, perm] if paper_layout else logits
            model = build_model(variant, input_shape=(*size, 3), weights=path)
            probs = np.asarray(model(x.permute(0, 2, 3, 1).numpy(), training=False))
            ours = np.log(probs) - np.log1p(-probs)
            cells.append(f"{np.max(np.abs(probs - 1 / (1 + np.exp(-logits)))):14.2e} "
                         f"{np.max(np.abs(ours - logits)):16.2e}")
        print(f"{variant:24s} " + " ".join(cells), flush=True)


def _legacy(state):
    out = {}
    for key, value in state.items():
        if ".denselayer" in key:
            for name in ("norm", "relu", "conv"):
                for i in ("1", "2"):
                    key = key.replace(f".{name}{i}.", f".{name}.{i}.")
        out[key] = value
    return out


def layout_files(folder):
    """(title, file, variant) in every layout convert-weights reads."""
    from safetensors.numpy import save_file

    dense = DenseNet121(num_classes=1000).state_dict()
    vgg = VGG16BN().features.state_dict()
    tv_vgg = {f"features.{k}": v for k, v in vgg.items()}
    tv_vgg.update({"classifier.0.weight": torch.zeros(4096, 25088), "classifier.0.bias": torch.zeros(4096),
                   "classifier.3.weight": torch.zeros(4096, 4096), "classifier.3.bias": torch.zeros(4096),
                   "classifier.6.weight": torch.zeros(1000, 4096), "classifier.6.bias": torch.zeros(1000)})
    timm_vgg = {k: v for k, v in tv_vgg.items() if k.startswith("features.")}
    timm_vgg.update({"pre_logits.fc1.weight": torch.zeros(4096, 512, 7, 7), "pre_logits.fc1.bias": torch.zeros(4096),
                     "pre_logits.fc2.weight": torch.zeros(4096, 4096, 1, 1), "pre_logits.fc2.bias": torch.zeros(4096),
                     "head.fc.weight": torch.zeros(1000, 4096), "head.fc.bias": torch.zeros(1000)})
    files = []

    def save(title, name, state, variant):
        path = os.path.join(folder, name)
        if name.endswith(".safetensors"):
            save_file({k: v.numpy() for k, v in state.items() if not k.endswith("num_batches_tracked")}, path)
        else:
            torch.save(state, path)
        files.append((title, path, variant))

    save("torchvision densenet121 state_dict", "densenet121-tv.pth", dense, "densenet121-lka-last2")
    save("torchvision densenet121, legacy keys", "densenet121-legacy.pth", _legacy(dense), "densenet121-lka-last2")
    save("timm densenet121.tv_in1k model.safetensors", "densenet121-timm.safetensors", dense, "densenet121-lka-after")
    save("torchvision vgg16_bn state_dict", "vgg16_bn-tv.pth", tv_vgg, "vgg16-lka-last3")
    save("timm vgg16_bn.tv_in1k model.safetensors", "vgg16_bn-timm.safetensors", timm_vgg, "vgg16-lka-full")
    for variant, (factory, paper_layout) in REFERENCES.items():
        if paper_layout:
            save(f"the paper's module for {variant}", f"paper-{variant}.pth", factory().state_dict(), variant)
    paper = PaperVGGLKA((3, 4, 5)).state_dict()
    save("fastai file {'model', 'opt'} with 'module.' prefix (paper VGG 3 block)", "fastai-vgg-last3.pth",
         {"model": {f"module.{k}": v for k, v in paper.items()}, "opt": {"state": [], "hypers": []}},
         "vgg16-lka-last3")
    return files


def main():
    from click.testing import CliRunner

    from cxrkeras.cli import cli

    with tempfile.TemporaryDirectory() as folder:
        equivalence_table(folder)
        for title, path, variant in layout_files(folder):
            out = path.rsplit(".", 1)[0] + ".h5"
            result = CliRunner().invoke(cli, ["convert-weights", path, "--variant", variant, "--out", out])
            print(f"\n### {title}\n$ cxrkeras convert-weights {os.path.basename(path)} --variant {variant} "
                  f"--out {os.path.basename(out)}\n{result.output.replace(folder + os.sep, '')}", flush=True)
            os.remove(path)


if __name__ == "__main__":
    main()
