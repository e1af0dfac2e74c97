#!/usr/bin/env bash
# The course on one CUDA GPU, in one go (planned for about 5 minutes on an H100, not yet run on one; every stage
# has its own time limit, together 550 s, so that one call of at most 10 minutes holds it). Run from anywhere; it
# works in the repository root:
#
#   bash benchmarks/gpu_check.sh --prepare     on the machine you start from (no GPU needed): copies the data the
#                                             notebooks read (the-verdict.txt, GPT-2's encoder.json and vocab.bpe)
#                                             into .gpu_carry/data, which git ignores
#   bash benchmarks/gpu_check.sh               on the GPU machine: the stages below, logs under $OUT (else ./gpu_out)
#
# A GPU machine without network access needs .gpu_carry copied along with the checkout (it is git-ignored, so
# name it explicitly in whatever copies the tree there). Wheels in .gpu_carry/whl are installed first (pip
# --no-index into /tmp/site), e.g. the book's package for the decode race against it:
# pip download --no-deps -d .gpu_carry/whl llms-from-scratch==1.0.19. Without it that race is skipped, saying
# so. Everything else needs torch, numpy, matplotlib, tiktoken, regex, tqdm and safetensors; the notebooks run
# through nbclient where Jupyter is installed, else cell by cell in one Python process (no IPython needed).
# GPU_CHECK_ALLOW_CPU=1 dry-runs every stage on a CPU with tiny sizes (to test this script, not a GPU).
#
# Stages (each writes one log; a failed stage is reported and the next one still runs; exit 1 if any failed):
#   preflight   versions, the GPU, bf16_helps, a tiny forward/backward         (exit 2 at once without CUDA)
#   ladder      appendix E's training ladder on GPT-2 124M (context 1024, batch 8): s/step, tokens/s, MFU
#               against each rung's measured peak (float32 or bfloat16) and against the GPU's bf16 peak
#   compile     the ladder's last rung eager against torch.compile: compile time, first losses (must agree),
#               step times and MFU
#   decode      part 27's KV cache against the uncached loop, float32/bfloat16/batch 8; then
#               benchmarks/bench_generate.py --device cuda (ours against the book's package) if that is installed
#   nb_27, nb_E the notebooks of part 27 and appendix E at the test profile (smoke), on this GPU
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
ROOT=$PWD

if [ "${1:-}" = "--prepare" ]; then
  src=${LLM_FROM_SCRATCH_DATA:-$ROOT/../shared/data}
  mkdir -p .gpu_carry/data .gpu_carry/whl
  for f in the-verdict.txt encoder.json vocab.bpe; do
    cp -f "$src/$f" .gpu_carry/data/ || { echo "gpu_check --prepare: $src/$f not found; set LLM_FROM_SCRATCH_DATA to the folder that holds it" >&2; exit 1; }
  done
  echo "prepared .gpu_carry/ ($(du -sh .gpu_carry | cut -f1)); take it along to the GPU machine and run: bash benchmarks/gpu_check.sh"
  exit 0
fi

OUT=${OUT:-$ROOT/gpu_out}
mkdir -p "$OUT"
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x "$ROOT/.venv/bin/python" ]; then PY=$ROOT/.venv/bin/python
else PY=python3; fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg HF_HUB_OFFLINE=1
if [ -z "${LLM_FROM_SCRATCH_DATA:-}" ] && [ -d "$ROOT/.gpu_carry/data" ]; then
  export LLM_FROM_SCRATCH_DATA=$ROOT/.gpu_carry/data
fi
export LLM_FROM_SCRATCH_CACHE=${LLM_FROM_SCRATCH_CACHE:-/tmp/llm_from_scratch_cache}
if compgen -G "$ROOT/.gpu_carry/whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$ROOT"/.gpu_carry/whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

SUMMARY=$OUT/summary.txt
: >"$SUMMARY"
failed=0
started=$(date +%s)
# stage NAME SECONDS LOG COMMAND...: run with a time limit, log stdout+stderr, record the outcome
stage() {
  local name=$1 limit=$2 log=$3; shift 3
  local t0 rc
  [ "${GPU_CHECK_ALLOW_CPU:-}" = 1 ] && limit=$((limit * 4))      # a CPU dry run is slower
  t0=$(date +%s)
  echo "=== $name (limit ${limit} s): $*" | tee -a "$log"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  local msg="ok"
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then msg="TIMED OUT after ${limit} s"
  elif [ "$rc" -eq 2 ]; then msg="NO GPU (exit 2): CUDA is not available"
  elif [ "$rc" -ne 0 ]; then msg="FAILED (exit $rc)"; fi
  [ "$msg" = ok ] || failed=1
  echo "$name: $msg in $(( $(date +%s) - t0 )) s (log: $(basename "$log"))" | tee -a "$SUMMARY"
  return "$rc"
}

stage preflight 40 "$OUT/preflight.log" "$PY" benchmarks/gpu_check.py preflight
rc=$?
if [ "$rc" -eq 2 ] || { [ "$rc" -ne 0 ] && [ "${GPU_CHECK_ALLOW_CPU:-}" != 1 ]; }; then
  echo "gpu_check: stopped after the preflight (see $OUT/preflight.log)" | tee -a "$SUMMARY"
  exit 2
fi
stage ladder 100 "$OUT/ladder.log" "$PY" benchmarks/gpu_check.py ladder
stage compile 170 "$OUT/compile.log" "$PY" benchmarks/gpu_check.py compile
stage decode 50 "$OUT/decode.log" "$PY" benchmarks/gpu_check.py decode
if "$PY" -c "import llms_from_scratch" 2>/dev/null; then
  if ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    bench_args=(--device cpu --rounds 1 --new-tokens 10)                  # the dry run: plumbing only
  else
    bench_args=(--device cuda --rounds 3 --bf16)
  fi
  stage bench_generate 40 "$OUT/decode.log" "$PY" benchmarks/bench_generate.py "${bench_args[@]}"
else
  echo "bench_generate: skipped, the book's package is not installed (put its wheel in .gpu_carry/whl)" | tee -a "$SUMMARY"
fi
export LLM_FROM_SCRATCH_PROFILE=smoke
stage nb_27 60 "$OUT/nb_27_whats_next.log" "$PY" benchmarks/gpu_check.py notebook nbs/27_whats_next.ipynb
stage nb_E 90 "$OUT/nb_appendix_e_speed.log" "$PY" benchmarks/gpu_check.py notebook nbs/appendix_e_speed.ipynb
echo "gpu_check: done in $(( $(date +%s) - started )) s; $([ $failed = 0 ] && echo 'every stage ok' || echo 'SOME STAGE FAILED')" | tee -a "$SUMMARY"
exit $failed
