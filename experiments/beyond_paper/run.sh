#!/usr/bin/env bash
# OPSD as the paper runs it beside the 2026 variants (conf/variant/), 3 seeds each, validated every 10 steps;
# then reverse KL alone, the base of the entropy gate as published, so the gate's own effect can be read.
# Usage: make experiment NAME=beyond_paper   (extra arguments are Hydra overrides)
set -euo pipefail
out=${OUT:-outputs/experiments/beyond_paper/$(date +%Y-%m-%d_%H-%M-%S)}
opsd-train -m experiment=beyond_paper hydra.sweep.dir="$out" "$@"
opsd-train -m experiment=beyond_paper hydra.sweep.dir="$out" 'hydra.sweep.subdir=reverse_kl_${hydra.job.num}' \
  variant=opsd divergence=reverse_kl "$@"
opsd-report "$out"
