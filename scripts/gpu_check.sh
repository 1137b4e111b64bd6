#!/usr/bin/env bash
# The one command a session with a lent GPU runs first (docs/GPU.md has the exact `run` call).
#
#   bash scripts/gpu_check.sh            # on the GPU machine, writes everything into $OUT
#   OUT=$(mktemp -d) bash scripts/gpu_check.sh --dry-run   # CPU, Triton interpreter, tiny sizes (CI)
#
# mixq is imported from this checkout (PYTHONPATH), without the C++ extension and without HiGHS:
# nothing is built or downloaded. If .whl/ holds wheels (segment-anything), they are installed into
# /tmp/site first (no index, no network). Stages each have their own timeout and run whatever an
# earlier one did; the exit status is the number of failed stages. At most 8 files land in $OUT:
#   env.txt      nvidia-smi, versions, stage timings and statuses
#   log.txt      everything every stage printed
#   smoke.md     a: every (w, a) against the reference; kernel registers/spills/smem/wgmma
#   junit.xml    b: pytest tests/test_triton_kernels.py
#   gemm.md      c + e: the GEMM table with the shipped configs, then with the tuned ones
#   h200.json    d: the tuned config table (also written to mixq/kernels/configs/<gpu>.json)
#   tune.log     d: what the tuner skipped, and why
#   e2e.md       f: ViT-B/16 b1/b64, ViT-B Linear stack, SAM ViT-B encoder: bf16 vs W8/W6/W4 A8;
#                g: attention kernels vs the reference, quantized attention vs SDPA (appended)
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
if [[ -z "${OUT:-}" ]]; then
  echo "OUT must name the folder for the results" >&2
  exit 2
fi
mkdir -p "$OUT"
PY=${PYTHON:-}
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 MIXQ_NO_PROGRESS=1
LOG="$OUT/log.txt"
ENVF="$OUT/env.txt"
: >"$LOG"
: >"$ENVF"

# stage time limits in seconds; on the GPU they add up to 545 s, inside one `run` call's 600 s with
# the environment step and the wheel install (the usual run is shorter: each limit is a worst case)
if [[ $DRY == 1 ]]; then
  export TRITON_INTERPRET=1
  T_SMOKE=120 T_STATIC=120 T_TEST=120 T_TABLE=120 T_TABLE2=120 T_TUNE=120 T_E2E=180 T_ATTN=120 TUNE_BUDGET=6
  DRYFLAG=--dry-run
  TUNED="$OUT/h200.json"
else
  unset TRITON_INTERPRET
  T_SMOKE=55 T_STATIC=40 T_TEST=80 T_TABLE=70 T_TABLE2=45 T_TUNE=105 T_E2E=75 T_ATTN=75 TUNE_BUDGET=85
  DRYFLAG=
  TUNED="$OUT/h200.json"
fi

FAILED=0
stage() {  # stage NAME TIMEOUT COMMAND...: run with a timeout, log, record status; never abort the script
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  echo "=== stage $name (timeout ${limit}s) $(date -u +%H:%M:%S)" | tee -a "$LOG"
  timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  local what=ok
  [[ $rc == 124 || $rc == 137 ]] && what="TIMEOUT"
  [[ $rc != 0 && $what == ok ]] && what="FAILED"
  [[ $rc != 0 ]] && FAILED=$((FAILED + 1))
  echo "stage $name: $what (rc=$rc, $((SECONDS - t0)) s)" | tee -a "$LOG" "$ENVF"
}

# ---------------------------------------------------------------- environment
{
  echo "# gpu_check $(date -u '+%Y-%m-%d %H:%M:%S UTC') dry_run=$DRY"
  echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo '?') $(git status --porcelain 2>/dev/null | wc -l) changed files"
  if [[ $DRY == 0 ]]; then nvidia-smi 2>&1 || echo "nvidia-smi failed"; fi
  nproc 2>/dev/null | sed 's/^/cpus: /'
} >>"$ENVF"

if [[ $DRY == 0 ]] && compgen -G ".whl/*.whl" >/dev/null; then
  echo "installing carried wheels: $(ls .whl)" | tee -a "$ENVF"
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >>"$LOG" 2>&1; then
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
  else
    echo "wheel install failed (see log.txt); going on without them" | tee -a "$ENVF"
  fi
fi

"$PY" - >>"$ENVF" 2>&1 <<'EOF'
import importlib, platform, sys
sys.modules["highspy"] = None      # the GPU path must not need HiGHS ...
sys.modules["mixq._C"] = None      # ... nor the C++ extension
print("python", platform.python_version())
for name in ("torch", "triton", "numpy", "timm", "segment_anything", "pytest", "xdist"):
    try:
        m = importlib.import_module(name)
        print(name, getattr(m, "__version__", "present"))
    except Exception as e:
        print(name, "MISSING", type(e).__name__)
import torch
print("cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, "sm", f"{p.major}{p.minor}", "SMs", p.multi_processor_count,
          "mem GiB", round(p.total_memory / 2**30, 1))
import mixq, mixq.ops, mixq.nn
from mixq.backends import available_backends, get_backend
get_backend("triton")
from mixq.kernels import tuning
print("mixq imports without highspy/_C: ok; backends for cuda:",
      available_backends("cuda") if torch.cuda.is_available() else "n/a")
if torch.cuda.is_available():
    print("config table:", tuning.table_path_for(torch.cuda.get_device_name()))
EOF
echo "env rc=$?" >>"$ENVF"

# ---------------------------------------------------------------- a. smoke + static
stage smoke "$T_SMOKE" "$PY" bench/gpu_check.py smoke $DRYFLAG --out "$OUT/smoke.md"
# the GPU run leaves the attention kernels' static compile out (stage g reads their JIT figures instead)
if [[ $DRY == 1 ]]; then QUICK=(--quick --attention also); else QUICK=(--shipped --attention no); fi
stage static "$T_STATIC" env TRITON_INTERPRET=0 "$PY" bench/gpu_static.py "${QUICK[@]}" --out "$OUT/smoke.md"

# ---------------------------------------------------------------- b. kernel tests
if [[ $DRY == 1 ]]; then
  # the interpreter is slow: a few tests prove the stage's wiring (the full file runs in CI anyway)
  stage pytest "$T_TEST" "$PY" -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py \
    -k "prepack_round_trips and 8-128 or shipped_tables" --junitxml="$OUT/junit.xml"
else
  XD=
  "$PY" -c "import xdist" 2>/dev/null && XD="-n 8"
  stage pytest "$T_TEST" "$PY" -m pytest -q -p no:cacheprovider $XD tests/test_triton_kernels.py --junitxml="$OUT/junit.xml"
fi

# ---------------------------------------------------------------- c. GEMM table, shipped configs
stage table-shipped "$T_TABLE" "$PY" bench/gpu_check.py table $DRYFLAG --configs shipped --out "$OUT/gemm.md"

# ---------------------------------------------------------------- d. tune (saves after every shape)
stage tune "$T_TUNE" "$PY" bench/gpu_check.py tune $DRYFLAG --budget-s "$TUNE_BUDGET" --out "$TUNED"
if [[ -f "$TUNED.log" ]]; then mv "$TUNED.log" "$OUT/tune.log"; fi
if [[ $DRY == 0 && -s "$TUNED" ]]; then
  # the repo copy a session commits after reading the table (only for the GPU it ran on)
  DEST=$("$PY" -c "import torch; from mixq.kernels import tuning; print(tuning.table_path_for(torch.cuda.get_device_name()) or '')" 2>>"$LOG")
  if [[ -n "$DEST" ]]; then cp "$TUNED" "$DEST" && echo "tuned table copied to $DEST" | tee -a "$ENVF"; fi
fi

# ---------------------------------------------------------------- e. GEMM table, tuned configs
if [[ -s "$TUNED" ]]; then
  stage table-tuned "$T_TABLE2" env MIXQ_GEMM_TABLE="$TUNED" "$PY" bench/gpu_check.py table $DRYFLAG --configs tuned --out "$OUT/gemm.md"
else
  echo "stage table-tuned: skipped (no tuned table)" | tee -a "$LOG" "$ENVF"
fi

# ---------------------------------------------------------------- f. end to end
E2E_TABLE=()
[[ -s "$TUNED" ]] && E2E_TABLE=(env MIXQ_GEMM_TABLE="$TUNED")
stage e2e "$T_E2E" "${E2E_TABLE[@]}" "$PY" bench/gpu_check.py e2e $DRYFLAG --out "$OUT/e2e.md"

# ---------------------------------------------------------------- g. attention (appended to e2e.md: 8 files at most)
stage attention "$T_ATTN" "$PY" bench/gpu_check.py attention $DRYFLAG --out "$OUT/e2e.md"

echo "gpu_check done: $FAILED failed stage(s), $SECONDS s; files: $(ls "$OUT" | tr '\n' ' ')" | tee -a "$LOG" "$ENVF"
for f in smoke.md gemm.md e2e.md; do [[ -f "$OUT/$f" ]] && { echo "----- $f"; tail -n 60 "$OUT/$f"; }; done
exit "$FAILED"
