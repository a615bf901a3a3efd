"""Training sections: the SFT run (train, optimizer, data, checkpoint) and the preference / RL
algorithms (reward, dpo, grpo, ppo; issue 7)."""

from __future__ import annotations

import dataclasses

from editx_jax.config.base import _check

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
    # The released model folder / tokenizer.model, or "bytes" / "words" (toys for synthetic data). No
    # default on purpose: a config that forgets it must fail, not train the real model on bytes.
    text_tokenizer: str = ""
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
    # micro-batches per gradient step, whose rows must divide by it: SFT batch_size rows, reward / DPO
    # batch_size pairs, GRPO batch_size x grpo.group_size samples, PPO each of the ppo.minibatches
    grad_accum: int = 1
    loss_norm: str = "global_token_mean"  # or "micro_batch_mean" (upstream HF Trainer)
    # rows per no-grad forward of the reward model / DPO / GRPO / PPO (reference, policy and value
    # log-probs, reward scores): a lax.map over micro-batches inside jit; 0 = the whole batch at once
    micro_batch: int = 0
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
        _check(self.micro_batch >= 0, "train.micro_batch", "must be >= 0 (0: the whole batch)")
        _check(self.loss_norm in LOSS_NORMS, "train.loss_norm", f"one of {LOSS_NORMS}, got {self.loss_norm!r}")
        _check(self.log_every > 0, "train.log_every", "must be > 0")
        _check(self.eval_every >= 0 and self.eval_batches >= 0, "train.eval_every", "must be >= 0")


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
    # Storage of the frozen roles, the reference and a --reward-model scored as the reward: bfloat16
    # halves their memory (3.5B: 13 -> 6.5 GiB each). At llm.dtype bfloat16 the forward casts every
    # weight to bfloat16 anyway, so their log-probs and scores are the same.
    frozen_dtype: str = "float32"

    def __post_init__(self):
        _check(self.kl_beta >= 0, "ppo.kl_beta", "must be >= 0")
        _check(self.frozen_dtype in ("float32", "bfloat16"), "ppo.frozen_dtype",
               f"'float32' or 'bfloat16', got {self.frozen_dtype!r}")
        _check(0 < self.clip < 1, "ppo.clip", "must be in (0, 1)")
        _check(self.value_clip > 0, "ppo.value_clip", "must be > 0")
        _check(0 < self.gamma <= 1 and 0 <= self.lam <= 1, "ppo.gamma", "gamma in (0, 1], lam in [0, 1]")
        _check(self.epochs > 0 and self.minibatches > 0, "ppo.epochs", "epochs and minibatches must be > 0")
        _check(self.critic_warmup >= 0, "ppo.critic_warmup", "must be >= 0")
        _check(self.value_init in ("reward", "policy"), "ppo.value_init", "'reward' or 'policy'")
        _check(self.critic_devices >= 0, "ppo.critic_devices", "must be >= 0 (0: share the policy's mesh)")
        _check(self.max_new_tokens > 0, "ppo.max_new_tokens", "must be > 0")
