#!/usr/bin/env bash
# Sets up the environment (scripts/setup.sh), then runs mixq's main job on its built-in default:
# the shipped DINOv2 ViT-S is calibrated, scored, allocated at ~6 and ~4 bits, quantized, evaluated
# against FP and uniform baselines, timed on the CPU kernels, and reported (runs/demo-<time>/).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
out="runs/demo-$(date +%Y%m%d-%H%M%S)"
exec .venv/bin/mixq demo --out "$out" "$@"
