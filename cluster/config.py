"""The one typed config: YAML file + `key.sub=value` overrides -> Config.

Every default lives here or in the section classes of the package that owns it
(rollout/, rewards/, learner/); each component receives only its own section.
Importing this module imports pydantic and yaml only (so `--help` stays instant).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from learner.config import LearnerConfig, ModelConfig
from rewards.config import EnvConfig, RewardConfig
from rollout.config import RolloutConfig, Section, WeightSyncConfig


class ConfigError(ValueError):
    """A bad config, reported with the key at fault, before anything starts."""


class DataConfig(Section):
    task: Literal["arithmetic", "multiplication"] | None = "arithmetic"
    """Built-in task generator. Ignored when `path` is set. `arithmetic`: a+b, with a
    units-digit scratchpad in the cold start; `multiplication`: a*b, beyond the tiny
    model's head: with env.name=python its cold start writes a tool call
    (`<python>print(a*b)</python>`), reads the output and answers; without, it answers
    directly (the no-tool baseline)."""
    path: str | None = None
    """A JSONL file of rows with `prompt` and `answer` (other fields go to the verifiers)."""
    max_operand: int = Field(29, ge=1, le=999)
    """Arithmetic: operands are drawn from 0..max_operand (every pair is built: at most
    999, a million pairs)."""
    rl_share: float = Field(0.5, gt=0, lt=1)
    """Arithmetic: share of all operand pairs held apart for RL (the rest, but eval_share,
    feed the cold start)."""
    eval_share: float = Field(0.1, ge=0, lt=1)
    """Arithmetic: share of all operand pairs held out of both the cold start and RL, for evaluation."""
    template: Literal["none", "r1_zero", "chat"] = "none"
    """How JSONL prompts are shown to the model: as written, in the R1-Zero instruction
    (reason in <think>, answer in <answer>, no examples), or through the tokenizer's chat
    template. The built-in task keeps its own format."""
    format: Literal["plain", "gsm8k", "math"] = "plain"
    """How JSONL rows come: `plain` (`prompt`, `answer`), `gsm8k` (`question`, and `answer`
    ending in `#### 42`) or `math` (`problem`, and `solution` whose last `\\boxed{}` is the
    answer). Applies to data.path and eval.data alike (cluster/data.py)."""
    seed: int = 0
    """Seeds the split and the order in which prompts are drawn."""

    def prompt_template(self, file: str | None = None) -> str:
        """The template prompts are rendered with: data.template for a JSONL dataset
        (data.path, or `file`: a command's own --data), `none` for the built-in task
        (which keeps its own format)."""
        return self.template if (file or self.path) else "none"

    @field_validator("path")
    @classmethod
    def _path(cls, value: str | None) -> str | None:
        return _nonempty_path("data.path", value)


def _nonempty_path(key: str, value: str | None) -> str | None:
    if value is not None and not value.strip():
        raise ValueError(f"{key}: an empty path; leave it unset for the default")
    return value


class EvalConfig(Section):
    """Evaluation as R1 reports it: K samples per prompt, pass@1 over them, pass@j and cons@K."""

    every: int = Field(20, ge=0)
    """During training, evaluate every this many steps, and before the first and after the
    last (0: never; skipped for a JSONL dataset without eval.data)."""
    data: str | None = None
    """Held-out JSONL prompts; None: the built-in task's held-out split."""
    k: int = Field(4, ge=1)
    """Samples per prompt."""
    max_prompts: int | None = Field(None, ge=1)
    """Evaluate on the first this many prompts only."""
    temperature: float = Field(0.6, ge=0.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    """None: rollout.max_tokens."""
    timeout_s: float = Field(3600.0, gt=0)
    """Deadline of one evaluation (sampling and scoring every prompt), past which it fails."""

    @field_validator("data")
    @classmethod
    def _data(cls, value: str | None) -> str | None:
        return _nonempty_path("eval.data", value)

    def sampling(self, default_max_tokens: int) -> dict[str, Any]:
        return {"temperature": self.temperature, "top_p": self.top_p, "logprobs": False,
                "max_tokens": self.max_tokens or default_max_tokens}


class SFTConfig(Section):
    """`grpo sft`, and the student's stage of `grpo distill` (their --steps, --batch-size
    and --lr override these). The default job's cold start has its own (model.cold_start)."""

    steps: int = Field(200, ge=1)
    batch_size: int = Field(32, ge=1)
    """Examples per step, drawn (seeded by run.seed) from the data."""
    lr: float = Field(1e-3, gt=0)
    """Constant learning rate (the learner's optimizer, no KL, no schedule)."""


class DistillConfig(Section):
    """`grpo distill`: rejection sampling from the teacher (--k and --keep override these)."""

    k: int = Field(8, ge=1)
    """Teacher samples per prompt."""
    keep: int = Field(2, ge=1)
    """Verified-correct completions kept per prompt (distinct texts)."""


class RunConfig(Section):
    steps: int = Field(80, ge=1)
    """RL steps (one rollout batch and one learner update each)."""
    prompts_per_step: int = Field(32, ge=1)
    output_dir: str = "runs"
    """Each run writes to <output_dir>/<name>."""
    name: str | None = None
    """Run directory name (one path component under output_dir); default: a timestamp."""
    checkpoint_every: int = Field(10, ge=0)
    """Every K steps save a resumable checkpoint: DeepSpeed state (optimizer included),
    run state and an HF export (0: only the final HF export). A lost learner rank
    restarts the learner group from the last one, redoing at most K steps."""
    keep_checkpoints: int = Field(2, ge=1)
    """Keep the last M checkpoints."""
    seed: int = 0
    """Seeds sampling: every sample's seed is derived from it and the prompt's place in
    the run (rollout/seeds.py), so a run is reproducible."""
    max_staleness: int = Field(1, ge=0)
    """S, in policy versions: a sample is trained on at most S versions after the oldest
    version that produced it. 0: the synchronous loop (generators wait for each update);
    S > 0: generators keep sampling the next S steps' prompts while the learner trains."""
    progress: bool = True
    """Show a progress bar."""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling: drop groups whose rewards are all equal (no signal) and
    sample more prompts until the batch is full."""
    max_sampling_rounds: int = Field(3, ge=1)
    """Cap on sampling rounds per step with dynamic sampling (then train on what there is)."""
    record_rollouts: bool = True
    """Write every sampled group (trained or dropped) to RUN/rollouts/ (msgpack; see
    cluster/artifacts/record.py), for `grpo samples` and `grpo replay`."""
    record_max_mb: float = Field(512.0, gt=0)
    """Size bound of RUN/rollouts/: the oldest steps are deleted past it."""
    log_max_mb: float = Field(64.0, gt=0)
    """Size bound of each actor's RUN/logs/<actor>.log: past it the file is rotated to
    <actor>.log.1 (replacing the previous one), so a log holds at most twice this."""
    loggers: list[Literal["jsonl", "tensorboard", "wandb"]] = ["jsonl"]
    """Where metrics go: metrics.jsonl always; `tensorboard` (RUN/tensorboard: every
    metric as a scalar, a few samples per step as text) and `wandb` (only when the
    package is installed; honours WANDB_MODE=offline and the usual WANDB_* variables)."""

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        if value is not None and (not value.strip() or value in (".", "..") or "/" in value or "\\" in value
                                  or value.startswith("_")):
            raise ValueError(f"run.name: {value!r} must be one plain directory name under run.output_dir "
                             "(no '/', not '.', '..' or empty, not starting with '_', which is the cache's)")
        return value


class ClusterConfig(Section):
    placement: Literal["disaggregated", "colocated"] = "disaggregated"
    """disaggregated: generators and learner ranks on devices (cores) of their own, working
    at once (run.max_staleness > 0 overlaps them). colocated: generator i shares the
    devices of learner rank i (one pair per rank): the phases take turns (generate, score,
    train, push), so run.max_staleness must be 0; on CPU each pair's actors are bound to
    all of the pair's cores, and their idle threads soon sleep (GOMP_SPINCOUNT); on GPUs a
    pair shares one GPU (generator_gpus + learner_gpus <= 1), the engine sleeps (vLLM's
    sleep mode) while the learner trains, and the weights travel by CUDA IPC
    (sync.transport=shared): unverified, no GPU machine ran it. The default job on 2 cores:
    1.74 s/step disaggregated at S=1, 1.96 colocated, 2.37 disaggregated at S=0."""
    address: str | None = None
    """Ray address to join; None starts Ray locally (or joins the cluster a
    `ray job submit` entrypoint runs in)."""
    num_cpus: int | None = Field(None, ge=1)
    """CPUs of a locally started Ray (None: all)."""
    generator_cpus: float | None = Field(None, ge=0)
    """Logical CPUs per generator; None: a share of the cluster (see below)."""
    generator_gpus: float = Field(0.0, ge=0)
    learner_cpus: float | None = Field(None, ge=0)
    """Logical CPUs per learner rank; None: a share of the cluster."""
    learner_gpus: float = Field(0.0, ge=0)
    reward_cpus: float | None = Field(None, ge=0)
    """Logical CPUs per reward worker; None: 0.1 (they mostly wait on their verifier processes)."""
    generator_resources: dict[str, float] = {}
    """Custom Ray resources each generator asks for, e.g. {gpu_node: 1}: generators then
    run only on nodes started with that resource (`ray start --resources='{"gpu_node": 8}'`)."""
    learner_resources: dict[str, float] = {}
    """Custom Ray resources each learner rank asks for (ranks pack on as few nodes as fit)."""
    reward_resources: dict[str, float] = {}
    """Custom Ray resources each reward worker asks for, e.g. {cpu_node: 1} for CPU-only nodes."""
    generator_threads: int | None = Field(None, ge=1)
    """torch/OpenMP threads in each generator; None: its CPU share's whole cores (1.98 -> 2), at least 1."""
    learner_threads: int | None = Field(None, ge=1)
    """torch/OpenMP threads in each learner rank; None: its CPU share's whole cores, at least 1.
    Shares left at None split the cluster's CPUs evenly between the generators and
    learner ranks (CPU-only jobs; with GPUs each gets 1), so a default job never asks
    for more than the machine has."""
    bundle_cpus: float = Field(1.0, ge=0)
    """CPUs in each GPU bundle of a tensor-parallel generator's placement group (TP > 1)."""
    pin_cpus: bool = True
    """On a single-node CPU-only cluster, pin each generator and learner rank to cores of
    its own (sched_setaffinity), as many as its threads, when they add up to no more
    than the machine has: their threads then never compete for a core."""
    start_timeout_s: float = Field(300.0, gt=0)
    """Every actor must be up within this many seconds, or the job fails naming it."""


class FaultConfig(Section):
    """Losing a worker is not losing the run: deadlines, probes and replacement limits."""

    max_restarts: int = Field(3, ge=0)
    """Replacements allowed per kind of actor (generator, reward worker, learner group) in
    one run; one more fault of that kind fails the job, naming what failed and how often."""
    health_interval_s: float = Field(2.0, gt=0)
    """Seconds between health probes of a generator."""
    health_timeout_s: float = Field(15.0, gt=0)
    """A generator that does not answer a probe within this is hung: killed and replaced.
    It also pads a reward worker's deadline (its groups at every verifier's timeout)."""
    stall_timeout_s: float = Field(120.0, gt=0)
    """A generator with work whose engine makes no step for this long is hung."""
    step_timeout_s: float = Field(900.0, gt=0)
    """Deadline of every learner call (a train step, a weight push, a checkpoint); past it,
    or when a rank dies, the learner group restarts from the last checkpoint."""


class Config(Section):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    rollout: RolloutConfig = RolloutConfig()
    rewards: RewardConfig = RewardConfig()
    learner: LearnerConfig = LearnerConfig()
    sync: WeightSyncConfig = WeightSyncConfig()
    run: RunConfig = RunConfig()
    cluster: ClusterConfig = ClusterConfig()
    faults: FaultConfig = FaultConfig()
    eval: EvalConfig = EvalConfig()
    sft: SFTConfig = SFTConfig()
    distill: DistillConfig = DistillConfig()
    env: EnvConfig = EnvConfig()

    @model_validator(mode="after")
    def _consistent(self) -> "Config":
        if self.sync.backend == "nccl" and (self.cluster.generator_gpus == 0 or self.cluster.learner_gpus == 0):
            raise ValueError("sync.backend=nccl needs GPUs: set cluster.generator_gpus and cluster.learner_gpus")
        if self.data.path is None and self.data.task is None:
            raise ValueError("data: set data.task or data.path")
        if self.cluster.placement == "colocated":
            _check_colocated(self)
        elif self.sync.transport == "shared" and (self.cluster.generator_gpus or self.cluster.learner_gpus):
            raise ValueError("sync.transport=shared on GPUs is for colocated pairs: a generator on a GPU of its own "
                             "cannot open a CUDA IPC handle of the learner's GPU (Ray hides it); use collective or auto")
        lora = self.learner.lora
        if lora.push == "adapter" and not 0 < lora.rank <= 512:
            raise ValueError(f"learner.lora.push=adapter serves the adapter in vLLM, which needs 0 < learner.lora.rank "
                             f"<= 512 (got {lora.rank})")
        if self.sync.delta and self.learner.lora.rank:
            raise ValueError("sync.delta is for full fine-tuning: with learner.lora.rank > 0 a push already carries "
                             "only the adapted layers; set sync.delta=false")
        if self.env.name is not None and self.env.max_episode_tokens < self.rollout.max_tokens:
            raise ValueError(f"env.max_episode_tokens ({self.env.max_episode_tokens}) is below rollout.max_tokens "
                             f"({self.rollout.max_tokens}), which bounds one turn: raise it, or lower rollout.max_tokens")
        if self.sync.delta and self.learner.zero_stage == 3:
            raise ValueError("sync.delta needs the whole previous push on the sender, which ZeRO-3 never holds "
                             "(it gathers one bucket at a time): use learner.zero_stage <= 2, or sync.delta=false")
        return self


def _check_colocated(cfg: "Config") -> None:
    if cfg.run.max_staleness > 0:
        raise ValueError(f"cluster.placement=colocated takes turns on the same devices (generate, then train), so "
                         f"nothing is sampled while the learner trains: set run.max_staleness=0 (got "
                         f"{cfg.run.max_staleness}), or use placement=disaggregated to overlap them")
    if cfg.rollout.tensor_parallel_size > 1:
        raise ValueError("cluster.placement=colocated: rollout.tensor_parallel_size > 1 is not supported yet")
    c = cfg.cluster
    if c.generator_gpus or c.learner_gpus:  # unverified: no GPU machine has run it (README, Placement)
        if not (0 < c.generator_gpus and 0 < c.learner_gpus and c.generator_gpus + c.learner_gpus <= 1):
            raise ValueError(f"cluster.placement=colocated on GPUs: a pair shares one GPU, so cluster.generator_gpus "
                             f"and cluster.learner_gpus must both be > 0 and add up to <= 1 (got {c.generator_gpus:g} "
                             f"+ {c.learner_gpus:g})")
        if cfg.sync.transport == "collective":
            raise ValueError("cluster.placement=colocated on GPUs: sync.transport=collective would put two NCCL ranks "
                             "on one GPU, which NCCL refuses; use sync.transport=shared (CUDA IPC) or auto")
        if cfg.learner.num_ranks > 1:
            raise ValueError(f"cluster.placement=colocated on GPUs: one pair only for now (learner.num_ranks="
                             f"{cfg.learner.num_ranks}): learner rank 0 exports the weights, and generator i > 0 sits "
                             f"on another GPU, which it cannot open a CUDA IPC handle of")
    if cfg.rollout.num_generators != cfg.learner.num_ranks:
        raise ValueError(f"cluster.placement=colocated pairs generator i with learner rank i: "
                         f"rollout.num_generators ({cfg.rollout.num_generators}) must equal learner.num_ranks "
                         f"({cfg.learner.num_ranks})")


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key.sub=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def _set(tree: dict, path: list[str], value: Any, full: str) -> None:
    node = tree
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{full}: {part!r} is a value, not a section")
        node = child
    node[path[-1]] = value


def _describe(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown key")
        elif e["type"] == "value_error":
            msg = str(e["msg"]).removeprefix("Value error, ")
            lines.append(msg if not e["loc"] or msg.startswith(key) else f"{key}: {msg}")
        else:
            lines.append(f"{key}: {e['msg']} (got {e.get('input')!r})")
    return "invalid config:\n  " + "\n  ".join(lines)


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """YAML file (optional) + overrides -> validated Config, or ConfigError naming the key."""
    tree: dict[str, Any] = {}
    if path is not None:
        text = Path(path).read_text()
        try:
            tree = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for item in overrides:
        keys, value = _parse_override(item)
        _set(tree, keys, value, item)
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_describe(e)) from None


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def check_model_path(cfg: Config) -> None:
    """model.path, before anything starts."""
    if cfg.model.path is not None and not (Path(cfg.model.path) / "config.json").is_file():
        raise FileNotFoundError(f"model.path: {cfg.model.path!r} is not an HF model directory (no config.json)")
