#!/usr/bin/env bash
# One command for a CUDA machine: build, check and time what the issues ask of a GPU, then print
# one table. Run from the repository root:  bash benchmarks/gpu_check.sh [OUT]
# Needs an NVIDIA GPU with a CUDA build of torch (the venv below installs one where pip's
# default index serves it). Writes JSON per step and OUT/gpu_check.md.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu_check}
mkdir -p "$OUT"
if [ ! -x .venv-gpu/bin/python ]; then
    python3 -m venv .venv-gpu
    .venv-gpu/bin/pip install -q --upgrade pip
    .venv-gpu/bin/pip install -q -e ".[test]"
fi
PY=.venv-gpu/bin/python
$PY - <<'PY' | tee "$OUT/card.txt"
import torch
assert torch.cuda.is_available(), "no CUDA GPU visible to torch"
print(torch.cuda.get_device_name(0), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| bf16", torch.cuda.is_bf16_supported())
PY
for precision in fp32 bf16 fp16; do
    $PY benchmarks/bench_batch.py speed --size 12000 --presets fast paper --device cuda \
        --precision "$precision" > "$OUT/batch_$precision.json"
done
$PY benchmarks/bench_train.py --device cuda --batch-size 48 > "$OUT/train.json" || true
$PY - "$OUT" <<'PY'
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
lines += ["", "Training (bench_train.py --device cuda --batch-size 48):", "",
          "    " + (out / "train.json").read_text().strip().replace("\n", "\n    ")]
(out / "gpu_check.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
