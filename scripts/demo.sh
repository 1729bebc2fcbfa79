#!/usr/bin/env bash
# The default job: diffusion pretraining -> ECT tuning -> 1- and 2-step samples on Fashion-MNIST (2 CPU cores: ~15 min).
# Rerunning resumes/finishes whatever is left (each `ectune` training command resumes from its run directory).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-runs}

ectune pretrain --preset fashion-mnist --run "$RUNS/fm-dm"
ectune tune --preset fashion-mnist --init "$RUNS/fm-dm" --run "$RUNS/fm-ecm"
ectune sample "$RUNS/fm-ecm" --steps 1 --n 64 --seed 0 --out "$RUNS/fm-ecm-1step.png"
ectune sample "$RUNS/fm-ecm" --steps 2 --mid-t 0.821 --n 64 --seed 0 --out "$RUNS/fm-ecm-2step.png"

python3 - "$RUNS" <<'PY'
import json, sys
from pathlib import Path

runs = Path(sys.argv[1])
print("\n=== ectune demo summary ===")
for name in ("fm-dm", "fm-ecm"):
    rows = [json.loads(l) for l in (runs / name / "stats.jsonl").read_text().splitlines() if '"loss"' in l]
    last = rows[-1]
    print(f"{name:7s} images seen {last['kimg']:.1f}k  final loss {last['loss']:.4g}  model {runs / name / 'model.safetensors'}")
print(f"samples: {runs / 'fm-ecm-1step.png'} (1 step, 1 NFE), {runs / 'fm-ecm-2step.png'} (2 steps, 2 NFE)")
print(f"diffusion-model samples (Heun, 35 NFE): {runs / 'fm-dm' / 'samples-heun.png'}")
PY
