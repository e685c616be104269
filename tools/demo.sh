#!/usr/bin/env bash
# The main job on the bundled real sample (268 NIH images at 64 px): records -> stage 1 -> stage 2 -> evaluate ->
# export -> predict -> Grad-CAM -> localisation. Each line is a plain `cxrkeras` command a user would run.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH" TF_CPP_MIN_LOG_LEVEL=2
S=cxrkeras/sample_data
start=$(date +%s)

cxrkeras build-records --csv $S/nih-64px/Data_Entry_2017.csv --images $S/nih-64px/images \
    --out tfrecords/sample-64px --image-size 64 --shard-size 64
cxrkeras inspect-records tfrecords/sample-64px
cxrkeras train --config configs/demo.yaml --stage 1
cxrkeras train --config configs/demo.yaml --stage 2
cxrkeras evaluate --run runs/demo --split test
cxrkeras export --run runs/demo --out exports/demo
cxrkeras predict --model exports/demo $S/nih-512px/images/00001369_000.png $S/nih-512px/images/00009745_000.png
cxrkeras gradcam --model runs/demo --top-k 2 --out runs/demo/gradcam $S/nih-512px/images/00009745_000.png
cxrkeras localize --model runs/demo --boxes $S/BBox_List_2017.csv --images $S --out runs/demo/localize

echo "demo finished in $(( $(date +%s) - start )) s: runs/demo, exports/demo, tfrecords/sample-64px"
