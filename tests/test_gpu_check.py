"""scripts/gpu_check.sh --dry-run: every stage of the GPU session's one command, on CPU, tiny sizes.

A lent GPU session gets one shot; a typo in the script must fail here, in CI, not there. The dry
run goes through the same Python (bench/gpu_check.py, bench/gpu_static.py) under the Triton
interpreter and leaves its files in $OUT.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
FILES = {"env.txt", "log.txt", "smoke.md", "junit.xml", "gemm.md", "h200.json", "tune.log", "e2e.md"}


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_gpu_check_dry_run_goes_through_every_stage(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    log = (tmp_path / "log.txt").read_text() if (tmp_path / "log.txt").exists() else proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    files = {p.name for p in tmp_path.iterdir()}
    assert files == FILES, files  # the device tool brings back at most 8 files
    status = (tmp_path / "env.txt").read_text()
    for stage in ("smoke", "static", "pytest", "table-shipped", "tune", "table-tuned", "e2e", "attention"):
        assert f"stage {stage}: ok" in status, status
    assert "mixq imports without highspy/_C: ok" in status
    smoke = (tmp_path / "smoke.md").read_text()
    assert smoke.startswith("DRY RUN") and "0 failing combinations" in smoke
    assert smoke.count("| ok |") == 12  # 9 (w, a) pairs on one shape, (w, 8) on the other
    assert "0 failing combinations in all" in smoke
    assert sum(line.endswith("| exact |") for line in smoke.splitlines()) == 10  # fused + swap/asm variants (first shape in a dry run)
    assert "Static sm_90a compile" in smoke and "| 8 | 64x64 |" in smoke
    assert "| qk | ViT-B 12x197x64 |" in smoke and "| pv | ViT-B 12x197x64 | P8 log2 |" in smoke
    gemm = (tmp_path / "gemm.md").read_text()
    assert "configs shipped" in gemm and "configs tuned" in gemm and "error" not in gemm
    for name in ("cuBLAS bf16", "_int_mm", "fp8 _scaled_mm", "mixq W8A8 GEMM", "mixq W6A8 quantize+GEMM",
                 "mixq W4A8 fused quantize+GEMM",
                 "mixq W4A8 GEMM"):
        assert name in gemm
    tuned = json.loads((tmp_path / "h200.json").read_text())
    assert "DRY RUN" in tuned["source"] and tuned["entries"]
    assert "skip" in (tmp_path / "tune.log").read_text()  # the deliberately broken candidate was skipped
    e2e = (tmp_path / "e2e.md").read_text()
    assert "error" not in e2e and "ViT-B/16" in e2e and "Linear stack" in e2e
    assert "SAM ViT-B image encoder" in e2e
    # stage g appends the attention checks and timings to e2e.md (no ninth file)
    assert "### Attention matmuls" in e2e and "0 failing attention checks" in e2e
    assert e2e.count("| exact |") == 11 and "MISMATCH" not in e2e  # 3 qk + 6 pv, then qk + pv on a second shape
    for name in ("SDPA bf16", "SDPA fp16", "SDPA fp32", "mixq quantized attention", "QK^T kernel",
                 "PV kernel P8 log2", "PV kernel P8 uniform"):
        assert name in e2e
    assert "failures" not in (tmp_path / "junit.xml").read_text()[:400] or 'failures="0"' in (tmp_path / "junit.xml").read_text()
