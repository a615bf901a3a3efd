"""Configs: one frozen dataclass per component, YAML presets, `--set a.b=c` overrides.

Frozen dataclasses are hashable, so a config can be a static argument of a jitted function.
Unknown keys are errors that name the key; bad values are errors that name the field.

The ground floor: every section lives in this package (base.py: errors, checks, dict/YAML reading;
llm.py, audio.py, decoder.py, train.py, editx.py: the sections), which imports no model code, so
`Config` below simply imports its sections. The modules that use a section re-export it
(`from editx_jax.decoder.flow import FlowConfig` keeps working). Reading a reference model's own
config into ours is conversion work and lives in `editx_jax/convert/`.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

from editx_jax.config.audio import (FBANK_WINDOWS, TOKENIZER_SAMPLE_RATE, AudioTokenizerConfig, FbankConfig,
                                    ParaformerEncoderConfig, S3TokenizerConfig, WhisperMelConfig)
from editx_jax.config.base import (DTYPES, MATMUL_PRECISIONS, REMAT_POLICIES, ConfigError,
                                   apply_overrides, check_matmul_precision, deep_merge, from_dict, read_preset,
                                   to_dict)
from editx_jax.config.decoder import (BIGVGAN_CONTEXT, VOCODERS, BigVGANConfig, CAMPPlusConfig, DiTConfig,
                                      DualCodebookConfig, FlowConfig, HiFTConfig, MelConfig, Token2WavConfig,
                                      UpsampleEncoderConfig)
from editx_jax.config.editx import EditXConfig
from editx_jax.config.llm import QUANTIZE, GenerationConfig, LLMConfig, MeshConfig
from editx_jax.config.train import (DPO_TRUNCATION, GRPO_REWARDS, LOSS_NORMS, OVERLONG, READOUTS, SCHEDULES,
                                    CheckpointConfig, DataConfig, DPOConfig, GRPOConfig, OptimizerConfig,
                                    PPOConfig, RewardConfig, TrainConfig)

__all__ = [
    "AudioTokenizerConfig", "BIGVGAN_CONTEXT", "BigVGANConfig", "CAMPPlusConfig", "CheckpointConfig", "Config",
    "ConfigError", "DPOConfig", "DPO_TRUNCATION", "DTYPES", "DataConfig", "DiTConfig", "DualCodebookConfig",
    "EditXConfig", "FBANK_WINDOWS", "FbankConfig", "FlowConfig", "GRPOConfig", "GRPO_REWARDS",
    "GenerationConfig", "HiFTConfig", "LLMConfig", "LOSS_NORMS", "MATMUL_PRECISIONS", "MelConfig", "MeshConfig", "QUANTIZE",
    "OVERLONG", "OptimizerConfig", "PPOConfig", "ParaformerEncoderConfig", "READOUTS",
    "REMAT_POLICIES", "RewardConfig", "S3TokenizerConfig", "SCHEDULES", "TOKENIZER_SAMPLE_RATE",
    "Token2WavConfig", "TrainConfig", "UpsampleEncoderConfig", "VOCODERS", "WhisperMelConfig",
    "add_config_args", "apply_overrides", "check_matmul_precision", "deep_merge", "from_dict", "load_config",
    "read_preset", "to_dict",
]


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
    # the audio side
    tokenizer: AudioTokenizerConfig = dataclasses.field(default_factory=AudioTokenizerConfig)
    flow: FlowConfig = dataclasses.field(default_factory=FlowConfig)
    hift: HiFTConfig = dataclasses.field(default_factory=HiFTConfig)
    bigvgan: BigVGANConfig = dataclasses.field(default_factory=BigVGANConfig)
    campplus: CAMPPlusConfig = dataclasses.field(default_factory=CAMPPlusConfig)
    token2wav: Token2WavConfig = dataclasses.field(default_factory=Token2WavConfig)
    editx: EditXConfig = dataclasses.field(default_factory=EditXConfig)
    # preference / RL training (issue 7)
    reward: RewardConfig = dataclasses.field(default_factory=RewardConfig)
    dpo: DPOConfig = dataclasses.field(default_factory=DPOConfig)
    grpo: GRPOConfig = dataclasses.field(default_factory=GRPOConfig)
    ppo: PPOConfig = dataclasses.field(default_factory=PPOConfig)


def load_config(path: str | pathlib.Path | None = None, overrides: list[str] | None = None,
                cls=Config):
    """Read a YAML preset (or the defaults) with its `base:` chain, apply overrides, validate."""
    data: dict[str, Any] = read_preset(path) if path is not None else {}
    data = apply_overrides(data, overrides or [])
    return from_dict(cls, data)


def add_config_args(parser, default: str | None = None) -> None:
    """The `--config FILE --set a.b=c` pair every CLI takes."""
    parser.add_argument("--config", default=default, help="YAML preset (see configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set llm.num_layers=4 (repeatable)")
