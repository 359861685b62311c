#!/usr/bin/env bash
# Issue 11's final comparison at a GPU budget: benchmarks/texture_bench.py on CUDA, three seeds,
# 256 px crops, full-width networks (MED-Net 3 and 1 levels, the best MED-Net with U-Net-like
# levels, U-Net, DeepLab, DynUNet and the default dynunet_ds), one table per seed in
# OUT/study.md (in-domain and other-digitisation Dice, seconds per network).
#
#   bash benchmarks/gpu_study.sh --prepare [TEXTURES]
#       here: the texture data set into gpu_study/ (13 MB; TEXTURES defaults to
#       ../shared/data/textures); carry gpu_study/ and .whl/ (gpu_check.sh --fetch-wheels)
#   bash benchmarks/gpu_study.sh [OUT]
#       on the CUDA machine, offline. Budget: EPOCHS x ITERATIONS steps of BATCH crops of PATCH
#       px per network (default 20 x 15 x 48 of 256 px: 14400 crops, three times the pixels of
#       the CPU tables' 3x budget); a finished network is not trained again (resumable)
#   RCMSEG_GPU_CHECK_SMOKE=1 bash benchmarks/gpu_study.sh OUT
#       the same steps on this machine's CPU at a toy budget, to check the script itself
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
SEEDS=${SEEDS:-0 1 2}
VARIANTS=${VARIANTS:-mednet mednet1 mednet_unet_in unet deeplab dynunet dynunet_ds}
# the CPU tables' data set: 32 training and 12 test mosaics of 512 px, textures shrunk 2x
TRAIN_MOSAICS=32 TEST_MOSAICS=12 SIZE=512 SHRINK=2
DATA_ARGS=(--train-mosaics "$TRAIN_MOSAICS" --test-mosaics "$TEST_MOSAICS" --size "$SIZE" --shrink "$SHRINK")

if [ "${1:-}" = "--prepare" ]; then
    # one data set for every seed, as the CPU tables (mednet_ablation.py) use
    "$PY" - "${2:-../shared/data/textures}" gpu_study/data \
        "$TRAIN_MOSAICS" "$TEST_MOSAICS" "$SIZE" "$SHRINK" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, "benchmarks")
from texture_mosaics import write_texture_dataset
textures, out = Path(sys.argv[1]), Path(sys.argv[2])
train, test, size, shrink = (int(value) for value in sys.argv[3:])
if not (out / "manifest.csv").is_file():
    write_texture_dataset(textures, out, train, test, size, 0, shrink=shrink)
print(out, "ready")
PY
    du -sh gpu_study
    exit 0
fi

OUT=${1:-gpu_study_out}
mkdir -p "$OUT"
# shellcheck source=benchmarks/gpu_env.sh
. benchmarks/gpu_env.sh
if [ -n "${RCMSEG_GPU_CHECK_SMOKE:-}" ]; then
    DEVICE=cpu EPOCHS=${EPOCHS:-1} ITERATIONS=${ITERATIONS:-2} BATCH=${BATCH:-2} PATCH=${PATCH:-128}
else
    DEVICE=cuda EPOCHS=${EPOCHS:-20} ITERATIONS=${ITERATIONS:-15} BATCH=${BATCH:-48} PATCH=${PATCH:-256}
fi
for seed in $SEEDS; do
    mkdir -p "gpu_study/seed$seed"
    ln -sfn "$PWD/gpu_study/data" "gpu_study/seed$seed/data"
    # shellcheck disable=SC2086
    timeout "${SEED_TIMEOUT:-150}" "$PY" benchmarks/texture_bench.py gpu_study/textures \
        "${DATA_ARGS[@]}" --out "gpu_study/seed$seed" --seed "$seed" --device "$DEVICE" \
        --epochs "$EPOCHS" --iterations "$ITERATIONS" --batch-size "$BATCH" --patch "$PATCH" \
        --lr 2e-3 --variants $VARIANTS >> "$OUT/log.txt" 2>&1 \
        || echo "seed $seed stopped early (see log.txt); rerun to go on" | tee -a "$OUT/log.txt"
done
{
    echo "# GPU study: EPOCHS=$EPOCHS ITERATIONS=$ITERATIONS BATCH=$BATCH PATCH=$PATCH on $DEVICE"
    "$PY" -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'CPU')"
    for seed in $SEEDS; do
        study=gpu_study/seed$seed/study
        echo; echo "## seed $seed"
        for file in comparison.md in_domain.md timings.json; do
            [ -f "$study/$file" ] && { echo; cat "$study/$file"; }
        done
    done
} > "$OUT/study.md"
cat "$OUT/study.md"
