"""Rollouts with our jitted sampler and the pluggable reward functions shared by GRPO and PPO.

A reward function is any callable `fn(prompts, completions, records) -> sequence of floats` (one per
completion; None / NaN count as missing, as TRL's nansum does). `records[i]` is the dict the prompt came
with; the token-level rewards read its "source" and "target" (model ids, e.g. source/target_vq02vq06
mapped into the model's vocabulary).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
from collections.abc import Callable, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding

from editx_jax import sharding, vocab
from editx_jax.audio.io import prepare_clip
from editx_jax.config import (
    ConfigError,
    GenerationConfig,
    LLMConfig,
    MeshConfig,
    RewardConfig,
)
from editx_jax.generate.decode import generate
from editx_jax.models import reward as rm
from editx_jax.models.reward import check_compatible
from editx_jax.train import batches, token_rewards
from editx_jax.train.jit import sharded_step
from editx_jax.train.reward import INPUT_KEYS, score_sequences
from editx_jax.train.state import master_config

RewardFn = Callable[[Sequence, Sequence, Sequence], Sequence[float]]


def params_mesh(params):
    """The mesh a params tree is placed on (None for host arrays or single-device placement)."""
    leaf = jax.tree_util.tree_leaves(params)[0]
    sh = getattr(leaf, "sharding", None)
    return sh.mesh if isinstance(sh, NamedSharding) else None


def sample_completions(params, cfg: LLMConfig, gen: GenerationConfig, prompts, key, repeats: int = 1,
                       mesh=None) -> tuple[list, list]:
    """Each prompt `repeats` times in consecutive rows (a GRPO group), one independent key per row.
    Returns (prompts per row, completions per row); a completion keeps its final <|EOT|> when it
    stopped (drop_last is forced off: the stop token is part of what the policy is trained on).
    The sampler runs on `mesh`, by default the one the params are placed on (prefill / decode with
    the rules table's in / out shardings, generate/decode.py)."""
    gen = dataclasses.replace(gen, drop_last=False)
    rows = [list(p) for p in prompts for _ in range(repeats)]
    keys = jax.random.split(key, len(rows))
    out = generate(params, cfg, gen, rows, row_keys=keys, mesh=mesh or params_mesh(params))
    return rows, [list(t) for t in out.tokens]


def token_reward_fn(name: str) -> RewardFn:
    fn = token_rewards.TOKEN_REWARDS.get(name) or token_rewards.ALIASES.get(name)
    if fn is None:
        raise ConfigError(f"unknown reward {name!r}; known: {', '.join(token_rewards.TOKEN_REWARDS)}")

    def reward(prompts, completions, records):
        return [fn(c, r.get("source", []), r.get("target", [])) for c, r in zip(completions, records)]
    reward.__name__ = name
    return reward


def _score_rows(params, batch: dict, *, cfg: LLMConfig, rcfg: RewardConfig, micro_batch: int):
    return score_sequences(params, cfg, rcfg, batch, micro_batch)[0]


def reward_model_fn(params, score_cfg: LLMConfig, rcfg: RewardConfig, policy_cfg: LLMConfig | None = None,
                    pad_id: int = 0, mesh=None, micro_batch: int = 0) -> RewardFn:
    """The reward model's score of prompt + completion (read per `reward.readout`).

    The params stay where they are, sharded on `mesh` (default: the mesh they are placed on; host
    params are placed once on a one-device mesh); each call scores in a jit with the rules table's
    shardings: params by their logical axes, rows over data x fsdp (padded with copies of the first
    row to a multiple of it and of `micro_batch`), `micro_batch` rows per forward (train.micro_batch;
    0: all at once), one float32 reward per row out."""
    if policy_cfg is not None:
        check_compatible(score_cfg, policy_cfg)
    mesh = mesh or params_mesh(params) or sharding.make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    param_sh = sharding.logical_to_sharding(rm.param_logical_axes(master_config(score_cfg)), mesh)
    params = sharding.place(params, param_sh)
    pad_to = math.lcm(mesh.shape["data"] * mesh.shape["fsdp"], micro_batch or 1)
    score = functools.partial(_score_rows, cfg=score_cfg, rcfg=rcfg, micro_batch=micro_batch)
    step = sharded_step(score, mesh, (param_sh,),
                        sharding.batch_sharding(mesh, 1))

    def reward(prompts, completions, records):
        keep = [i for i, c in enumerate(completions) if len(c)]
        out = np.zeros(len(completions), np.float32)
        if keep:
            rows = keep + [keep[0]] * (-len(keep) % pad_to)
            b = batches.sequence_batch([prompts[i] for i in rows], [completions[i] for i in rows], pad_id=pad_id)
            r = step(params, {k: b[k] for k in INPUT_KEYS})
            out[keep] = np.asarray(r)[:len(keep)]
        return out.tolist()
    reward.__name__ = "reward_model"
    reward.placed_params = params  # where the params live (tests read their shardings)
    return reward


def audio_reward_fn(decoder, scorer: Callable, name: str = "audio") -> RewardFn:
    """A reward that listens: completions are decoded to 24 kHz speech in-process by our decoder
    (`editx_jax.decoder.token2wav.Decoder`, one batched call), then `scorer(wave, sample_rate, record)
    -> float` scores each (an ASR error rate, a speaker similarity, ...). No HTTP services.

    records[i] gives the decoder's speaker prompt: "source" (the edited clip's audio ids, 65536 + ...)
    and either "prompt_mel" [T, 80] + "spk_embedding" [192], or "audio" (a file; its prompt features
    are computed once and cached). Non-audio ids (the final <|EOT|>, stray text) are left out; a
    completion with no audio ids scores None (missing).
    """
    cached: dict = {}

    def features(record):
        if "prompt_mel" in record:
            return record["prompt_mel"], record["spk_embedding"]
        path = str(record["audio"])
        if path not in cached:
            cached[path] = decoder.prompt_features(prepare_clip(path))
        return cached[path]

    def reward(prompts, completions, records):
        out: list = [None] * len(completions)
        keep = [(i, vocab.audio_only(c)) for i, c in enumerate(completions)]
        keep = [(i, ids) for i, ids in keep if ids]
        if keep:
            feats = [features(records[i]) for i, _ in keep]
            speech = decoder.token2wav([ids for _, ids in keep], [records[i]["source"] for i, _ in keep],
                                       [f[0] for f in feats], [f[1] for f in feats])
            for row, (i, _) in enumerate(keep):
                out[i] = float(scorer(speech.speech[row, :speech.lengths[row]], 24000, records[i]))
        return out
    reward.__name__ = name
    return reward


def resolve(spec) -> RewardFn:
    """A reward function from a token-level name, a "module:function" path, or a callable."""
    if callable(spec):
        return spec
    if isinstance(spec, str) and ":" in spec:
        module, name = spec.split(":", 1)
        return getattr(importlib.import_module(module), name)
    return token_reward_fn(spec)


def score(fns: Sequence[RewardFn], weights: Sequence[float] | None, prompts, completions, records):
    """(total reward [N] = nansum_k w_k r_k, per-function rewards {name: [N]})."""
    weights = list(weights) if weights else [1.0] * len(fns)
    if len(weights) != len(fns):
        raise ConfigError(f"{len(weights)} reward weights for {len(fns)} reward functions")
    parts, total = {}, np.zeros(len(completions), np.float64)
    for fn, w in zip(fns, weights):
        r = np.asarray([np.nan if v is None else v for v in fn(prompts, completions, records)], np.float64)
        if r.shape != (len(completions),):
            raise ValueError(f"reward {getattr(fn, '__name__', fn)} returned {r.shape[0]} values for "
                             f"{len(completions)} completions")
        parts[getattr(fn, "__name__", str(fn))] = r
        total += np.nan_to_num(w * r, nan=0.0)
    return total.astype(np.float32), parts
