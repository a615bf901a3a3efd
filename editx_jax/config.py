"""Configs: one frozen dataclass per component, YAML presets, `--set a.b=c` overrides.

Frozen dataclasses are hashable, so a config can be a static argument of a jitted function.
Unknown keys are errors that name the key; bad values are errors that name the field.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import typing
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config file, an override or a field value is wrong; the message says which."""


DTYPES = ("float32", "bfloat16", "float16")
# token2wav.vocoder's choices: the names of editx_jax/decoder/vocoders.py's table (a test holds them equal),
# each also the name of the vocoder's config section.
VOCODERS = ("hift", "bigvgan")
BIGVGAN_CONTEXT = 3  # mel frames reflect-padded on each side before BigVGAN (its conv_pre has no padding)
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable", "minimal")


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


MATMUL_PRECISIONS = ("default", "high", "highest")  # jax.lax.Precision names, for *.matmul_precision


def check_matmul_precision(value: str, field: str) -> None:
    _check(value in MATMUL_PRECISIONS, field, f"one of {', '.join(MATMUL_PRECISIONS)}, got {value!r}")


def _check(cond: bool, field: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{field}: {message}")


@dataclasses.dataclass(frozen=True)
class LLMConfig:
    """The Step1 decoder-only LLM (architecture.md §1). Defaults are the released sizes."""

    vocab_size: int = 74752
    hidden_size: int = 3072
    intermediate_size: int = 8192
    num_heads: int = 48
    num_groups: int = 4  # key/value heads
    num_layers: int = 32
    rms_norm_eps: float = 1e-5
    max_seq_len: int = 32768
    bos_id: int = 1
    pad_id: int = 0
    eos_id: int = 3
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype; norms, softmax and the ALiBi bias stay float32
    remat_policy: str = "none"

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_heads", "num_groups",
                     "num_layers", "max_seq_len"):
            _check(getattr(self, name) > 0, f"llm.{name}", f"must be positive, got {getattr(self, name)}")
        _check(self.hidden_size % self.num_heads == 0, "llm.num_heads",
               f"{self.num_heads} heads do not divide hidden_size {self.hidden_size}")
        _check(self.num_heads % self.num_groups == 0, "llm.num_groups",
               f"{self.num_groups} groups do not divide num_heads {self.num_heads}")
        _check(self.rms_norm_eps > 0, "llm.rms_norm_eps", "must be positive")
        _check(self.param_dtype in DTYPES, "llm.param_dtype", f"one of {DTYPES}, got {self.param_dtype!r}")
        _check(self.dtype in DTYPES, "llm.dtype", f"one of {DTYPES}, got {self.dtype!r}")
        _check(self.remat_policy in REMAT_POLICIES, "llm.remat_policy",
               f"one of {REMAT_POLICIES}, got {self.remat_policy!r}")
        for name in ("bos_id", "pad_id", "eos_id"):
            _check(0 <= getattr(self, name) < self.vocab_size, f"llm.{name}", "outside the vocabulary")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_params(self) -> int:
        e, f, v, d = self.hidden_size, self.intermediate_size, self.vocab_size, self.head_dim
        per_layer = 2 * e + e * self.num_heads * d * 2 + 2 * e * self.num_groups * d + 3 * e * f
        return 2 * v * e + e + self.num_layers * per_layer


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """Sampling and stopping. Defaults are the official `tts.py` settings (architecture.md §1.9)."""

    greedy: bool = False
    temperature: float = 0.7
    top_k: int = 50  # 0 disables
    top_p: float = 1.0  # 1.0 disables
    repetition_window: int = 10  # 0 disables the repetition-aware rule
    repetition_ratio: float = 0.1  # ban the last id when its share of the window exceeds this
    max_length: int = 8192  # prompt + new tokens
    max_new_tokens: int = 8192
    drop_last: bool = True  # the official output drops the final token (EOS or the truncated one)
    min_prompt_bucket: int = 64  # prompt lengths are rounded up to powers of two from here

    def __post_init__(self):
        _check(self.temperature > 0, "generation.temperature", "must be > 0 (use greedy: true for argmax)")
        _check(self.top_k >= 0, "generation.top_k", "must be >= 0")
        _check(0 < self.top_p <= 1, "generation.top_p", "must be in (0, 1]")
        _check(self.repetition_window >= 0, "generation.repetition_window", "must be >= 0")
        _check(self.max_length > 0, "generation.max_length", "must be positive")
        _check(self.max_new_tokens > 0, "generation.max_new_tokens", "must be positive")
        _check(self.min_prompt_bucket > 0 and _is_pow2(self.min_prompt_bucket),
               "generation.min_prompt_bucket", "must be a power of two")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh sizes over ('data', 'fsdp', 'tensor'); -1 takes the devices left over."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1

    def __post_init__(self):
        sizes = (self.data, self.fsdp, self.tensor)
        _check(all(s == -1 or s > 0 for s in sizes), "mesh", f"sizes must be positive or -1, got {sizes}")
        _check(sum(s == -1 for s in sizes) <= 1, "mesh", "at most one axis may be -1")

    def resolve(self, num_devices: int) -> tuple[int, int, int]:
        sizes = [self.data, self.fsdp, self.tensor]
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if num_devices % known:
                raise ConfigError(f"mesh: {num_devices} devices are not divisible by {known}")
            sizes[sizes.index(-1)] = num_devices // known
        if math.prod(sizes) != num_devices:
            raise ConfigError(f"mesh: data*fsdp*tensor = {math.prod(sizes)} but {num_devices} devices are present")
        return tuple(sizes)


SCHEDULES = ("cosine", "linear", "constant")
LOSS_NORMS = ("global_token_mean", "micro_batch_mean")
OVERLONG = ("truncate", "drop", "error")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW on float32 master weights. Defaults are upstream's SFT preset (training.md §1)."""

    learning_rate: float = 2e-5
    schedule: str = "cosine"  # warmup then cosine / linear decay to end_lr_ratio * lr, or constant
    warmup_ratio: float = 0.03  # of train.steps; upstream: warmup steps = ceil(ratio * total)
    end_lr_ratio: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    clip_norm: float = 1.0  # global gradient norm; 0 disables

    def __post_init__(self):
        _check(self.learning_rate > 0, "optimizer.learning_rate", "must be > 0")
        _check(self.schedule in SCHEDULES, "optimizer.schedule", f"one of {SCHEDULES}, got {self.schedule!r}")
        _check(0 <= self.warmup_ratio < 1, "optimizer.warmup_ratio", "must be in [0, 1)")
        _check(0 <= self.end_lr_ratio <= 1, "optimizer.end_lr_ratio", "must be in [0, 1]")
        _check(0 <= self.b1 < 1 and 0 <= self.b2 < 1, "optimizer.b1", "betas must be in [0, 1)")
        _check(self.eps > 0, "optimizer.eps", "must be > 0")
        _check(self.weight_decay >= 0, "optimizer.weight_decay", "must be >= 0")
        _check(self.clip_norm >= 0, "optimizer.clip_norm", "must be >= 0 (0 disables clipping)")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Upstream JSONL records (training.md §2) -> packed token batches."""

    train: str = ""  # JSONL file(s), comma-separated, read in order
    eval: str = ""  # held-out JSONL for teacher-forced NLL / accuracy; "" disables
    text_tokenizer: str = "bytes"  # "bytes" / "words" (toys for synthetic data) or a tokenizer.model / model folder
    # The defaults restate vocab.AUDIO_ID_OFFSET / AUDIO_TOKENS, the source (this file imports nothing of
    # ours; tests/test_vocab.py holds them equal).
    audio_id_base: int = 65536  # the model's id of <audio_0>; records carry 65536 + code
    audio_codes: int = 5120  # codes per record id: 1024 vq02 + 4096 vq06
    max_length: int = 1536  # tokens per sequence (upstream SFT max_length) and per packed row
    overlong: str = "truncate"  # longer records: truncate the completion (counted), drop, or error
    pack: bool = True  # first-fit packing with segment ids; false: one example per row, padded
    packing_bins: int = 0  # first-fit bins held open; 0 = rows per process batch
    eos_in_loss: bool = True  # train <|EOT|> after every completion (upstream SFT does not)
    upstream_compat: bool = False  # reproduce upstream SFT exactly: no <|EOT|> in completion or loss
    strict: bool = False  # fail on the first malformed record instead of counting and skipping it
    shuffle: bool = True
    seed: int = 42
    num_epochs: int = 0  # 0 = repeat forever (train.steps bounds the run)
    prefetch: int = 2  # batches prefetched by a background thread; 0 disables

    def __post_init__(self):
        _check(self.max_length > 1, "data.max_length", "must be > 1")
        _check(self.overlong in OVERLONG, "data.overlong", f"one of {OVERLONG}, got {self.overlong!r}")
        _check(self.audio_id_base >= 0, "data.audio_id_base", "must be >= 0")
        _check(self.audio_codes > 0, "data.audio_codes", "must be > 0")
        _check(self.packing_bins >= 0, "data.packing_bins", "must be >= 0")
        _check(self.num_epochs >= 0, "data.num_epochs", "must be >= 0")
        _check(self.prefetch >= 0, "data.prefetch", "must be >= 0")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax train-state checkpoints (train state + data iterator), written asynchronously."""

    every: int = 100  # steps between saves; a final save always happens at the end
    keep: int = 2
    async_save: bool = True

    def __post_init__(self):
        _check(self.every > 0, "checkpoint.every", "must be > 0")
        _check(self.keep > 0, "checkpoint.keep", "must be > 0")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One SFT run: batch geometry, loss normalisation, logging and evaluation cadence."""

    steps: int = 1000
    batch_size: int = 128  # rows (packed sequences) per optimizer step, all processes together
    grad_accum: int = 1  # micro-batches per step; batch_size must divide by it
    loss_norm: str = "global_token_mean"  # or "micro_batch_mean" (upstream HF Trainer)
    seed: int = 42
    output_dir: str = "runs/sft"
    log_every: int = 10
    eval_every: int = 0  # 0: only at the end (when data.eval is set)
    eval_batches: int = 0  # 0: the whole held-out set
    progress: bool = True

    def __post_init__(self):
        _check(self.steps > 0, "train.steps", "must be > 0")
        _check(self.batch_size > 0, "train.batch_size", "must be > 0")
        _check(self.grad_accum > 0, "train.grad_accum", "must be > 0")
        _check(self.batch_size % self.grad_accum == 0, "train.grad_accum",
               f"{self.grad_accum} does not divide batch_size {self.batch_size}")
        _check(self.loss_norm in LOSS_NORMS, "train.loss_norm", f"one of {LOSS_NORMS}, got {self.loss_norm!r}")
        _check(self.log_every > 0, "train.log_every", "must be > 0")
        _check(self.eval_every >= 0 and self.eval_batches >= 0, "train.eval_every", "must be >= 0")


@dataclasses.dataclass(frozen=True)
class Config:
    """The whole preset: one section per component."""

    llm: LLMConfig = dataclasses.field(default_factory=LLMConfig)
    generation: GenerationConfig = dataclasses.field(default_factory=GenerationConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    # The audio side. These config classes live beside their modules, which import this file for
    # ConfigError; they are resolved lazily (see COMPONENT_SECTIONS) so neither import order breaks.
    tokenizer: "AudioTokenizerConfig" = dataclasses.field(default_factory=lambda: _component("tokenizer"))
    flow: "FlowConfig" = dataclasses.field(default_factory=lambda: _component("flow"))
    hift: "HiFTConfig" = dataclasses.field(default_factory=lambda: _component("hift"))
    bigvgan: "BigVGANConfig" = dataclasses.field(default_factory=lambda: _component("bigvgan"))
    campplus: "CAMPPlusConfig" = dataclasses.field(default_factory=lambda: _component("campplus"))
    token2wav: "Token2WavConfig" = dataclasses.field(default_factory=lambda: _component("token2wav"))
    editx: "EditXConfig" = dataclasses.field(default_factory=lambda: _component("editx"))
    # Preference / RL training (issue 7): see the classes at the end of this file.
    reward: "RewardConfig" = dataclasses.field(default_factory=lambda: RewardConfig())
    dpo: "DPOConfig" = dataclasses.field(default_factory=lambda: DPOConfig())
    grpo: "GRPOConfig" = dataclasses.field(default_factory=lambda: GRPOConfig())
    ppo: "PPOConfig" = dataclasses.field(default_factory=lambda: PPOConfig())


COMPONENT_SECTIONS = {
    "tokenizer": ("editx_jax.tokenizer.audio_tokenizer", "AudioTokenizerConfig"),
    "flow": ("editx_jax.decoder.flow", "FlowConfig"),
    "hift": ("editx_jax.decoder.hift", "HiFTConfig"),
    "bigvgan": ("editx_jax.decoder.bigvgan", "BigVGANConfig"),
    "campplus": ("editx_jax.decoder.campplus", "CAMPPlusConfig"),
    "token2wav": ("editx_jax.decoder.token2wav", "Token2WavConfig"),
    "editx": ("editx_jax.pipeline", "EditXConfig"),
}


def _component_class(section: str):
    import importlib

    module, name = COMPONENT_SECTIONS[section]
    return getattr(importlib.import_module(module), name)


def _component(section: str):
    return _component_class(section)()


def _type_hints(cls) -> dict:
    try:
        return typing.get_type_hints(cls)
    except NameError:  # the lazily resolved component sections of Config
        names = {cls_name: _component_class(section) for section, (_, cls_name) in COMPONENT_SECTIONS.items()}
        return typing.get_type_hints(cls, localns=names)


# ---------------------------------------------------------------- building from dicts / YAML


def from_dict(cls, data: dict | None, where: str = ""):
    """Build dataclass `cls` from a nested dict; unknown keys are an error naming them."""
    data = dict(data or {})
    hints = _type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
                          f"known keys{' of ' + where if where else ''}: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in data.items():
        typ = hints[name]
        path = f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(typ):
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: expected a mapping, got {value!r}")
            kwargs[name] = from_dict(typ, value, path)
        else:
            kwargs[name] = _coerce(typ, value, path)
    return cls(**kwargs)


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def _coerce(typ, value, path):
    if typing.get_origin(typ) is tuple and isinstance(value, list):
        return _tuples(value)  # YAML lists; tuples keep configs hashable (static jit arguments)
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is float and isinstance(value, str):
        try:  # YAML 1.1 reads "3e-3" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if typ in (int, float, str, bool):
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise ConfigError(f"{path}: expected {typ.__name__}, got {value!r}")
    return value


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b=c` strings to a nested dict; values are parsed as YAML scalars."""
    data = json.loads(json.dumps(data))  # deep copy
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. llm.num_layers=4")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {p} is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def load_config(path: str | pathlib.Path | None = None, overrides: list[str] | None = None,
                cls=Config):
    """Read a YAML preset (or the defaults), apply overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        path = pathlib.Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    data = apply_overrides(data, overrides or [])
    return from_dict(cls, data)


def add_config_args(parser, default: str | None = None) -> None:
    """The `--config FILE --set a.b=c` pair every CLI takes."""
    parser.add_argument("--config", default=default, help="YAML preset (see configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set llm.num_layers=4 (repeatable)")


# ---------------------------------------------------------------- preference / RL training (issue 7)

READOUTS = ("last", "mean")
DPO_TRUNCATION = ("source_audio", "upstream")
GRPO_REWARDS = ("token_level_edit", "token_level_edit_corrected", "token_level_consistency", "token_level_follow",
                "token_level_length", "reward_model")


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """Bradley-Terry reward model: the LLM trunk + a scalar head (paper; the details are unpublished)."""

    readout: str = "last"  # the score of the last response token, or "mean" over response tokens
    dense: bool = False  # also return the per-token scores (a dense reward / the value model's output)
    use_margin: bool = False  # subtract the pair's `margin` field inside the sigmoid
    center_coef: float = 0.0  # + coef * mean((r_c + r_r)^2); TRL suggests 0.01

    def __post_init__(self):
        _check(self.readout in READOUTS, "reward.readout", f"one of {READOUTS}, got {self.readout!r}")
        _check(self.center_coef >= 0, "reward.center_coef", "must be >= 0")


@dataclasses.dataclass(frozen=True)
class DPOConfig:
    """DPO, upstream's preset (upstream-training.md §3): sigmoid loss, beta 0.1, frozen reference."""

    beta: float = 0.1
    label_smoothing: float = 0.0
    precompute_ref: bool = False  # reference log-probs once before training instead of in every step
    use_rejected_field: bool = True  # rejected_vq02vq06 when present (ours); false: always the source (upstream)
    truncation: str = "source_audio"  # cut the source audio tokens (ours) or "upstream": last 512 prompt tokens
    max_prompt_length: int = 512
    max_length: int = 1536
    append_eos: bool = True  # <|EOT|> after chosen and rejected, as TRL appends the tokenizer's EOS

    def __post_init__(self):
        _check(self.beta > 0, "dpo.beta", "must be > 0")
        _check(0 <= self.label_smoothing < 0.5, "dpo.label_smoothing", "must be in [0, 0.5)")
        _check(self.truncation in DPO_TRUNCATION, "dpo.truncation", f"one of {DPO_TRUNCATION}")
        _check(0 < self.max_prompt_length < self.max_length, "dpo.max_prompt_length", "must be in (0, max_length)")


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """GRPO, upstream's preset (upstream-training.md §4): G = 16, clip 0.2, k3 KL beta 0.1, token mean."""

    group_size: int = 16
    clip: float = 0.2
    clip_high: float = 0.2
    beta: float = 0.1
    temperature: float = 1.0
    max_new_tokens: int = 1024
    iterations: int = 1  # optimizer passes per generation batch (1: pi_old = pi, upstream)
    rewards: tuple[str, ...] = ("token_level_edit", "token_level_consistency", "token_level_follow", "token_level_length")
    reward_weights: tuple[float, ...] = ()  # one weight per reward; () = all 1.0

    def __post_init__(self):
        _check(self.group_size >= 2, "grpo.group_size", f"must be >= 2, got {self.group_size}")
        _check(0 < self.clip < 1 and self.clip_high > 0, "grpo.clip", "must be in (0, 1)")
        _check(self.beta >= 0, "grpo.beta", "must be >= 0")
        _check(self.temperature > 0, "grpo.temperature", "must be > 0")
        _check(self.max_new_tokens > 0 and self.iterations > 0, "grpo.max_new_tokens", "must be > 0")
        _check(not self.reward_weights or len(self.reward_weights) == len(self.rewards), "grpo.reward_weights",
               f"{len(self.reward_weights)} weights for {len(self.rewards)} rewards")


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """PPO with a reward model and a critic (paper, partly unverified: clip 0.2, KL beta 0.05, critic
    warm-up 80 steps). The critic is the reward-model class with a dense head."""

    kl_beta: float = 0.05  # per-token KL penalty folded into the rewards
    kl_bound: float = 0.0  # > 0: the run reports when the mean KL to the reference exceeds it
    clip: float = 0.2
    value_clip: float = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    epochs: int = 4  # passes over each rollout batch
    minibatches: int = 2  # per epoch
    critic_warmup: int = 80  # iterations where only the critic learns
    whiten_advantages: bool = True
    temperature: float = 1.0
    max_new_tokens: int = 1024
    value_init: str = "reward"  # critic from the reward model, or "policy" (trunk + zero head)
    # 0: every role shares the one mesh. N > 0: the critic (and its optimizer state) lives on its own
    # mesh over the last N devices (fsdp across them); the policy and reference take `mesh` over the rest.
    critic_devices: int = 0

    def __post_init__(self):
        _check(self.kl_beta >= 0, "ppo.kl_beta", "must be >= 0")
        _check(0 < self.clip < 1, "ppo.clip", "must be in (0, 1)")
        _check(self.value_clip > 0, "ppo.value_clip", "must be > 0")
        _check(0 < self.gamma <= 1 and 0 <= self.lam <= 1, "ppo.gamma", "gamma in (0, 1], lam in [0, 1]")
        _check(self.epochs > 0 and self.minibatches > 0, "ppo.epochs", "epochs and minibatches must be > 0")
        _check(self.critic_warmup >= 0, "ppo.critic_warmup", "must be >= 0")
        _check(self.value_init in ("reward", "policy"), "ppo.value_init", "'reward' or 'policy'")
        _check(self.critic_devices >= 0, "ppo.critic_devices", "must be >= 0 (0: share the policy's mesh)")
        _check(self.max_new_tokens > 0, "ppo.max_new_tokens", "must be > 0")
