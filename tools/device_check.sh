#!/usr/bin/env bash
# The GPU check (issue 10 point 5): the parity gate, the LLM at the released 3.5B size in bf16 (batch 1
# and 8, percent of HBM bandwidth), token2wav at the released size in fp32 and bf16 (RTF), and the SFT
# step (MFU), each in its own process under one time budget, ending with ONE table.
#
#   tools/device_check.sh               # on a CUDA machine: under 8 minutes (7.5 min budget)
#   tools/device_check.sh --cpu-smoke   # tiny configs, CPU: proves the script end to end in seconds
#
# Logs of every step go to $OUT (the device runner's folder) or a fresh temporary folder.
# Needs jax, flax, optax, numpy, safetensors and PyYAML (flax brings it). The parity gate and the
# decoder bench also import soundfile, the gate tqdm: a bare image lacks them, so when
# $EDITX_WHEELS names a folder of wheels (e.g. one made here with
#   pip download --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d wheels soundfile cffi pycparser tqdm
# and carried along), the missing ones are installed from it, offline (pip --no-index), and said so.
# Random weights everywhere (drawn on the device); the figures are about speed, not output.
set -uo pipefail
cd "$(dirname "$0")/.."

MODE=gpu
case "${1:-}" in
  "") ;;
  --cpu-smoke) MODE=cpu ;;
  *) echo "usage: tools/device_check.sh [--cpu-smoke]" >&2; exit 2 ;;
esac

LOGS="${OUT:-$(mktemp -d)}/device_check"
mkdir -p "$LOGS"
BUDGET=${DEVICE_CHECK_BUDGET_S:-450}  # seconds for all steps together (8 minutes with margin)
START=$SECONDS
PY=${PYTHON:-python}

if [ "$MODE" = cpu ]; then
  export JAX_PLATFORMS=cpu
  LLM=(--config configs/tiny_llm.yaml --prompt-len 16 --new-tokens 24 --repeats 1 --prefill-repeats 1)
  DEC=(--config configs/tiny.yaml --seconds 1 --batch 1 --prompt-seconds 0.5 --repeats 1)
  TRAIN=(--config configs/sft_tiny.yaml --batch 2 --seq 32 --steps 2)
  PARITY=(tests/fixtures/dual_codebook_interleave tests/fixtures/step1_llm)
else
  # the released LLM (configs/step_audio_editx.yaml: bf16 storage and compute), performance.md's prompt
  LLM=(--config configs/step_audio_editx.yaml --prompt-len 512 --new-tokens 128 --repeats 2)
  DEC=(--seconds 5 20 --batch 1 --repeats 3)  # released flow + HiFT
  TRAIN=(--steps 5)  # performance.md's SFT step: LLM mid, 2 x 512
  PARITY=()  # every fixture in tests/fixtures
fi

# ------------------------------------------------------------------ preflight: modules the steps import
missing=$($PY - <<'EOF'
import importlib.util
need = ["jax", "flax", "optax", "numpy", "safetensors", "yaml", "soundfile", "tqdm"]
print(" ".join(m for m in need if importlib.util.find_spec(m) is None))
EOF
)
if [ -n "$missing" ] && [ -n "${EDITX_WHEELS:-}" ] && [ -d "${EDITX_WHEELS}" ]; then
  pkgs=$(echo "$missing" | sed 's/\byaml\b/PyYAML/')
  echo "installing from carried wheels in $EDITX_WHEELS (offline): $pkgs"
  $PY -m pip install -q --no-index --find-links "$EDITX_WHEELS" $pkgs > "$LOGS/pip.log" 2>&1 \
    || echo "pip install from $EDITX_WHEELS failed (see $LOGS/pip.log)"
  missing=$($PY -c "import importlib.util as u; print(' '.join(m for m in '$missing'.split() if u.find_spec(m) is None))")
fi
[ -n "$missing" ] && echo "missing Python modules: $missing (the steps that import them will FAIL below)"

$PY -c "import jax; d = jax.devices()[0]; print(f'device: {d.device_kind} x{jax.device_count()} ({d.platform}), jax {jax.__version__}')" \
  2>/dev/null || echo "device: jax does not start"

# ------------------------------------------------------------------ steps
ROWS=()

# run NAME LIMIT_S CMD...: run one step under min(LIMIT_S, what is left of the budget); log to $LOGS/NAME.log
run() {
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET - (SECONDS - START)))
  (( left < limit )) && limit=$left
  local log="$LOGS/$name.log" t0=$SECONDS rc
  if (( limit < 5 )); then
    echo "skipped: the time budget is spent" > "$log"; rc=skipped
  else
    echo "== $name (limit ${limit} s): $*"
    timeout --kill-after=10 "$limit" "$@" > "$log" 2>&1; rc=$?
    tail -n 3 "$log" | sed 's/^/   /'
  fi
  local status=ok
  case "$rc" in 0) ;; 124|137) status=TIMEOUT ;; skipped) status=SKIPPED ;; *) status="FAIL($rc)" ;; esac
  ROWS+=("$name|$status|$((SECONDS - t0))|$(summary "$name" "$log")")
}

# summary NAME LOG: the step's key figures, from its printed lines
summary() {
  local name=$1 log=$2
  case "$name" in
    parity)
      echo "$(grep -c '^PASS' "$log") pass, $(grep -c '^FAIL' "$log") fail, $(grep -c '^SKIP' "$log") skip" ;;
    llm_b*)
      local tps pct
      tps=$(sed -n 's/^decode batch [0-9]*: *\([0-9.,]*\) tokens\/s.*/\1 tok\/s/p' "$log")
      pct=$(sed -n 's/.*= \([0-9.]*%\) of HBM peak.*/\1 of HBM peak/p' "$log")
      [ -z "$pct" ] && pct=$(sed -n 's/^decode speed = \([0-9.]*%\) of the memory-bandwidth roofline.*/\1 of measured read roofline/p' "$log")
      echo "decode $tps, $pct; $(sed -n 's/^batch [0-9]*: compile + first run: //p' "$log" | tail -1 | sed 's/prefill/compile + first run: prefill/')" ;;
    decoder_*)
      sed -n 's/^ *\([0-9.]*\) s  batch *\([0-9]*\) *compile *\([0-9.]*\) s.*RTF *\([0-9.]*\).*/\1 s b\2 RTF \4 (compile \3 s)/p' "$log" \
        | paste -sd ';' - | sed 's/;/; /g' ;;
    train)
      echo "$(sed -n 's/^\(MFU [0-9.]* %\).*/\1/p' "$log"), $(sed -n 's/.*ms (first [^)]*), \([0-9,]* tokens\/s\).*/\1/p' "$log")" ;;
  esac
}

run parity 150 "$PY" -m editx_jax.parity "${PARITY[@]}"
run llm_b1 100 "$PY" tools/bench_llm.py "${LLM[@]}" --batch 1
run llm_b8 90 "$PY" tools/bench_llm.py "${LLM[@]}" --batch 8
run decoder_fp32 80 "$PY" tools/bench_decoder.py "${DEC[@]}" --dtype float32
run decoder_bf16 80 "$PY" tools/bench_decoder.py "${DEC[@]}" --dtype bfloat16
run train 70 "$PY" tools/bench_train.py "${TRAIN[@]}"

# ------------------------------------------------------------------ the table
echo
echo "device check ($MODE), $((SECONDS - START)) s in all, logs in $LOGS"
{
  echo "step|status|seconds|result"
  printf '%s\n' "${ROWS[@]}"
} | awk -F'|' '{ for (i = 1; i <= NF; i++) { cell[NR, i] = $i; if (length($i) > w[i]) w[i] = length($i) } n = NR }
  END { for (r = 1; r <= n; r++) printf "%-*s  %-*s  %*s  %s\n", w[1], cell[r, 1], w[2], cell[r, 2], w[3], cell[r, 3], cell[r, 4] }'
for row in "${ROWS[@]}"; do
  [[ "$row" == *"|ok|"* ]] || exit 1
done
