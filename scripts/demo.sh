#!/usr/bin/env bash
# The default job: diffusion pretraining -> ECT tuning -> 1- and 2-step samples on Fashion-MNIST, sized to fit
# --minutes (default 10) on this machine from a short measured warm-up. Rerunning resumes the same plan.
# Options pass through, e.g. `bash scripts/demo.sh --minutes 20` or `--pretrain-kimg 48 --tune-kimg 24`.
set -euo pipefail
cd "$(dirname "$0")/.."
exec ectune demo --runs "${RUNS:-runs}" "$@"
