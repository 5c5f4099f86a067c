"""`grpo` command line. Imports nothing heavy until a command runs, so --help is instant.

Commands outside cluster/ (the benchmarks) are found through the `grpo.commands`
entry point group, so that cluster/ never imports them."""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

TRAIN_HELP = """\
Run GRPO: generators (vLLM) -> reward workers -> DeepSpeed learner -> weights back.

With no arguments, runs the default job on this machine: a tiny Qwen2 model with a
character tokenizer, a short cold-start SFT on the built-in arithmetic task (cached),
then GRPO on held-apart prompts with accuracy and format rewards, evaluated on
prompts neither stage trains on.

Overrides are key.sub=value pairs applied on top of --config, e.g.
  grpo train run.steps=20 rollout.n=4 learner.lr=1e-4 rewards.verifiers='{accuracy: 1.0}'
As a `ray job submit` entrypoint it joins that cluster (RAY_ADDRESS) instead of
starting Ray.
"""


TRUST_HELP = ("load the checkpoint even if it holds more than plain tensors and containers, by unpickling it, "
              "which runs whatever code the file names: only for checkpoints you wrote yourself with an older "
              "version (by default nothing is unpickled and such a file is refused, naming it)")

OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.\w+)+=")
WITH_OVERRIDES = ("train", "eval", "sft", "distill", "replay")


def _plugin_commands() -> dict[str, str]:
    from importlib.metadata import entry_points

    return {ep.name: ep.value for ep in entry_points(group="grpo.commands")}


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verbose", action="store_true", help="stream everything the actors print to the console "
                                                           "(default: RUN/logs/, one file per actor)")
    p.add_argument("--config", help="YAML config file (sections: model, data, rollout, rewards, learner, sync, run, "
                                    "cluster, faults, eval)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grpo", description="Distributed GRPO on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="run a training job", description=TRAIN_HELP,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("--resume", metavar="RUN_DIR",
                       help="continue RUN_DIR from its last checkpoint, with its config.yaml (overrides still apply)")
    train.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    _common(train)

    ev = sub.add_parser("eval", help="pass@k and cons@k of a model on held-out prompts",
                        description="Sample K completions per prompt on the generators (temperature 0.6, top-p 0.95 "
                        "unless eval.* overrides say otherwise), score them with the reward workers, and write "
                        "DIR/eval.json, DIR/samples.jsonl and DIR/eval.png.")
    ev.add_argument("model", help="an HF model directory, or a run directory (its final/ and config.yaml)")
    ev.add_argument("--data", help="JSONL prompts with answers (default: the built-in task's held-out prompts)")
    ev.add_argument("--k", type=int, help="samples per prompt (eval.k)")
    ev.add_argument("--output", required=True, help="output directory")
    _common(ev)

    sft = sub.add_parser("sft", help="supervised fine-tuning on prompt/completion rows (DeepSpeed, the learner's set-up)")
    sft.add_argument("--data", required=True, help="JSONL rows with `prompt` and `completion`")
    sft.add_argument("--model", required=True, help="HF model directory to start from")
    sft.add_argument("--output", required=True, help="where the fine-tuned HF model goes")
    sft.add_argument("--steps", type=int, help="SFT steps (sft.steps, default 200)")
    sft.add_argument("--batch-size", type=int, help="examples per step (sft.batch_size, default 32)")
    sft.add_argument("--lr", type=float, help="learning rate (sft.lr, default 1e-3)")
    _common(sft)

    dist = sub.add_parser("distill", help="R1 distillation: teacher samples, verified answers, student SFT",
                          description="Sample K answers per prompt from TEACHER, keep the verified-correct ones, "
                          "fine-tune STUDENT on them, and report the student's pass@1 on held-out prompts before "
                          "and after.")
    dist.add_argument("--teacher", required=True, help="HF model directory, or a run directory (its final/)")
    dist.add_argument("--student", required=True, help="HF model directory, or `tiny` (the built-in tiny model after "
                                                        "its cold start, as model.tiny / model.cold_start say)")
    dist.add_argument("--data", help="JSONL prompts with answers (default: the built-in task's RL prompts)")
    dist.add_argument("--eval-data", help="held-out JSONL prompts (default: the built-in task's held-out prompts)")
    dist.add_argument("--k", type=int, help="teacher samples per prompt (distill.k, default 8)")
    dist.add_argument("--keep", type=int, help="verified completions kept per prompt (distill.keep, default 2)")
    dist.add_argument("--steps", type=int, help="student SFT steps (sft.steps, default 200)")
    dist.add_argument("--batch-size", type=int, help="student SFT examples per step (sft.batch_size, default 32)")
    dist.add_argument("--lr", type=float, help="student SFT learning rate (sft.lr, default 1e-3)")
    dist.add_argument("--output", required=True)
    _common(dist)

    smp = sub.add_parser("samples", help="print a run's recorded samples",
                         description="Print samples a run recorded (RUN/rollouts): the prompt, the completion "
                         "with its <think> and <answer> parts, each verifier's score and the advantage.")
    smp.add_argument("run", help="run directory")
    smp.add_argument("--step", type=int, help="step (default: the last recorded)")
    pick = smp.add_mutually_exclusive_group()
    pick.add_argument("--best", type=int, metavar="K", help="the K highest rewards")
    pick.add_argument("--worst", type=int, metavar="K", help="the K lowest rewards")
    pick.add_argument("--random", type=int, metavar="K", help="K at random (default 5)")
    smp.add_argument("--verifier", help="rank by this verifier's score instead of the total reward")
    smp.add_argument("--json", action="store_true", help="one JSON object per sample")

    rep = sub.add_parser("replay", help="re-run the learner alone on a run's recorded rollouts",
                         description="Restore the last checkpoint before --from-step, train on the recorded "
                         "batches (no generators, no verifiers) and compare each step's learner metrics with the "
                         "recorded ones. Overrides (e.g. learner.clip_high=0.28) make it a controlled experiment.")
    rep.add_argument("run", help="run directory")
    rep.add_argument("--from-step", type=int, required=True)
    rep.add_argument("--steps", type=int, default=3)
    rep.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    rep.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides (learner.*)")

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
    verify.add_argument("--timeout", type=float, default=None, help="seconds per call (default: rewards.timeout_s)")
    for name in _plugin_commands():  # each parses its own options; listed here for --help
        sub.add_parser(name, help=f"(see grpo {name} --help)", add_help=False)
    return parser


def _flags(args: argparse.Namespace, keys: dict[str, str]) -> list[str]:
    """Command-line flags given -> config overrides (flag attribute -> config key): a
    flag only overrides the default that lives in the config."""
    return [f"{key}={getattr(args, attr)}" for attr, key in keys.items() if getattr(args, attr, None) is not None]


SFT_FLAGS = {"steps": "sft.steps", "batch_size": "sft.batch_size", "lr": "sft.lr"}


def _config(args: argparse.Namespace, extra: list[str] = (), base: Path | None = None):
    """The command's config (--config, else a run's config.yaml, + overrides), or exit 2."""
    from cluster.config import ConfigError, load_config

    try:
        return load_config(args.config or base, [*extra, *args.overrides])
    except (ConfigError, FileNotFoundError) as e:
        print(f"grpo: {e}", file=sys.stderr)
        raise SystemExit(2)


def _quiet(verbose: bool) -> None:
    """Keep third-party deprecation chatter of the driver process off the console."""
    if not verbose:
        import warnings

        for category in (FutureWarning, DeprecationWarning, UserWarning):
            warnings.filterwarnings("ignore", category=category)
        import os

        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        import logging

        # Ray's notice that a local cluster turned token authentication on (it stays on).
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        # HF_HUB_DISABLE_PROGRESS_BARS, set before transformers is imported, also turns off
        # its own bars ("Writing model shards" of the driver's saves).


def _loaded(*names: str) -> tuple[type, ...]:
    """The exception types named "module:Class" whose modules are already imported: an
    error of a type whose module was never imported cannot have been raised, and the
    commands that need no Ray, torch or vLLM never import them for this."""
    return tuple(getattr(sys.modules[m], c) for m, _, c in (n.partition(":") for n in names) if m in sys.modules)


def _run(fn, *a, **kw):
    """Run a command's conduct; a bad input (config, data, model path, placement) exits
    2 with its message, a run that failed past its fault limits exits 1."""
    try:
        return fn(*a, **kw)
    except (ValueError, FileNotFoundError, *_loaded("cluster.actors.placement:PlacementError")) as e:
        print(f"grpo: {e}", file=sys.stderr)  # ConfigError, DatasetError, VerifierError are ValueErrors
        raise SystemExit(2)
    except _loaded("cluster.actors.faults:FaultLimit", "cluster.flow.pipeline:PipelineError") as e:
        cause = f"\n{e.__cause__}" if e.__cause__ is not None else ""  # an actor's error, in full
        print(f"grpo: the run failed: {e}{cause}", file=sys.stderr)  # checkpoints stay for --resume
        raise SystemExit(1)


def _train(args: argparse.Namespace) -> int:
    resume = None
    if args.resume:
        resume = Path(args.resume)
        if args.config or not (resume / "config.yaml").is_file():
            print("grpo: --resume takes a run directory with its config.yaml, and no --config", file=sys.stderr)
            return 2
    cfg = _config(args, base=resume / "config.yaml" if resume else None)
    from cluster.config import check_model_path

    _run(check_model_path, cfg)  # before Ray, torch or vLLM are imported
    from cluster.commands.train import train

    summary = _run(train, cfg, resume=resume, verbose=args.verbose, trust_checkpoint=args.trust_checkpoint)
    w = 5
    print(
        f"\nsummary: {summary['steps']} steps in {summary['seconds_total']:.0f} s | "
        f"accuracy first {w}: {summary[f'accuracy_first{w}']:.3f} -> last {w}: {summary[f'accuracy_last{w}']:.3f} "
        f"(gain {summary['accuracy_gain']:+.3f}) | reward {summary[f'reward_mean_first{w}']:.3f} -> "
        f"{summary[f'reward_mean_last{w}']:.3f} | format {summary[f'format_rate_last{w}']:.3f}"
        + "".join(f"\neval after step {e['step']}: " + ", ".join(f"{k[5:]} {v:.3f}" for k, v in e.items()
                                                                  if k.startswith("eval/") and k not in ("eval/seconds", "eval/requeued_prompts"))
                  for e in summary.get("evals", []))
        + f"\nrun directory: {summary['run_dir']}  (metrics.jsonl, plot.png, final/)"
    )
    return 0


def _eval(args: argparse.Namespace) -> int:
    from cluster.artifacts.files import resolve_model

    _, run_dir = _run(resolve_model, args.model)
    base = run_dir / "config.yaml" if run_dir and not args.config else None
    cfg = _config(args, _flags(args, {"k": "eval.k"}), base)
    from cluster.commands.evaluate import eval_command

    report = _run(eval_command, cfg, args.model, args.data, Path(args.output))
    k = report["k"]
    print(f"eval: {report['n_prompts']} prompts x {k} in {report['seconds']:.0f} s | pass@1 {report['pass@1']:.3f} | "
          + " | ".join(f"pass@{j} {report[f'pass@{j}']:.3f}" for j in [2**i for i in range(1, k.bit_length())]
                       if f"pass@{j}" in report)
          + f" | cons@{k} {report[f'cons@{k}']:.3f} | mean length {report['mean_length']:.1f}\n"
          f"wrote {args.output}/eval.json, samples.jsonl, eval.png")
    return 0


def _sft(args: argparse.Namespace) -> int:
    from cluster.artifacts.files import check_output, resolve_model
    from cluster.data import load_pairs, load_tokenizer

    cfg = _config(args, _flags(args, SFT_FLAGS))
    pairs = _run(load_pairs, args.data)
    model, _ = _run(resolve_model, args.model)  # before Ray starts: a bad path costs nothing
    _run(load_tokenizer, model, cfg.data.template)  # data.template=chat needs the model's chat template
    _run(check_output, Path(args.output), model)
    from cluster.actors.placement import place
    from cluster.commands.sft import SFTSettings, run_sft

    cfg = _run(place, cfg, generators=False)
    s = cfg.sft
    result = _run(run_sft, cfg, model, pairs, SFTSettings(s.steps, s.batch_size, s.lr, cfg.run.seed), Path(args.output))
    print(f"sft: {len(pairs)} examples, {s.steps} steps in {result['seconds']:.0f} s | loss "
          f"{result['loss_first']:.3f} -> {result['loss_last']:.3f} | model: {args.output}")
    Path(args.output, "sft.json").write_text(json.dumps(result))
    return 0


def _distill(args: argparse.Namespace) -> int:
    from cluster.artifacts.files import check_output, resolve_model
    from cluster.data import apply_template, eval_rows, load_jsonl, rl_rows

    cfg = _config(args, _flags(args, {**SFT_FLAGS, "k": "distill.k", "keep": "distill.keep"}))
    teacher, _ = _run(resolve_model, args.teacher)
    prompts = _run(load_jsonl, args.data, cfg.data.format) if args.data else rl_rows(cfg.data)
    held_out = _run(eval_rows, cfg.data, args.eval_data)
    held_out = held_out[: cfg.eval.max_prompts] if cfg.eval.max_prompts else held_out
    student = None if args.student == "tiny" else _run(resolve_model, args.student)[0]  # before Ray starts
    _run(check_output, Path(args.output))
    from cluster.actors.placement import place
    from cluster.commands.cold_start import prepare_model
    from cluster.commands.distill import distill
    from cluster.commands.sft import SFTSettings

    asked, cfg = cfg, _run(place, cfg)
    student = student or _run(prepare_model, asked)
    template = cfg.data.prompt_template(args.data)
    prompts = _run(apply_template, prompts, template, teacher)
    held_out = _run(apply_template, held_out, template, student)
    settings = SFTSettings(cfg.sft.steps, cfg.sft.batch_size, cfg.sft.lr, cfg.run.seed)
    report = _run(distill, cfg, teacher, student, prompts, held_out, cfg.distill, settings, Path(args.output),
                  template=template)
    print(f"distill: kept {report['examples_kept']} verified completions (teacher pass@1 {report['teacher_pass@1']:.3f}) | "
          f"student pass@1 on {report['held_out_prompts']} held-out prompts: {report['student_pass@1_before']:.3f} -> "
          f"{report['student_pass@1_after']:.3f} | {args.output}/distill.json")
    return 0


def _samples(args: argparse.Namespace) -> int:
    from cluster.artifacts.record import select
    from cluster.commands.samples import show_sample

    mode, count = next(((m, getattr(args, m)) for m in ("best", "worst", "random") if getattr(args, m) is not None),
                       ("random", 5))
    items = _run(lambda: list(select(Path(args.run), args.step, mode, count, args.verifier)))
    color = sys.stdout.isatty() and not args.json
    for item in items:
        print(json.dumps(item) if args.json else show_sample(item, color))
    return 0


def _replay(args: argparse.Namespace) -> int:
    from cluster.commands.replay import COMPARED, replay

    run = Path(args.run)
    if not (run / "config.yaml").is_file():
        print(f"grpo: {run} is not a run directory (no config.yaml)", file=sys.stderr)
        return 2
    if args.steps < 1 or args.from_step < 1:
        print(f"grpo: replay --from-step and --steps must be at least 1 (got {args.from_step}, {args.steps})",
              file=sys.stderr)
        return 2
    args.config = None
    cfg = _config(args, base=run / "config.yaml")
    result = _run(replay, cfg, run, args.from_step, args.steps, trust=args.trust_checkpoint)
    for r in result["rows"]:
        print(f"step {r['step']}: " + "  ".join(
            f"{k[6:]} {r[f'replay/{k}']:.6g} (recorded {r[f'recorded/{k}']:.6g})" for k in COMPARED[:3]
            if r[f"replay/{k}"] is not None and r[f"recorded/{k}"] is not None))
    print(f"replay: max |replayed - recorded| over {len(COMPARED)} learner metrics: {result['max_abs_diff']:.3g} "
          f"-> {result['output']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    plugins = _plugin_commands()
    if argv and argv[0] in plugins:
        from importlib import import_module

        module, _, attr = plugins[argv[0]].partition(":")
        return getattr(import_module(module), attr)(argv[1:])
    # `key.sub=value` overrides may come anywhere, also after options (argparse alone
    # would refuse a positional after `--k 4`): take them out first.
    overrides = [a for a in argv[1:] if OVERRIDE.match(a)] if argv and argv[0] in WITH_OVERRIDES else []
    args = _parser().parse_args([argv[0], *[a for a in argv[1:] if a not in overrides]] if overrides else argv)
    if overrides:
        args.overrides = overrides + list(args.overrides or [])
    if args.command == "verify":
        from rewards.verify_cli import main as verify_main

        return verify_main(args)
    _quiet(getattr(args, "verbose", False))
    try:
        return {"train": _train, "eval": _eval, "sft": _sft, "distill": _distill, "samples": _samples,
                "replay": _replay}[args.command](args)
    except SystemExit as e:
        return int(e.code or 0)


if __name__ == "__main__":
    sys.exit(main())
