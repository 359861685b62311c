#!/usr/bin/env bash
# Issue 13's GPU checks in one command, then one table: bench_batch.py speed on a 12000² mosaic
# (fast and paper, each precision) and bench_train.py (batches of 48 crops of 256²), with the
# card named. Writes JSON per step, log.txt and OUT/gpu_check.md.
#
#   bash benchmarks/gpu_check.sh --fetch-wheels [PYTHON_VERSION]
#       where pip reaches the package registries: the wheels a bare CUDA image lacks (MONAI,
#       nibabel, tiffslide and theirs) into .whl/, for that image's Python (default 3.12)
#   bash benchmarks/gpu_check.sh [OUT]
#       on the CUDA machine, offline: its python3 (or $PY) must hold torch with CUDA; rcmseg runs
#       from this source tree, and what is missing is installed from .whl/ into a scratch folder
#   RCMSEG_GPU_CHECK_SMOKE=1 bash benchmarks/gpu_check.sh OUT
#       the same steps on this machine's CPU at toy sizes, to check the script itself
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
WHEELS=(monai==1.6.1 nibabel==5.4.2 tiffslide==3.0.1 zarr==3.1.6 numcodecs==0.16.6
        donfig==0.8.1.post1 google-crc32c==1.9.0)  # imagecodecs (26 MB): not read here

if [ "${1:-}" = "--fetch-wheels" ]; then
    version=${2:-3.12}
    rm -rf .whl
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$version" \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
    du -sh .whl
    exit 0
fi

OUT=${1:-gpu_check}
mkdir -p "$OUT"
# shellcheck source=benchmarks/gpu_env.sh
. benchmarks/gpu_env.sh

if [ -n "${RCMSEG_GPU_CHECK_SMOKE:-}" ]; then
    DEVICE=cpu SIZE=1024 PRECISIONS="fp32 bf16" TRAIN="--batch-size 2 --steps 1 --threads 2"
else
    DEVICE=cuda SIZE=12000 PRECISIONS="fp32 bf16 fp16" TRAIN="--batch-size 48 --steps 20 --workers 12"
fi
DEVICE=$DEVICE "$PY" - <<'PY' | tee "$OUT/card.txt"
import os, platform, torch
if os.environ["DEVICE"] == "cuda":
    assert torch.cuda.is_available(), "no CUDA GPU visible to torch"
    print(torch.cuda.get_device_name(0), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
          "| bf16", torch.cuda.is_bf16_supported())
else:
    print("CPU smoke run:", platform.processor() or platform.machine(), "| torch", torch.__version__)
PY
for precision in $PRECISIONS; do
    timeout 240 "$PY" benchmarks/bench_batch.py speed --size "$SIZE" --presets fast paper \
        --device "$DEVICE" --precision "$precision" > "$OUT/batch_$precision.json" \
        2>> "$OUT/log.txt" || echo "bench_batch $precision failed (see log.txt)" | tee -a "$OUT/log.txt"
done
# shellcheck disable=SC2086
timeout 180 "$PY" benchmarks/bench_train.py --device "$DEVICE" $TRAIN > "$OUT/train.json" \
    2>> "$OUT/log.txt" || echo "bench_train failed (see log.txt)" | tee -a "$OUT/log.txt"
"$PY" - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
lines = [f"# GPU check: {(out / 'card.txt').read_text().strip()}", "",
         "| preset | precision | read s | infer s | write s | total s | peak RSS MB | GPU MB |",
         "|---|---|---|---|---|---|---|---|"]
for path in sorted(out.glob("batch_*.json")):
    for row in (json.loads(l) for l in path.read_text().splitlines() if l.startswith("{")):
        lines.append(f"| {row['preset']} | {row.get('precision', '?')} | {row['read_seconds']:.2f} | "
                     f"{row['infer_seconds']:.2f} | {row['write_seconds']:.2f} | "
                     f"{row['seconds']:.2f} | {row['peak_rss_mb']:.0f} | "
                     f"{row.get('cuda_peak_mb', 0):.0f} |")
train = (out / "train.json").read_text().strip() or "(no output: see log.txt)"
lines += ["", "Training (bench_train.py):", "", "    " + train.replace("\n", "\n    ")]
(out / "gpu_check.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
