#!/usr/bin/env bash
# Base vs GRPO vs OPSD in the calculator environment (data=arith_tools), 3 seeds, then the reports.
# Usage: make experiment NAME=tool_use   (extra arguments are Hydra overrides)
set -euo pipefail
out=${OUT:-outputs/experiments/tool_use/$(date +%Y-%m-%d_%H-%M-%S)}
# Two sweeps into one folder. Both algorithms of a seed start from that seed's base, so the base is
# evaluated once per seed, by the OPSD jobs; the GRPO jobs skip that identical evaluation.
opsd-train -m experiment=tool_use hydra.sweep.dir="$out" 'hydra.sweep.subdir=opsd_${hydra.job.num}' \
  algorithm=opsd "$@"
opsd-train -m experiment=tool_use hydra.sweep.dir="$out" 'hydra.sweep.subdir=grpo_${hydra.job.num}' \
  algorithm=grpo validate_before=false "$@"
opsd-report "$out"
python "$(dirname "$0")/tool_report.py" "$out"
