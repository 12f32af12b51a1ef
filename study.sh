#!/usr/bin/env bash
# The study's whole table in one command: every experiment with several seeds, then the comparison.
#
#   bash study.sh quick      # 2-core CPU, about 40 min: 2,000 training rows, 1 epoch (the LSTMs from
#                            # scratch: 5, seconds each), 1,000 validation rows, the full test set
#   bash study.sh medium     # 2-core CPU, hours, in sittings (resumable): every training row found
#                            # (24,175 of ours), 1 epoch (the LSTMs 5), the whole validation split
#   bash study.sh large      # 2-core CPU, as medium on AGNEWS_DIR=../shared/data/ag_news_67k
#                            # (60,566 training rows; refused on a folder of fewer than 60,000
#                            # rows): about 5 hours, in sittings
#   bash study.sh full       # one GPU: every training row found, 2 epochs, runs side by side
# The presets differ only in sizes, device and data; the experiments below are one list for all.
# Every finished run is also scored on today's news (cases/news_2020s.csv): compare.md's last columns.
#
# Experiments (each --seeds $SEEDS, each seed an ordinary run folder $ROOT/<name>/seed<k>/):
#   bert_pooler bert_fc bert_lstm bert_textcnn bert_mlp_res bert_attnpool   full fine-tuning, one per head
#   bert_attnpool_penalty   attnpool penalising the Business<->Sci/Tech words that analyze.py --tfidf
#                           mined from the VALIDATION errors of bert_pooler/seed<first>
#   lora_r8                 LoRA by hand, r 8 on query+value
#   lstm bilstm_attn        from scratch
#   vote_bilstm_attn+lora   weighted soft vote of bilstm_attn and lora_r8, seed k with seed k
# then `analyze.py --compare $ROOT --baseline bert_pooler`: $ROOT/compare.md, .csv, .png.
#
# It stops at the first failure (the other runs in flight are stopped too, each writing its resume
# point), and so does Ctrl-C; it is resumable: run the same command again and finished seeds are kept
# (not trained again), an interrupted one resumes from its resume point.
# Settings (environment): ROOT (default runs/study-<preset>), SEEDS (default 0,1,2), JOBS (training
# processes at once: 1 on a CPU, where two would fight over the cores; several on a GPU, which one
# 6-layer model at batch 32 leaves mostly idle), EXTRA (more flags for every training run).
set -euo pipefail
set -m  # each background run in its own process group, so that stopping it reaches its python too
cd "$(dirname "$0")"
PRESET=${1:-}
case "$PRESET" in
  quick) DATA_FLAGS=(--train-size 2000 --val-size 1000 --epochs 1); LSTM_FLAGS=(--train-size 2000 --val-size 1000)
         JOBS=${JOBS:-1}; DEVICE=(--device cpu) ;;
  medium) DATA_FLAGS=(--epochs 1); LSTM_FLAGS=(); JOBS=${JOBS:-1}; DEVICE=(--device cpu) ;;
  large) DATA_FLAGS=(--epochs 1); LSTM_FLAGS=(); JOBS=${JOBS:-1}; DEVICE=(--device cpu)
         source plumbing/require_rows.sh
         require_rows "study.sh large" 60000 ;;
  full)  DATA_FLAGS=(--epochs 2); LSTM_FLAGS=(); JOBS=${JOBS:-5}; DEVICE=(--device cuda) ;;
  *) echo "usage: bash study.sh quick|medium|large|full   (quick: CPU, under an hour; medium: CPU, every row, hours; large: medium on the 67k folder; full: one GPU, every row)" >&2; exit 2 ;;
esac
ROOT=${ROOT:-runs/study-$PRESET}
case "$ROOT" in *" "*) echo "ROOT must not contain spaces: $ROOT" >&2; exit 2 ;; esac
SEEDS=${SEEDS:-0,1,2}
FIRST_SEED=${SEEDS%%,*}
read -r -a EXTRA_FLAGS <<< "${EXTRA:-}"
mkdir -p "$ROOT/logs"
export PYTHONUNBUFFERED=1

# run NAME COMMAND...: one experiment, all its seeds, output in $ROOT/logs/NAME.log
run() {
  local name=$1; shift
  echo "$(date +%T) $name: $*"
  "$@" --seeds "$SEEDS" --out "$ROOT/$name" --resume "${DEVICE[@]}" "${EXTRA_FLAGS[@]}" \
    > "$ROOT/logs/$name.log" 2>&1 || { echo "FAILED: $name (see $ROOT/logs/$name.log)" >&2; tail -5 "$ROOT/logs/$name.log" >&2; return 1; }
  grep -h "^test accuracy" "$ROOT/logs/$name.log" | sed "s/^/  $name: /" || true
}

# stop: SIGTERM to every run in flight (python writes its resume point and exits), then leave.
stop() {
  local pid
  for pid in $(jobs -rp); do kill -TERM -- "-$pid" 2>/dev/null || true; done
  wait || true
  exit "${1:-1}"
}
trap 'echo "stopped: run the same command again to resume" >&2; stop 130' INT TERM

# batch "NAME COMMAND" ...: up to $JOBS experiments at once; the first failure stops the study.
batch() {
  local spec
  for spec in "$@"; do
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || stop 1; done
    # shellcheck disable=SC2086
    run $spec &   # word-split on purpose: NAME, then the command and its flags
  done
  while [ -n "$(jobs -rp)" ]; do wait -n || stop 1; done
}

START=$SECONDS
batch "bert_pooler python train_bert.py --head pooler ${DATA_FLAGS[*]}"
PENALTY="$ROOT/bert_pooler/seed$FIRST_SEED/analysis/penalty_words.json"
echo "$(date +%T) penalty words: analyze.py --tfidf on the validation errors of bert_pooler/seed$FIRST_SEED"
python analyze.py --run "$ROOT/bert_pooler/seed$FIRST_SEED" --tfidf --split val > "$ROOT/logs/tfidf.log" 2>&1 \
  || { echo "FAILED: tfidf (see $ROOT/logs/tfidf.log)" >&2; exit 1; }

batch \
  "bert_attnpool_penalty python train_bert.py --head attnpool --penalty-words $PENALTY ${DATA_FLAGS[*]}" \
  "bert_attnpool python train_bert.py --head attnpool ${DATA_FLAGS[*]}" \
  "lora_r8 python train_lora.py --r 8 ${DATA_FLAGS[*]}" \
  "bert_fc python train_bert.py --head fc ${DATA_FLAGS[*]}" \
  "bert_lstm python train_bert.py --head lstm ${DATA_FLAGS[*]}" \
  "bert_textcnn python train_bert.py --head textcnn ${DATA_FLAGS[*]}" \
  "bert_mlp_res python train_bert.py --head mlp_res ${DATA_FLAGS[*]}" \
  "lstm python train_lstm.py --arch lstm ${LSTM_FLAGS[*]}" \
  "bilstm_attn python train_lstm.py --arch bilstm_attn ${LSTM_FLAGS[*]}"

echo "$(date +%T) vote: bilstm_attn + lora_r8, seed k with seed k"
python vote.py --runs "$ROOT/bilstm_attn" "$ROOT/lora_r8" --out "$ROOT/vote_bilstm_attn+lora" --force \
  > "$ROOT/logs/vote.log" 2>&1 || { echo "FAILED: vote (see $ROOT/logs/vote.log)" >&2; exit 1; }
python analyze.py --compare "$ROOT" --baseline bert_pooler --out "$ROOT" | tee "$ROOT/logs/compare.log"
echo "study $PRESET: $((SECONDS - START)) s; table in $ROOT/compare.md"
