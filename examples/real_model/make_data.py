#!/usr/bin/env python
"""The real-model recipe's data, written here (not copied from any data set): sums of two
two-digit numbers, which SmolLM2-135M-Instruct gets wrong on its own.

    python examples/real_model/make_data.py OUT_DIR

-> OUT_DIR/sft.jsonl (prompt, completion: a carry-by-carry scratchpad in <think> and the
sum in <answer>), OUT_DIR/rl.jsonl and OUT_DIR/eval.jsonl (GSM8K's shape: `question`, and
`answer` ending in `#### N`; load them with data.format=gsm8k). The three sets share no
pair of operands."""
import json
import random
import sys
from pathlib import Path


def scratchpad(a: int, b: int) -> str:
    units = a % 10 + b % 10
    carry = units // 10
    tens = a // 10 + b // 10 + carry
    return (f"<think>{a % 10} + {b % 10} = {units}, write {units % 10} carry {carry}. "
            f"{a // 10} + {b // 10} + {carry} = {tens}.</think><answer>{a + b}</answer>")


def main(out: Path) -> None:
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    random.Random(0).shuffle(pairs)
    sft, rl, held = pairs[:400], pairs[400:800], pairs[800:900]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "sft.jsonl", "w") as f:
        f.writelines(json.dumps({"prompt": f"What is {a} + {b}?", "completion": scratchpad(a, b)}) + "\n" for a, b in sft)
    for name, part in (("rl", rl), ("eval", held)):
        with open(out / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps({"question": f"What is {a} + {b}?", "answer": f"{a} + {b} = {a + b}\n#### {a + b}"})
                         + "\n" for a, b in part)
    print(f"wrote {len(sft)} SFT, {len(rl)} RL and {len(held)} held-out rows to {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/real_model_data"))
