#!/usr/bin/env bash
# The GPU job behind benchmarks/results/quality.json and dlp/assets/adapters (see
# benchmarks/README.md, "Quality"). It runs in the repo root on the GPU machine, after an
# earlier run of the same lease left the first half of the SmolLM2 GGUF and the task data in
# $STAGE (the 98 MB GGUF does not fit in one transfer). Files it reads from $CARRY:
# model.gguf.b (second half), model.gguf.sha256, tokenizer/ (from the converted model dir),
# the gguf wheel, and optionally router_probs.json (`dlp eval --route-only` run elsewhere);
# without it the router is trained here on the CPU cores while the GPU trains the adapters.
# Everything it returns lands in $OUT as a few archives (the transfer limits files, not bytes).
set -uo pipefail
STAGE=${STAGE:-/tmp/qgpu}
CARRY=${CARRY:-.quality_gpu/b}
OUT=${OUT:-/tmp/qout}
DEVICE=${DEVICE:-cuda}
TASKS=${TASKS:-all}
TRAIN_ARGS=${TRAIN_ARGS:---batch-size 32 --lr 2e-3 --epochs 2 --max-steps 80 --composite-batch-size 64 --composite-max-steps 500}
EVAL_ARGS=${EVAL_ARGS:---sweep-per-task 100 --mixed 200}
TRAIN_TIMEOUT=${TRAIN_TIMEOUT:-200}
EVAL_TIMEOUT=${EVAL_TIMEOUT:-270}

export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false TQDM_MININTERVAL=10
export PYTHONPATH=/tmp/site:$PWD
mkdir -p "$OUT" "$STAGE/data" "$STAGE/results"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$CARRY"/gguf-*.whl || exit 3
cat "$STAGE/model.gguf.a" "$CARRY/model.gguf.b" > "$STAGE/model.gguf" || exit 3
echo "$(cat "$CARRY/model.gguf.sha256")  $STAGE/model.gguf" | sha256sum -c - || exit 3
cp "$STAGE/tasks.parquet" "$STAGE/data/tasks.parquet"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader || true
python3 -c 'import torch, transformers, peft; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__)'

MODEL_ARGS=(--model "$CARRY/tokenizer" --gguf "$STAGE/model.gguf" --data "$STAGE/data" --device "$DEVICE")
if [ -d "$CARRY/adapters" ]; then  # resume: adapters trained by an earlier run are kept
  mkdir -p "$STAGE/adapters" && cp -r "$CARRY"/adapters/* "$STAGE/adapters/"
  TRAIN_ARGS="$TRAIN_ARGS --skip-existing"
fi
PROBS="$CARRY/router_probs.json"
if [ ! -f "$PROBS" ]; then
  # No router outputs brought along: train the router (dlp.routing.train, its defaults, seed 0)
  # on this machine's idle CPU cores while the GPU trains the adapters.
  PROBS="$STAGE/results/router_probs.json"
  ( OMP_NUM_THREADS=8 timeout 260 python3 -c "
from dlp.routing.train import train_router
r = train_router('$STAGE/data', '$STAGE/router', seed=0, tokenizer_ref='$CARRY/tokenizer', progress=False)
print('router: test accuracy', r.test_accuracy, 'parameters', r.parameters, 'epochs', r.epochs_run)
" > "$STAGE/results/router.log" 2>&1 ) &
  ROUTER_PID=$!
fi
start=$(date +%s)
# shellcheck disable=SC2086
timeout "$TRAIN_TIMEOUT" python3 -m dlp.training.cli train-adapters --tasks "$TASKS" \
  --out "$STAGE/adapters" "${MODEL_ARGS[@]}" $TRAIN_ARGS 2>&1 | tee "$STAGE/results/train.log" | grep -v Warning
echo "train: $(( $(date +%s) - start ))s"
cp "$STAGE/adapters/training.json" "$STAGE/results/" 2>/dev/null
# Adapters back in archives of at most 16 MiB each: two halves of the task set + composite.
( cd "$STAGE/adapters" && ls -d */ | sed 's:/$::' | grep -v '^composite$' > /tmp/names \
  && split -n l/2 /tmp/names /tmp/names. \
  && tar cf "$OUT/adapters_a.tar" -T /tmp/names.aa && tar cf "$OUT/adapters_b.tar" -T /tmp/names.ab \
  && tar cf "$OUT/composite.tar" composite training.json )

if [ -n "${ROUTER_PID:-}" ]; then
  wait "$ROUTER_PID"; cat "$STAGE/results/router.log" | tail -3
  cp "$STAGE/router/router.json" "$STAGE/results/" 2>/dev/null
  # shellcheck disable=SC2086
  python3 -m dlp.eval.cli eval --route-only --tasks "$TASKS" --router "$STAGE/router" \
    --data "$STAGE/data" --router-probs "$PROBS" $EVAL_ARGS 2>&1 | grep -v Warning
fi
start=$(date +%s)
# shellcheck disable=SC2086
timeout "$EVAL_TIMEOUT" python3 -m dlp.eval.cli eval --tasks "$TASKS" --adapters "$STAGE/adapters" \
  "${MODEL_ARGS[@]}" --router-probs "$PROBS" \
  --out "$STAGE/results/quality.json" $EVAL_ARGS 2>&1 | tee "$STAGE/results/eval.log" | grep -v Warning
echo "eval: $(( $(date +%s) - start ))s"
tar cf "$OUT/results.tar" -C "$STAGE" results
ls -la "$OUT"
