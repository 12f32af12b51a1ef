#!/usr/bin/env bash
# One prepared GPU check (about 8 minutes on an H100/H200): everything GPU-specific, checked and timed
# in one call, then a short table. Run from the project root on a machine with a CUDA GPU:
#
#   AGNEWS_DIR=... GPU_MODEL=minilm OUT=gpu_out bash bench/gpu_check.sh
#
#   1. the fused Triton attention-pooling kernel: correctness on every shape, then speed against
#      eager torch and torch.compile, in GB/s against the card's copy bandwidth
#   2. a training step of our BERT vs transformers on the same card, and length bucketing vs padding
#   3. peak memory of full fine-tuning vs LoRA (the study: 1.66 -> 0.81 GB allocated)
#   4. the experiments on every training row found: heads, LoRA, attnpool with and without the
#      penalty, LSTMs, the vote, the analysis figures
# Each step has its own time limit and the whole a budget (BUDGET_S), most important first: what does
# not fit is skipped and said so, never left half-written.
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

step "kernel: attn_pool bench" 200 python3 bench/bench_attn_pool.py
step "step: ours vs transformers" 60 python3 bench/bench_bert_step.py --device cuda --amp --model "$MODEL" --steps 20 --rows 4000
step "memory: LoRA vs full (bert-base)" 60 python3 bench/bench_lora.py --device cuda --random-init bert-base
step "memory: LoRA vs full (minilm)" 40 python3 bench/bench_lora.py --device cuda --random-init minilm

COMMON=(--model "$MODEL" --device cuda)
step "train_bert pooler" 90 python3 train_bert.py "${COMMON[@]}" --head pooler --out "$RUNS/bert_pooler"
step "train_lora r8" 90 python3 train_lora.py "${COMMON[@]}" --r 8 --out "$RUNS/lora_r8"
step "analyze tfidf" 30 python3 analyze.py --run "$RUNS/bert_pooler" --tfidf --report --confusion --errors
step "train_bert attnpool" 90 python3 train_bert.py "${COMMON[@]}" --head attnpool --out "$RUNS/bert_attnpool"
step "train_bert attnpool+penalty" 90 python3 train_bert.py "${COMMON[@]}" --head attnpool \
  --penalty-words "$RUNS/bert_pooler/analysis/penalty_words.json" --penalty 2.0 --out "$RUNS/bert_attnpool_penalty"
step "train_lstm bilstm_attn" 60 python3 train_lstm.py --device cuda --arch bilstm_attn --out "$RUNS/bilstm_attn"
step "train_lstm lstm" 60 python3 train_lstm.py --device cuda --arch lstm --out "$RUNS/lstm"
step "vote bilstm_attn + lora" 30 python3 vote.py --runs "$RUNS/bilstm_attn" "$RUNS/lora_r8"
for head in fc lstm textcnn mlp_res; do
  step "train_bert $head" 90 python3 train_bert.py "${COMMON[@]}" --head "$head" --out "$RUNS/bert_$head"
done
step "vote all" 30 python3 vote.py --runs "$RUNS"/*

# What comes back: metrics, probabilities and analysis of every run; no weights.
tar czf "$OUT/runs.tgz" --exclude='*.safetensors' -C "$OUT" runs
rm -rf "$RUNS"

{
  echo
  echo "=== summary ($((SECONDS - START)) s)"
  printf '%s\n' "${STATUS[@]}"
  echo
  printf '%-28s %8s %8s %9s %10s\n' run test_acc macro_f1 train_s samples/s
  python3 - "$OUT/runs.tgz" <<'PY'
import json, sys, tarfile
with tarfile.open(sys.argv[1]) as tar:
    for member in sorted(tar.getmembers(), key=lambda m: m.name):
        if member.name.endswith("/metrics.json"):
            m = json.load(tar.extractfile(member))
            print(f"{member.name.split('/')[-2]:28s} {m['test']['accuracy']:8.4f} {m['test']['macro_f1']:8.4f} "
                  f"{m['train_time_s']:9.1f} {m['train_samples_per_s']:10.1f}")
PY
} | tee -a "$LOG"
