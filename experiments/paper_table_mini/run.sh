#!/usr/bin/env bash
# Base vs SFT vs GRPO vs OPSD, 3 seeds, then the report. Extra arguments are Hydra overrides.
# Usage: make experiment NAME=paper_table_mini   (or: bash experiments/paper_table_mini/run.sh)
set -euo pipefail
out=${OUT:-outputs/experiments/paper_table_mini/$(date +%Y-%m-%d_%H-%M-%S)}
opsd-train -m experiment=paper_table_mini hydra.sweep.dir="$out" "$@"
opsd-report "$out"
