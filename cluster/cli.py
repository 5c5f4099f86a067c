"""`grpo` command line. Imports nothing heavy until a command runs, so --help is instant."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

TRAIN_HELP = """\
Run GRPO: generators (vLLM) -> reward workers -> DeepSpeed learner -> weights back.

With no arguments, runs the default job on this machine: a tiny Qwen2 model with a
character tokenizer, a short cold-start SFT on the built-in arithmetic task (cached),
then GRPO on held-apart prompts with accuracy and format rewards.

Overrides are key.sub=value pairs applied on top of --config, e.g.
  grpo train run.steps=20 rollout.n=4 learner.lr=1e-4 rewards.verifiers='{accuracy: 1.0}'
As a `ray job submit` entrypoint it joins that cluster (RAY_ADDRESS) instead of
starting Ray.
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grpo", description="Distributed GRPO on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser(
        "train", help="run a training job", description=TRAIN_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("--config", help="YAML config file (sections: model, data, rollout, rewards, learner, sync, run, cluster)")
    train.add_argument("--resume", metavar="RUN_DIR",
                       help="continue RUN_DIR from its last checkpoint, with its config.yaml (overrides still apply)")
    train.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")

    verify = sub.add_parser(
        "verify", help="score completions with one verifier",
        description="Score completions with one verifier, as the reward workers do (separate process, "
        "timeout). Each output line: {\"score\": float, \"error\": null | \"message\", \"info\": {...}}.",
    )
    verify.add_argument("--verifier", required=True, help="registered name, package.module:attr, or a name in --external")
    verify.add_argument("--input", help="JSONL cases: each line a row with 'completion' and the verifier's fields ('-': stdin)")
    verify.add_argument("--output", help="write JSONL scores here, in input order (default: stdout)")
    verify.add_argument("--completion", help="one completion to score (instead of --input)")
    verify.add_argument("--field", action="append", default=[], metavar="KEY=VALUE",
                        help="a field of the one case (VALUE read as JSON if it parses); repeatable")
    verify.add_argument("--args", help="JSON object of keyword arguments for the verifier")
    verify.add_argument("--external", help='JSON object as rewards.external, e.g. {"mine": {"command": ["./v"]}}')
    verify.add_argument("--timeout", type=float, default=10.0, help="seconds per call (default 10)")
    # Parsed by benchmarks/cli.py (each benchmark has its own options); listed here for --help.
    sub.add_parser("bench", help="throughput benchmarks, each against its limit (grpo bench --help)", add_help=False)
    return parser


def _train(args: argparse.Namespace) -> int:
    from cluster.config import ConfigError, load_config
    from cluster.data import DatasetError

    resume = None
    if args.resume:
        resume = Path(args.resume)
        if args.config or not (resume / "config.yaml").is_file():
            print("grpo: --resume takes a run directory with its config.yaml, and no --config", file=sys.stderr)
            return 2
        args.config = resume / "config.yaml"
    try:
        cfg = load_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as e:
        print(f"grpo: {e}", file=sys.stderr)
        return 2
    from cluster.driver import train

    from cluster.placement import PlacementError
    from rewards.api import VerifierError

    try:
        summary = train(cfg, resume=resume)
    except (ConfigError, DatasetError, FileNotFoundError, VerifierError, PlacementError) as e:
        print(f"grpo: {e}", file=sys.stderr)
        return 2
    w = 5
    print(
        f"\nsummary: {summary['steps']} steps in {summary['seconds_total']:.0f} s | "
        f"accuracy first {w}: {summary[f'accuracy_first{w}']:.3f} -> last {w}: {summary[f'accuracy_last{w}']:.3f} "
        f"(gain {summary['accuracy_gain']:+.3f}) | reward {summary[f'reward_mean_first{w}']:.3f} -> "
        f"{summary[f'reward_mean_last{w}']:.3f} | format {summary[f'format_rate_last{w}']:.3f}\n"
        f"run directory: {summary['run_dir']}  (metrics.jsonl, plot.png, final/)"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "bench":
        from benchmarks.cli import main as bench_main

        return bench_main(argv[1:])
    args = _parser().parse_args(argv)
    if args.command == "train":
        return _train(args)
    if args.command == "verify":
        from rewards.verify_cli import main as verify_main

        return verify_main(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
