"""KV-cached generation: a jitted prefill, then a jitted `lax.while_loop` decode.

Prompts of different lengths are left-padded into one power-of-two bucket, so every row's prompt
ends at the same cache column and the decode loop writes one shared column per step. Padding has
position -1 and each row's positions start at 0 at its first real token, so a row of a batch sees
exactly what it would see alone. Rows stop on their own (EOS or their length budget); the loop
ends when every row has stopped or the step limit is reached.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from editx_jax import sharding
from editx_jax.config import GenerationConfig, LLMConfig
from editx_jax.generate.sampling import sample
from editx_jax.models.llm import cached_forward, check_token_ids, inference_logical_axes, init_cache, split_layers


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


@flax.struct.dataclass
class DecodeState:
    """The `lax.while_loop` state of `decode` (all arrays; batch-major except `step` and `cache`).

    step: steps run; cache: the KV cache (models/llm.py `init_cache`); logits [B, V]: the next-token
    logits to sample from; recent [B, W]: each row's last ids (repetition rule); lengths [B]: ids each
    row holds; done [B]: rows that stopped; count [B]: new tokens per row; out [B, room]: new ids
    (EOS after a row stops); logit_buf [B, room or 0, V]: the logits sampled from, when kept.
    """

    step: jax.Array
    cache: dict
    logits: jax.Array
    recent: jax.Array
    lengths: jax.Array
    done: jax.Array
    count: jax.Array
    out: jax.Array
    logit_buf: jax.Array


def initial_state(cfg: LLMConfig, cache, last_logits, recent, lengths, budget, room: int,
                  return_logits: bool = False) -> DecodeState:
    batch = last_logits.shape[0]
    return DecodeState(
        step=jnp.int32(0), cache=cache, logits=last_logits, recent=jnp.asarray(recent),
        lengths=jnp.asarray(lengths), done=jnp.asarray(budget) <= 0, count=jnp.zeros((batch,), jnp.int32),
        out=jnp.full((batch, room), cfg.eos_id, jnp.int32),
        logit_buf=jnp.zeros((batch, room if return_logits else 0, last_logits.shape[-1]), jnp.float32))


def _prefill(params, tokens, positions, cache, *, cfg: LLMConfig):
    # The cache is empty: attention reads the prompt's own keys, and only the last position's
    # logits are computed (the only ones sampled from).
    return cached_forward(params, cfg, tokens, positions, cache, 0, prefill=True)


def _decode(params, state: DecodeState, row_keys, budget, start, max_steps, *, cfg: LLMConfig,
            gen: GenerationConfig) -> DecodeState:
    slots = state.cache["pos"].shape[1]
    keep_logits = state.logit_buf.shape[1] > 0

    def cond(s: DecodeState):
        return (s.step < max_steps) & ~jnp.all(s.done)

    def body(s: DecodeState) -> DecodeState:
        step_keys = jax.vmap(jax.random.fold_in, (0, None))(row_keys, s.step)
        logit_buf = s.logit_buf
        if keep_logits:
            logit_buf = jax.lax.dynamic_update_slice_in_dim(logit_buf, s.logits[:, None], s.step, 1)
        token = sample(s.logits, step_keys, gen, s.recent, s.lengths)
        token = jnp.where(s.done, cfg.eos_id, token)
        active = ~s.done
        count = s.count + active
        done = s.done | (token == cfg.eos_id) | (count >= budget)
        out = jax.lax.dynamic_update_slice_in_dim(s.out, token[:, None], s.step, 1)
        recent = jnp.where(active[:, None], jnp.concatenate([s.recent[:, 1:], token[:, None]], 1), s.recent)
        # Stopped rows still run through the model (shapes are static); their position is set to
        # -1, so what they write is never visible to anything.
        position = jnp.where(active, s.lengths, -1)[:, None]
        # The cache is a ring over its columns (attention masks by stored positions, not columns):
        # past the last column, new tokens go to the first ones, which are left padding for every
        # row still running, since a row's prompt plus its budget fits in the cache (see `generate`).
        column = (start + s.step) % slots
        logits, cache = cached_forward(params, cfg, token[:, None], position, s.cache, column)
        return DecodeState(step=s.step + 1, cache=cache, logits=logits, recent=recent,
                           lengths=s.lengths + active, done=done, count=count, out=out, logit_buf=logit_buf)

    return jax.lax.while_loop(cond, body, state)


def _state_shardings(mesh, cfg: LLMConfig) -> DecodeState:
    """Batch-major fields split over data x fsdp, the cache by the LLM rules, the step replicated."""
    rows = functools.partial(sharding.batch_sharding, mesh)
    return DecodeState(step=sharding.replicated(mesh), cache=sharding.cache_shardings(mesh, cfg.num_layers), logits=rows(2),
                       recent=rows(2), lengths=rows(1), done=rows(1), count=rows(1), out=rows(2), logit_buf=rows(3))


@functools.cache
def prefill_jit(cfg: LLMConfig, mesh):
    """The jitted prefill `(params, tokens, positions, cache) -> (last logits [B, V], cache)`; the
    cache is donated. With a mesh, in/out shardings come from the LLM rules table."""
    fn = functools.partial(_prefill, cfg=cfg)
    if mesh is None:
        return jax.jit(fn, donate_argnums=(3,))
    params = sharding.logical_to_sharding(inference_logical_axes(cfg), mesh)
    batch, cache = sharding.batch_sharding(mesh), sharding.cache_shardings(mesh, cfg.num_layers)
    return jax.jit(fn, in_shardings=(params, batch, batch, cache), out_shardings=(batch, cache),
                   donate_argnums=(3,))


@functools.cache
def decode_jit(cfg: LLMConfig, gen: GenerationConfig, mesh):
    """The jitted decode `(params, state, row_keys, budget, start, max_steps) -> state`; the state
    (its cache included) is donated, so each step updates one cache column in place."""
    fn = functools.partial(_decode, cfg=cfg, gen=gen)
    if mesh is None:
        return jax.jit(fn, donate_argnums=(1,))
    params = sharding.logical_to_sharding(inference_logical_axes(cfg), mesh)
    rows, scalar = sharding.batch_sharding(mesh, 1), sharding.replicated(mesh)
    state = _state_shardings(mesh, cfg)
    return jax.jit(fn, in_shardings=(params, state, rows, rows, scalar, scalar), out_shardings=state,
                   donate_argnums=(1,))


def prefill(params, cfg: LLMConfig, tokens, positions, cache, mesh=None):
    """Run the padded prompts through the model, filling cache columns [0, P)."""
    if mesh is not None:
        batch = sharding.batch_sharding(mesh)
        tokens, positions = jax.device_put((tokens, positions), (batch, batch))
        cache = jax.device_put(cache, sharding.cache_shardings(mesh, cfg.num_layers), donate=True)
    with _rules(mesh):
        return prefill_jit(cfg, mesh)(params, tokens, positions, cache)


def decode(params, cfg: LLMConfig, gen: GenerationConfig, state: DecodeState, *, row_keys, budget, start,
           max_steps, mesh=None) -> DecodeState:
    """Sample up to `max_steps` (<= room, the width of `state.out`) tokens per row, feeding each back
    through the cache.

    row_keys [B]: one PRNG key per row, folded with the step number (a row samples as it would alone);
    budget [B]: how many new tokens each row may take; start: the cache column of the first new token.
    Returns the final state: `out` [B, room] (EOS-padded after a row stops), `count` new tokens per
    row, `logit_buf` (when kept), `step` steps run, and the cache (the donated input's buffer).
    """
    row_keys, budget = jnp.asarray(row_keys), jnp.asarray(budget)
    if mesh is not None:  # small host-made fields onto their shardings (the cache is already there)
        rows = sharding.batch_sharding(mesh, 1)
        state, row_keys, budget = jax.device_put((state, row_keys, budget), (_state_shardings(mesh, cfg), rows, rows))
    with _rules(mesh):
        return decode_jit(cfg, gen, mesh)(params, state, row_keys, budget, jnp.int32(start), jnp.int32(max_steps))


def _rules(mesh):
    """The mesh and the LLM rules, so the layers' logical constraints apply (nothing without a mesh)."""
    return contextlib.nullcontext() if mesh is None else sharding.use_mesh(mesh)


def check_room(prompt_lengths: Sequence[int], cfg: LLMConfig, gen: GenerationConfig) -> None:
    """PromptTooLongError for a prompt that leaves no room, or whose tokens plus an explicitly asked
    `max_new_tokens` exceed max_length. `max_new_tokens >= max_length` (the released default) means
    "as many as fit": `generate` caps each row to its room, as the official code does."""
    limit = min(gen.max_length, cfg.max_seq_len)
    longest = max(prompt_lengths)
    if longest >= limit:
        raise PromptTooLongError(f"the prompt is {longest} tokens, no room for new tokens under max_length {limit}")
    if gen.max_new_tokens < gen.max_length and longest + gen.max_new_tokens > limit:
        raise PromptTooLongError(f"the prompt is {longest} tokens and max_new_tokens {gen.max_new_tokens} more "
                                 f"exceeds max_length {limit}: ask for at most {limit - longest} new tokens")


def cache_length(prompt_len: int, max_steps: int, limit: int, minimum: int) -> int:
    """Cache slots for a left-padded prompt bucket of `prompt_len` plus `max_steps` new tokens: the
    prompt bucket plus the new tokens' bucket, never more than `limit` (max_length): the official
    rule counts prompt plus new tokens, so a row never holds more than `limit` ids; the padding
    columns are reused (a ring, see `decode`).

    Both terms are already compile keys (the prompt's width, and the new tokens' bucket is the
    width of `decode`'s output), so this adds no decode shape; rounding the sum up to a power of
    two instead left up to half the slots empty, and every decode step reads all of them
    (LLM mid, 512 + 128: 640 slots instead of 1024, 26.7 -> 24.9 ms per step)."""
    return min(prompt_len + bucket(max_steps, minimum), limit)


def widths(longest: int, max_steps: int, limit: int, minimum: int) -> tuple[int, int, int]:
    """What `generate` compiles for prompts of at most `longest` ids and `max_steps` new tokens:
    (prompt bucket, cache slots, `out` width), the last bucketed too so that few shapes compile."""
    prompt_len = min(bucket(longest, minimum), limit)
    cache_len = cache_length(prompt_len, max_steps, limit, minimum)
    return prompt_len, cache_len, min(bucket(max_steps, minimum), cache_len)


def idle_rows(n_rows: int, mesh) -> int:
    """Rows `generate` adds (budget 0, done from the start) so that a batch splits over the mesh's
    data x fsdp."""
    return 0 if mesh is None else -n_rows % (mesh.shape["data"] * mesh.shape["fsdp"])


PROGRESS_STEPS = 64  # decode steps between two progress reports (`generate(progress=...)`)


def generate(params, cfg: LLMConfig, gen: GenerationConfig, prompts: Sequence[Sequence[int]], key=None,
             return_logits: bool = False, mesh=None, row_keys=None, progress=None) -> GenerateOutput:
    """Generate for a batch of prompts (lists of ids).

    Each row's tokens equal that prompt's tokens alone: greedy trivially, and sampling because every
    row draws from its own key (`row_keys` [B]; by default `fold_in(key, row)`, so a prompt alone
    with `row_keys=[k]` reproduces its row exactly when given the same k). With `mesh`, prefill and
    decode run with the shardings of the LLM rules table: rows over data x fsdp (the batch is padded
    with idle rows to a multiple of it), heads and MLP over tensor, weights over fsdp; params should
    already be placed (`sharding.logical_to_sharding(inference_logical_axes(cfg), mesh)`).

    params: best in the inference form (`models.llm.split_layers`, what `EditX` holds); stacked
    params (training's form) are split here into views of the stacks, for the call.
    progress: called as progress(steps done, max steps) every PROGRESS_STEPS decode steps. The
    jitted loop then runs in legs of that many steps (the same compiled loop, resumed: the same
    tokens), so a long generation shows it is moving.
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
    n_rows = len(prompts)
    if row_keys is None:
        row_keys = jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(n_rows))
    elif len(row_keys) != n_rows:
        raise ValueError(f"{len(row_keys)} row keys for {n_rows} prompts")
    prompts = [list(p) for p in prompts]
    idle = idle_rows(n_rows, mesh)
    if idle:
        prompts += [prompts[0]] * idle
        row_keys = jnp.concatenate([row_keys, jnp.repeat(row_keys[:1], idle)])
    max_steps = min(gen.max_new_tokens, limit - min(len(p) for p in prompts))
    prompt_len, cache_len, room = widths(longest, max_steps, limit, gen.min_prompt_bucket)
    tokens, positions, lengths = left_pad(prompts, prompt_len, cfg.pad_id)
    budget = np.minimum(gen.max_new_tokens, limit - lengths).astype(np.int32)
    budget[n_rows:] = 0
    window = max(gen.repetition_window, 1)
    recent = np.full((len(prompts), window), -1, np.int32)
    for i, p in enumerate(prompts):
        tail = p[-window:]
        recent[i, window - len(tail):] = tail

    if not isinstance(params["layers"], tuple):
        params = split_layers(dict(params), transpose=False)  # views: no copy of the weights per call
    cache = init_cache(cfg, len(prompts), cache_len)
    last_logits, cache = prefill(params, cfg, jnp.asarray(tokens), jnp.asarray(positions), cache, mesh=mesh)
    state = initial_state(cfg, cache, last_logits, recent, lengths, budget, room, return_logits)
    leg = max_steps if progress is None else PROGRESS_STEPS
    while True:
        # the loop stops at `until` steps or once every row is done; it resumes from state.step
        until = min(max_steps, int(state.step) + leg)
        state = decode(params, cfg, gen, state, row_keys=row_keys, budget=budget, start=prompt_len,
                       max_steps=until, mesh=mesh)
        if progress is not None:
            progress(int(state.step), max_steps)
        if int(state.step) < until or until == max_steps:
            break
    out, count, steps = np.asarray(state.out), np.asarray(state.count), int(state.step)
    rows = [list(map(int, out[i, :count[i]])) for i in range(n_rows)]
    if gen.drop_last:
        rows = [r[:-1] for r in rows]
    logits = np.asarray(state.logit_buf)[:n_rows, :steps] if return_logits else None
    return GenerateOutput(tokens=rows, logits=logits, num_steps=steps)
