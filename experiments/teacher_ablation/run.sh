#!/usr/bin/env bash
# OPSD with a dynamic, fixed and EMA teacher, 3 seeds each.
# Usage: make experiment NAME=teacher_ablation   (extra arguments are Hydra overrides)
set -euo pipefail
out=${OUT:-outputs/experiments/teacher_ablation/$(date +%Y-%m-%d_%H-%M-%S)}
opsd-train -m experiment=teacher_ablation hydra.sweep.dir="$out" "$@"
opsd-report "$out"
