#!/usr/bin/env bash
# OPSD as the paper runs it beside the 2026 variants (conf/variant/), 3 seeds each, validated every 10 steps.
# Usage: make experiment NAME=beyond_paper   (extra arguments are Hydra overrides)
set -euo pipefail
out=${OUT:-outputs/experiments/beyond_paper/$(date +%Y-%m-%d_%H-%M-%S)}
opsd-train -m experiment=beyond_paper hydra.sweep.dir="$out" "$@"
opsd-report "$out"
