"""Per-algorithm wiring: `setup(cfg, ...) -> loop.Run` builds the data, the state (its shardings
computed once) and the jitted steps of one algorithm; train/loop.py drives every one of them."""

from editx_jax.train.runs import dpo, grpo, ppo, reward, sft

__all__ = ["dpo", "grpo", "ppo", "reward", "sft"]
