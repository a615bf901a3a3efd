"""The LLM's sections: its sizes (LLMConfig), sampling (GenerationConfig) and the device mesh."""

from __future__ import annotations

import dataclasses
import math

from editx_jax.config.base import DTYPES, REMAT_POLICIES, ConfigError, _check, _is_pow2


QUANTIZE = ("none", "int8")


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
    # Weight-only quantization of the matmul weights (inference; models/quantize.py): "none" or "int8"
    # (int8 kernels with float32 per-output-channel scales). quantize_embeddings: the embedding table
    # and lm_head too (False keeps them in param_dtype).
    quantize: str = "none"
    quantize_embeddings: bool = True

    def __post_init__(self):
        _check(self.quantize in QUANTIZE, "llm.quantize", f"one of {QUANTIZE}, got {self.quantize!r}")
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
