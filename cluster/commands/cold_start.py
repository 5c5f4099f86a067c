"""The model a run starts from: `model.path`, or the built-in tiny model after its
cold start, built once and cached by the hash of everything that shapes it."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from cluster.actors.placement import alive_nodes, learner_only, resolve_resources, start_ray
from cluster.commands.sft import SFTSettings, run_sft
from cluster.config import Config
from cluster.data import arithmetic_split
from learner.config import LoRAConfig
from learner.tiny_model import build_tiny_model

# Bump when the tiny model, tokenizer, task text or cold start change meaning.
RECIPE_VERSION = 2  # 2: cold start through the learner's DeepSpeed set-up; eval prompts held out


def uses_tool(cfg: Config) -> bool:
    """Whether the cold start's targets are tool episodes (multiplication with the python tool)."""
    return cfg.data.task == "multiplication" and cfg.env.name == "python"


def cold_start_key(cfg: Config) -> str:
    """The cache name of the cold-started model: a hash of everything that shapes it."""
    task = {} if cfg.data.task in ("arithmetic", None) else {"task": cfg.data.task, "tool": uses_tool(cfg)}
    key = json.dumps(
        {
            "v": RECIPE_VERSION,
            "tiny": cfg.model.tiny.model_dump(),
            "cold_start": cfg.model.cold_start.model_dump(),
            "data": cfg.data.model_dump(include={"max_operand", "rl_share", "eval_share", "seed"}),
            # the learner scores at the sampling temperature, the cold start's NLL too: it shapes the model
            # (two jobs that differ in it once shared a cache entry, whichever built it first)
            "temperature": cfg.rollout.temperature,
            **task,
        },
        sort_keys=True,
    )
    return "tiny-" + hashlib.sha256(key.encode()).hexdigest()[:12]


def prepare_model(cfg: Config, log=print) -> str:
    if cfg.model.path is not None:
        path = Path(cfg.model.path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model.path: {str(path)!r} is not an HF model directory (no config.json)")
        return str(path.resolve())
    tool = uses_tool(cfg)
    cached = Path(cfg.run.output_dir) / "_cache" / cold_start_key(cfg)
    if (cached / "config.json").is_file():
        log(f"model: cached tiny model {cached}")
        return str(cached.resolve())
    tmp, trained = cached.with_name(cached.name + ".init"), cached.with_name(cached.name + ".tmp")
    for d in (tmp, trained):
        shutil.rmtree(d, ignore_errors=True)
    build_tiny_model(tmp, cfg.model.tiny)
    pairs = [(r["prompt"], r["tool_reference"] if tool else r["reference"]) for r in arithmetic_split(cfg.data)["sft"]]
    c = cfg.model.cold_start
    start_ray(cfg.cluster)
    # the cold start builds the model every run of this key starts from: full fine-tuning,
    # whatever the RL stage's learner.lora (a LoRA on a random model learns nothing here),
    # in float32 whatever its learner.dtype (the key leaves the precision out: every job of
    # this key starts from the same weights)
    sft_cfg = learner_only(cfg)
    sft_cfg = sft_cfg.model_copy(update={"learner": sft_cfg.learner.model_copy(update={"lora": LoRAConfig(),
                                                                                        "dtype": "float32"})})
    resolved = resolve_resources(sft_cfg, alive_nodes())
    log(f"cold start: {c.steps} SFT steps of {c.batch_size} on the built-in task ({len(pairs)} examples)")
    run_sft(resolved, str(tmp), pairs, SFTSettings(c.steps, c.batch_size, c.lr, c.seed), trained, log,
            template="none")  # the built-in task keeps its own format
    shutil.rmtree(tmp)
    trained.rename(cached)  # atomic: a half-built model is never picked up as cached
    return str(cached.resolve())
