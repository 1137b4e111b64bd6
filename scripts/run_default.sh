#!/usr/bin/env bash
# Sets up the environment (scripts/setup.sh), then runs mixq's main job on its built-in default:
# the shipped DINOv2 ViT-S is calibrated, scored (allocate's default: measured per-candidate costs on
# 8 images, synergy off; mixq/demo.py SCORING_IMAGES), allocated at 5 and 4.5 bits, quantized, evaluated
# against FP and uniform baselines, timed on the CPU kernels, and reported (runs/demo-<time>/).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
out="runs/demo-$(date +%Y%m%d-%H%M%S)"
exec .venv/bin/mixq demo --out "$out" "$@"
