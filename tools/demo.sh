#!/usr/bin/env bash
# The main job on the bundled real sample (1,418 NIH images at 64 px, 682 patients): records -> stage 1 -> stage 2
# -> evaluate -> export -> predict -> Grad-CAM -> localisation, then a summary. Each step is a plain `cxrkeras`
# command a user would run. Seeded: every run gives the same figures (on one machine; another CPU may differ in the
# last digits). About 4 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
S=cxrkeras/sample_data
start=$(date +%s)

# a patient-wise split with a large test split (35 %): narrower confidence intervals
cxrkeras build-records --csv $S/nih-64px/Data_Entry_2017.csv --images $S/nih-64px/images \
    --out tfrecords/sample-64px --image-size 64 --shard-size 256 --split-fractions 0.5,0.15,0.35 --no-progress
cxrkeras inspect-records tfrecords/sample-64px
cxrkeras train --config configs/demo.yaml --stage 1 --epochs 10
cxrkeras train --config configs/demo.yaml --stage 2
cxrkeras evaluate --run runs/demo --split test
cxrkeras export --run runs/demo --out exports/demo
# three images of the test split (never trained on): two 512 px originals and a 64 px one with an effusion
cxrkeras predict --model exports/demo $S/nih-512px/images/00004296_000.png $S/nih-512px/images/00008386_000.png \
    $S/nih-64px/images/00000005_007.png
# Grad-CAM of Effusion (the label it learned best) on block 3's LKA output: 4x4 at 64 px input (the last block's,
# the default layer, is 2x2: quadrants)
cxrkeras gradcam --model runs/demo --layer conv4_lka --class Effusion --out runs/demo/gradcam \
    $S/nih-512px/images/00004296_000.png $S/nih-512px/images/00008386_000.png $S/nih-64px/images/00000005_007.png
cxrkeras localize --model runs/demo --layer conv4_lka --boxes $S/BBox_List_2017.csv --images $S/nih-64px/images \
    --out runs/demo/localize

python3 tools/demo_summary.py --run runs/demo --export exports/demo --label Effusion
echo "demo finished in $(( $(date +%s) - start )) s: runs/demo, exports/demo, tfrecords/sample-64px"
