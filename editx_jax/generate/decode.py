"""KV-cached generation: a jitted prefill, then a jitted `lax.while_loop` decode.

Prompts of different lengths are left-padded into one power-of-two bucket, so every row's prompt
ends at the same cache column and the decode loop writes one shared column per step. Padding has
position -1 and each row's positions start at 0 at its first real token, so a row of a batch sees
exactly what it would see alone. Rows stop on their own (EOS or their length budget); the loop
ends when every row has stopped or the step limit is reached.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from editx_jax.config import GenerationConfig, LLMConfig
from editx_jax.generate.sampling import sample
from editx_jax.models.llm import Step1, check_token_ids, init_cache


class PromptTooLongError(ValueError):
    """A prompt does not leave room for a new token within max_length / the model's max_seq_len."""


def bucket(n: int, minimum: int) -> int:
    """The power of two >= n (and >= minimum) that a length is padded to, to bound recompiles."""
    return max(minimum, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


@dataclasses.dataclass
class GenerateOutput:
    tokens: list[list[int]] | np.ndarray  # per row, new tokens (final one dropped if gen.drop_last)
    logits: np.ndarray | None = None  # [B, steps, V] raw next-token logits, when asked for
    num_steps: int = 0


def left_pad(prompts: Sequence[Sequence[int]], length: int, pad_id: int):
    """Token ids [B, length] right-aligned, positions [B, length] (-1 on padding), lengths [B]."""
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    positions = np.full((len(prompts), length), -1, np.int32)
    lengths = np.array([len(p) for p in prompts], np.int32)
    for i, p in enumerate(prompts):
        tokens[i, length - len(p):] = p
        positions[i, length - len(p):] = np.arange(len(p))
    return tokens, positions, lengths


def from_padded(tokens, mask) -> list[list[int]]:
    """Prompts from a padded [B, T] array and its 0/1 mask (padding on the left or the right)."""
    tokens, mask = np.asarray(tokens), np.asarray(mask).astype(bool)
    return [list(map(int, row[m])) for row, m in zip(tokens, mask)]


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def prefill(params, cfg: LLMConfig, tokens, positions, cache):
    """Run the padded prompts through the model, filling cache columns [0, P)."""
    logits, cache = Step1(cfg).apply({"params": params}, tokens, positions, cache=cache, cache_index=0)
    return logits[:, -1].astype(jnp.float32), cache


@functools.partial(jax.jit, static_argnames=("cfg", "gen", "room", "return_logits"),
                   donate_argnames=("cache",))
def decode(params, cfg: LLMConfig, gen: GenerationConfig, cache, last_logits, recent, lengths, budget, row_keys,
           start, max_steps, room: int, return_logits: bool = False):
    """Sample up to `max_steps` (<= room, the static buffer size) tokens per row, feeding each back through the cache.

    last_logits [B, V]: the prefill's next-token logits; recent [B, W]: the last ids of each row;
    lengths [B]: ids each row holds; budget [B]: how many new tokens each row may take;
    row_keys [B]: one PRNG key per row, folded with the step number (a row samples as it would alone);
    start: the cache column of the first new token. Returns tokens [B, max_steps] (EOS-padded after
    a row stops), the number of new tokens per row, optional logits [B, room, V], steps run, and the cache.
    """
    batch = last_logits.shape[0]
    model = Step1(cfg)
    out = jnp.full((batch, room), cfg.eos_id, jnp.int32)
    logit_buf = jnp.zeros((batch, room if return_logits else 0, last_logits.shape[-1]), jnp.float32)
    state = dict(step=jnp.int32(0), cache=cache, logits=last_logits, recent=recent, lengths=lengths,
                 done=budget <= 0, count=jnp.zeros((batch,), jnp.int32), out=out, logit_buf=logit_buf)

    def cond(s):
        return (s["step"] < max_steps) & ~jnp.all(s["done"])

    def body(s):
        step_keys = jax.vmap(jax.random.fold_in, (0, None))(row_keys, s["step"])
        if return_logits:
            s["logit_buf"] = jax.lax.dynamic_update_slice_in_dim(s["logit_buf"], s["logits"][:, None], s["step"], 1)
        token = sample(s["logits"], step_keys, gen, s["recent"], s["lengths"])
        token = jnp.where(s["done"], cfg.eos_id, token)
        active = ~s["done"]
        count = s["count"] + active
        done = s["done"] | (token == cfg.eos_id) | (count >= budget)
        out = jax.lax.dynamic_update_slice_in_dim(s["out"], token[:, None], s["step"], 1)
        recent = jnp.where(active[:, None], jnp.concatenate([s["recent"][:, 1:], token[:, None]], 1), s["recent"])
        lengths = s["lengths"] + active
        # Stopped rows still run through the model (shapes are static); their position is set to
        # -1, so what they write is never visible to anything.
        position = jnp.where(active, s["lengths"], -1)[:, None]
        logits, cache = model.apply({"params": params}, token[:, None], position, cache=s["cache"],
                                    cache_index=start + s["step"])
        return dict(step=s["step"] + 1, cache=cache, logits=logits[:, -1].astype(jnp.float32), recent=recent,
                    lengths=lengths, done=done, count=count, out=out, logit_buf=s["logit_buf"])

    s = jax.lax.while_loop(cond, body, state)
    # The cache is returned so that the donated input buffer becomes the output (no copy).
    return s["out"], s["count"], s["logit_buf"], s["step"], s["cache"]


def generate(params, cfg: LLMConfig, gen: GenerationConfig, prompts: Sequence[Sequence[int]], key=None,
             return_logits: bool = False, mesh=None, row_keys=None) -> GenerateOutput:
    """Generate for a batch of prompts (lists of ids).

    Each row's tokens equal that prompt's tokens alone: greedy trivially, and sampling because every
    row draws from its own key (`row_keys` [B]; by default `fold_in(key, row)`, so a prompt alone
    with `row_keys=[k]` reproduces its row exactly when given the same k). With `mesh`, the KV cache
    and the batch are sharded
    by the LLM rules (the batch must divide over data x fsdp); params should already be placed.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    for p in prompts:
        check_token_ids(np.asarray(p, np.int64), cfg)
    limit = min(gen.max_length, cfg.max_seq_len)
    longest = max(len(p) for p in prompts)
    if longest >= limit:
        raise PromptTooLongError(f"prompt of {longest} tokens leaves no room for new tokens "
                                 f"(max_length {gen.max_length}, model max_seq_len {cfg.max_seq_len})")
    key = jax.random.key(0) if key is None else key
    if row_keys is None:
        row_keys = jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(len(prompts)))
    elif len(row_keys) != len(prompts):
        raise ValueError(f"{len(row_keys)} row keys for {len(prompts)} prompts")
    prompt_len = bucket(longest, gen.min_prompt_bucket)
    max_steps = min(gen.max_new_tokens, limit - min(len(p) for p in prompts))
    cache_len = bucket(prompt_len + max_steps, gen.min_prompt_bucket)  # both bucketed: few compiles
    tokens, positions, lengths = left_pad(prompts, prompt_len, cfg.pad_id)
    budget = np.minimum(gen.max_new_tokens, limit - lengths).astype(np.int32)
    window = max(gen.repetition_window, 1)
    recent = np.full((len(prompts), window), -1, np.int32)
    for i, p in enumerate(prompts):
        tail = list(p)[-window:]
        recent[i, window - len(tail):] = tail

    cache = init_cache(cfg, len(prompts), cache_len)
    if mesh is not None:
        from editx_jax import sharding

        cache = sharding.shard_tree(cache, sharding.cache_shardings(mesh))
        tokens, positions = (jax.device_put(a, sharding.batch_sharding(mesh)) for a in (tokens, positions))
    last_logits, cache = prefill(params, cfg, jnp.asarray(tokens), jnp.asarray(positions), cache)
    out, count, logit_buf, steps, _ = decode(params, cfg, gen, cache, last_logits, jnp.asarray(recent),
                                          jnp.asarray(lengths), jnp.asarray(budget), row_keys, prompt_len,
                                          max_steps, room=cache_len - prompt_len, return_logits=return_logits)
    out, count = np.asarray(out), np.asarray(count)
    rows = [list(map(int, out[i, :count[i]])) for i in range(len(prompts))]
    if gen.drop_last:
        rows = [r[:-1] for r in rows]
    logits = np.asarray(logit_buf)[:, :int(steps)] if return_logits else None
    return GenerateOutput(tokens=rows, logits=logits, num_steps=int(steps))
