#!/usr/bin/env bash
# The tool-use demo (README, "Environments and tools"): two-digit multiplication, which the
# tiny model cannot do in its head, with and without the built-in `python` tool. Each run
# cold-starts its own model (with the tool: the call, the output, the answer; without: the
# answer alone), then trains 40 GRPO steps; held-out pass@1 is printed before and after.
#   bash examples/tool_use/demo.sh [OUTPUT_DIR]        (about 10 minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/../.."
out="${1:-runs/tool_demo}"
common=(data.task=multiplication data.max_operand=99 "rewards.verifiers={accuracy: 1.0}" rewards.concurrency=4
        run.prompts_per_step=16 rollout.n=8 rollout.max_tokens=48 run.steps=40 model.cold_start.steps=300
        eval.every=10 eval.max_prompts=100 run.output_dir="$out")
.venv/bin/grpo train "${common[@]}" run.name=tool env.name=python env.max_turns=2 env.max_episode_tokens=96
.venv/bin/grpo train "${common[@]}" run.name=no_tool
for run in tool no_tool; do
    .venv/bin/python - "$out/$run" <<'PY'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
evals = [json.loads(line) for line in (run / "evals.jsonl").read_text().splitlines()]
rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
print(f"{run.name}: held-out pass@1 {evals[0]['eval/pass@1']:.3f} -> {evals[-1]['eval/pass@1']:.3f} "
      f"({len(rows)} steps in {sum(r['time/step'] for r in rows):.0f} s)")
PY
done
