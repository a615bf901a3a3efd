"""The EditX pipeline's own settings (editx_jax/pipeline.py)."""

from __future__ import annotations

import dataclasses

from editx_jax.config.base import ConfigError


@dataclasses.dataclass(frozen=True)
class EditXConfig:
    """Pipeline settings that are not any one model's."""

    max_audio_seconds: float = 60.0  # longer inputs are refused with a message, never cut silently
    keep_prompt_features: bool = False  # iterative edits: keep round 1's speaker prompt (less timbre drift)
    float_between_rounds: bool = False  # iterative edits: skip the 16-bit wav round trip of tts_infer.py

    def __post_init__(self):
        if not self.max_audio_seconds > 0:
            raise ConfigError(f"editx.max_audio_seconds: must be > 0, got {self.max_audio_seconds}")
