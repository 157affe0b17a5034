#!/usr/bin/env bash
# The classification benchmarks of docs/benchmarks.md, in order. Usage:
#   tools/bench_classification.sh FRUIT_DIR RACCOON_DIR SQUEEZENET1_1_WEIGHTS OUT
# Every run is one tools/ command; results land in OUT/<run>/metrics.json and OUT/<run>/*.json.
set -euo pipefail
FRUIT=$1; RACCOON=$2; W=$3; OUT=$4
PY=${PYTHON:-python}
mkdir -p "$OUT"
COMMON=(--backbone squeezenet1_1 --weights "$W" --threads 1 --device cpu)
# Frozen ImageNet trunk, fc head trained 3 epochs at lr 0.0003 (divided by 10 after epoch 2): at
# 0.001 the 25,600-d SPP vectors of the any-size regime made the first epoch diverge (loss 30).
TRAIN=(train.epochs=3 "train.lr_steps=[2]" train.lr=0.0003)

$PY tools/make_classification_data.py --crops "$FRUIT" "$RACCOON" --out "$OUT/crops"
$PY tools/make_classification_data.py --synthetic --out "$OUT/scales"

train() {  # name data [flags...] -- [overrides...]
  local name=$1 data=$2; shift 2
  local flags=() sets=()
  while [[ $# -gt 0 && $1 != -- ]]; do flags+=("$1"); shift; done
  [[ $# -gt 0 ]] && shift
  sets=("$@")
  [[ -f "$OUT/$name/metrics.json" ]] || $PY tools/train_classifier.py --data "$data" --out "$OUT/$name" "${COMMON[@]}" \
      "${flags[@]}" --set "${TRAIN[@]}" "${sets[@]}"
}
ev() {  # name data view [extra...]
  local name=$1 data=$2 view=$3; shift 3
  local tag=${EVTAG:-$view}
  [[ -f "$OUT/$name/$tag.json" ]] || $PY tools/eval_classifier.py --model "$OUT/$name/classifier.pt" --data "$data" \
      --split test --view "$view" --out "$OUT/$name/$tag.json" --threads 1 --device cpu "$@"
}

# (a) crops of the fruit and raccoon boxes: no-SPP vs SPP, single vs multi vs any-size
train crops_nospp "$OUT/crops" --no-spp
train crops_single "$OUT/crops" --regime single
train crops_multi "$OUT/crops" --regime multi
train crops_any "$OUT/crops" --regime any
train crops_any_pad "$OUT/crops" --regime any -- train.batching=pad
# batch size 1: the learning rate scaled with the batch (0.0003 * 1/32), so an epoch moves as far
train crops_any_bs1 "$OUT/crops" --regime any -- train.batch_size=1 train.lr=0.000009375
train crops_svm "$OUT/crops" --regime any --head svm
for run in crops_single crops_multi crops_any crops_any_pad crops_any_bs1 crops_svm; do ev $run "$OUT/crops" full; done
ev crops_single "$OUT/crops" ten
for run in crops_single crops_any; do ev $run "$OUT/crops" multi --scales 224 256 300; done
EVTAG=center_scales ev crops_nospp "$OUT/crops" center --rescale 0.5 0.71 1 1.41 2
for run in crops_single crops_multi crops_any; do EVTAG=full_scales ev $run "$OUT/crops" full --rescale 0.5 0.71 1 1.41 2; done

# (c) synthetic shapes whose size varies 4x
train scales_nospp "$OUT/scales" --no-spp
for r in single multi any; do train scales_$r "$OUT/scales" --regime $r; done
EVTAG=center_scales ev scales_nospp "$OUT/scales" center --rescale 0.5 0.71 1 1.41 2
for r in single multi any; do EVTAG=full_scales ev scales_$r "$OUT/scales" full --rescale 0.5 0.71 1 1.41 2; done

# (b) the fruit set's image-level labels (VOC layout): per-class AP and mAP
train fruit_nospp "$FRUIT" --no-spp
train fruit_single "$FRUIT" --regime single
train fruit_svm "$FRUIT" --regime any --head svm
for run in fruit_single fruit_svm; do ev $run "$FRUIT" full; done
