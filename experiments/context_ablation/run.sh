#!/usr/bin/env bash
# OPSD context variants, 3 seeds each: the default (thinking off for both), thinking for the student
# and the teacher, thinking for the teacher only, no transition prompt, reason-first.
# Usage: make experiment NAME=context_ablation   (extra arguments are Hydra overrides)
set -euo pipefail
out=${OUT:-outputs/experiments/context_ablation/$(date +%Y-%m-%d_%H-%M-%S)}
index=0
for setting in \
  "context=default" \
  "context=thinking" \
  "context.teacher_enable_thinking=true" \
  "context=no_transition" \
  "teacher_context=reason_first"; do
  # shellcheck disable=SC2086  # a setting may hold several overrides
  opsd-train -m experiment=context_ablation hydra.sweep.dir="$out" "hydra.sweep.subdir=s${index}_\${hydra.job.num}" \
    $setting "$@"
  index=$((index + 1))
done
opsd-report "$out"
