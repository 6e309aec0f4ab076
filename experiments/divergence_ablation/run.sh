#!/usr/bin/env bash
# OPSD with forward KL, reverse KL, top-k, sampled-token and JSD β ∈ {0.1, 0.5, 0.9}, 3 seeds each.
# Usage: make experiment NAME=divergence_ablation   (extra arguments are Hydra overrides)
set -euo pipefail
out=${OUT:-outputs/experiments/divergence_ablation/$(date +%Y-%m-%d_%H-%M-%S)}
# Two sweeps into one folder: each names its job folders, so they do not collide.
opsd-train -m experiment=divergence_ablation hydra.sweep.dir="$out" 'hydra.sweep.subdir=kl_${hydra.job.num}' "$@"
opsd-train -m experiment=divergence_ablation hydra.sweep.dir="$out" 'hydra.sweep.subdir=jsd_${hydra.job.num}' \
  divergence=jsd divergence.beta=0.1,0.5,0.9 "$@"
opsd-report "$out"
