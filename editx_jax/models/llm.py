"""The Step1 LLM (architecture.md §1): pre-norm decoder, GQA with sqrt-ALiBi, SwiGLU, untied head.

Params tree (layer axis first under `layers`, stacked by `nn.scan`):

    embed/embedding                   [V, E]
    layers/input_norm/scale           [L, E]
    layers/attn/{q,k,v}_proj/kernel   [L, E, H|G, D]
    layers/attn/o_proj/kernel         [L, H, D, E]
    layers/post_attention_norm/scale  [L, E]
    layers/mlp/{gate,up}_proj/kernel  [L, E, F]
    layers/mlp/down_proj/kernel       [L, F, E]
    final_norm/scale                  [E]
    lm_head/kernel                    [E, V]

The KV cache is explicit data, not a Flax collection: `{"k", "v": [L, B, S, G, D], "pos": [B, S]}`
goes in and the updated cache comes out, so prefill and decode are pure functions.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from editx_jax.config import LLMConfig
from editx_jax.layers.attention import EMPTY_POSITION, alibi_attention
from editx_jax.layers.linear import Projection
from editx_jax.layers.norms import RMSNorm

ACT = ("activation_batch", "activation_length", "activation_embed")


def jnp_dtype(name: str):
    return jnp.dtype(name)


def _init(std: float, axes: tuple):
    return nn.with_logical_partitioning(nn.initializers.normal(std), axes)


def remat_policy(name: str):
    """Named activation-checkpointing policies (config field `llm.remat_policy`)."""
    cp = jax.checkpoint_policies
    return {
        "full": cp.nothing_saveable,
        "dots_saveable": cp.dots_saveable,
        "dots_with_no_batch_dims_saveable": cp.dots_with_no_batch_dims_saveable,
        "minimal": cp.checkpoint_dots_with_no_batch_dims,
    }[name]


def quantizes_embeddings(cfg: LLMConfig) -> bool:
    """The embedding table and lm_head are int8 too (llm.quantize_embeddings)."""
    return cfg.quantize == "int8" and cfg.quantize_embeddings


class Attention(nn.Module):
    cfg: LLMConfig
    prefill: bool = False  # the cache is empty before this call: attend over this call's keys only

    @nn.compact
    def __call__(self, x, positions, segment_ids, cache, layer, cache_positions, cache_index):
        cfg = self.cfg
        dtype, pdtype = jnp_dtype(cfg.dtype), jnp_dtype(cfg.param_dtype)
        std = cfg.hidden_size ** -0.5
        proj = functools.partial(Projection, std=std, dtype=dtype, param_dtype=pdtype, quantized=cfg.quantize == "int8")
        h, g, d = cfg.num_heads, cfg.num_groups, cfg.head_dim
        q = proj((h, d), ("embed", "heads", "head_dim"), name="q_proj")(x)
        k = proj((g, d), ("embed", "kv_heads", "head_dim"), name="k_proj")(x)
        v = proj((g, d), ("embed", "kv_heads", "head_dim"), name="v_proj")(x)
        q = nn.with_logical_constraint(q, ("activation_batch", "activation_length", "activation_heads", None))
        if cache is None:
            k_all, v_all, k_pos = k, v, positions
            new_cache = None
        else:
            # Write this call's k/v (grouped, not expanded) into this layer's rows of the whole
            # carried cache at columns [cache_index, cache_index + T): an in-place update of T
            # slots, never a rewrite of the cache.
            k = k.astype(cache["k"].dtype)
            v = v.astype(cache["v"].dtype)
            start = (layer, jnp.int32(0), cache_index, jnp.int32(0), jnp.int32(0))
            new_cache = {"k": jax.lax.dynamic_update_slice(cache["k"], k[None], start),
                         "v": jax.lax.dynamic_update_slice(cache["v"], v[None], start)}
            if self.prefill:
                # Every other slot is empty (invisible): the prompt's own keys are all there is.
                k_all, v_all, k_pos = k, v, positions
            else:
                k_all = jax.lax.dynamic_index_in_dim(new_cache["k"], layer, 0, keepdims=False)
                v_all = jax.lax.dynamic_index_in_dim(new_cache["v"], layer, 0, keepdims=False)
                k_pos = cache_positions
            segment_ids = None
        out = alibi_attention(q, k_all.astype(dtype), v_all, positions, k_pos, segment_ids, segment_ids,
                              dtype=dtype)
        # o_proj sums over H*D inputs, which need not equal E: its own fan-in sets its scale.
        out = proj((cfg.hidden_size,), ("heads", "head_dim", "embed"), in_ndim=2, std=(h * d) ** -0.5,
                   name="o_proj")(out)
        return out, new_cache


class MLP(nn.Module):
    cfg: LLMConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        dtype, pdtype = jnp_dtype(cfg.dtype), jnp_dtype(cfg.param_dtype)
        proj = functools.partial(Projection, dtype=dtype, param_dtype=pdtype, quantized=cfg.quantize == "int8")
        std = cfg.hidden_size ** -0.5
        gate = proj((cfg.intermediate_size,), ("embed", "mlp"), std=std, name="gate_proj")(x)
        up = proj((cfg.intermediate_size,), ("embed", "mlp"), std=std, name="up_proj")(x)
        hidden = nn.with_logical_constraint(nn.silu(gate) * up, ("activation_batch", "activation_length", "activation_mlp"))
        return proj((cfg.hidden_size,), ("mlp", "embed"), std=cfg.intermediate_size ** -0.5,
                    name="down_proj")(hidden)


class DecoderLayer(nn.Module):
    """One layer under `nn.scan`: the carry is (x, cache), `layer` (this layer's index) is scanned.

    The whole KV cache rides in the carry and each layer updates its own rows in place, so the scan
    holds one cache, not an input stack plus an output stack."""

    cfg: LLMConfig
    prefill: bool = False

    @nn.compact
    def __call__(self, carry, layer, positions, cache_positions, segment_ids, cache_index):
        cfg = self.cfg
        x, cache = carry
        norm = functools.partial(RMSNorm, eps=cfg.rms_norm_eps, dtype=jnp_dtype(cfg.dtype),
                                 param_dtype=jnp_dtype(cfg.param_dtype))
        attn_out, cache = Attention(cfg, self.prefill, name="attn")(norm(name="input_norm")(x), positions,
                                                                    segment_ids, cache, layer, cache_positions,
                                                                    cache_index)
        x = x + attn_out
        x = x + MLP(cfg, name="mlp")(norm(name="post_attention_norm")(x))
        x = nn.with_logical_constraint(x, ACT)
        return (x, cache), None


class TokenEmbedding(nn.Module):
    """The input embedding table (no scaling). Stored sharded like any weight; gathered whole for
    the lookup (an FSDP all-gather): a gather from a table split over its embed dim would leave
    the activations split over embed instead of batch, which XLA can only fix by replicating."""

    cfg: LLMConfig

    @nn.compact
    def __call__(self, tokens):
        cfg = self.cfg
        quantized = quantizes_embeddings(cfg)
        init = nn.with_logical_partitioning(nn.initializers.zeros, ("embed_vocab", "embed")) if quantized \
            else _init(1.0, ("embed_vocab", "embed"))  # int8: a placeholder (see models/quantize.py)
        table = self.param("embedding", init, (cfg.vocab_size, cfg.hidden_size),
                           jnp.int8 if quantized else jnp_dtype(cfg.param_dtype))
        table = nn.with_logical_constraint(table, (None, None))
        rows = jnp.take(table, tokens, axis=0)
        if quantized:  # int8 rows, one float32 scale per row (token)
            scale = self.param("embedding_scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed_vocab", None)),
                               (cfg.vocab_size, 1), jnp.float32)
            rows = rows.astype(jnp.float32) * jnp.take(nn.with_logical_constraint(scale, (None, None)), tokens, axis=0)
        return rows.astype(jnp_dtype(self.cfg.dtype))


class Step1(nn.Module):
    """Step1ForCausalLM. `__call__(tokens, positions, ...)` returns (logits, new_cache).

    tokens, positions: [B, T] int32 (positions are absolute, -1 marks padding).
    segment_ids: [B, T] for packed training (attention stays inside a segment); None otherwise.
    cache: None for a plain forward; else a dict from `init_cache` and `cache_index` (scalar) where
    this call's T tokens are written. Cache positions must be set by the caller (see generate/).
    prefill: the cache holds nothing yet, so attention reads this call's keys only (not the cache).
    last_only: logits of the last position only ([B, 1, V]), the one a prefill keeps.
    """

    cfg: LLMConfig
    prefill: bool = False

    @nn.compact
    def __call__(self, tokens, positions, segment_ids=None, cache=None, cache_index=None,
                 return_hidden: bool = False, last_only: bool = False):
        cfg = self.cfg
        dtype, pdtype = jnp_dtype(cfg.dtype), jnp_dtype(cfg.param_dtype)
        x = nn.with_logical_constraint(TokenEmbedding(cfg, name="embed")(tokens), ACT)

        layer = DecoderLayer
        if cfg.remat_policy != "none":
            layer = nn.remat(layer, policy=remat_policy(cfg.remat_policy), prevent_cse=False)
        layer_caches, cache_positions = None, None
        if cache is not None:
            layer_caches = {"k": cache["k"], "v": cache["v"]}
            cache_index = jnp.asarray(cache_index, jnp.int32)
            # Positions of every cache slot after this call's write, shared by all layers.
            cache_positions = jax.lax.dynamic_update_slice_in_dim(
                cache["pos"], positions.astype(cache["pos"].dtype), cache_index, axis=1)
        stack = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True},
                        in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                        length=cfg.num_layers, metadata_params={nn.PARTITION_NAME: "layers"})
        (x, new_layer_caches), _ = stack(cfg, self.prefill, name="layers")(
            (x, layer_caches), jnp.arange(cfg.num_layers, dtype=jnp.int32), positions, cache_positions,
            segment_ids, cache_index)
        if last_only:
            x = x[:, -1:]
        x = RMSNorm(eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=pdtype, name="final_norm")(x)
        if return_hidden:
            return x
        logits = Projection((cfg.vocab_size,), ("embed", "vocab"), std=cfg.hidden_size ** -0.5, dtype=dtype,
                            param_dtype=pdtype, quantized=quantizes_embeddings(cfg), name="lm_head")(x)
        logits = nn.with_logical_constraint(logits, ("activation_batch", "activation_length", "activation_vocab"))
        new_cache = None
        if cache is not None:
            new_cache = {"k": new_layer_caches["k"], "v": new_layer_caches["v"], "pos": cache_positions}
        return logits, new_cache


def init_cache(cfg: LLMConfig, batch: int, length: int, dtype=None) -> dict:
    """An empty KV cache: grouped k/v [L, B, S, G, D] and slot positions [B, S] (all empty)."""
    dtype = jnp_dtype(dtype or cfg.dtype)
    shape = (cfg.num_layers, batch, length, cfg.num_groups, cfg.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
            "pos": jnp.full((batch, length), EMPTY_POSITION, jnp.int32)}


def _boxed_abstract_params(cfg: LLMConfig):
    tokens = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(lambda: Step1(cfg).init(jax.random.key(0), tokens, tokens)["params"])


def abstract_params(cfg: LLMConfig):
    """The params tree as ShapeDtypeStructs (no allocation)."""
    return nn.meta.unbox(_boxed_abstract_params(cfg))


def param_logical_axes(cfg: LLMConfig):
    """The params tree with a PartitionSpec of logical axis names per leaf."""
    return nn.get_partition_spec(_boxed_abstract_params(cfg))


@functools.partial(jax.jit, static_argnames=("cfg",))
def init_params(cfg: LLMConfig, key) -> dict:
    """Random params as a plain nested dict (logical-axis boxes removed)."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    return nn.meta.unbox(Step1(cfg).init(key, tokens, tokens)["params"])


def _is_scan_float(x) -> bool:
    """A stacked bfloat16 layer kernel ([L, ...], ndim > 2): the leaves held as bits (see below)."""
    return x.dtype == jnp.bfloat16 and len(x.shape) > 2


def as_scan_bits(params):
    """The stacked bfloat16 layer kernels as their uint16 bits, inside a jit (leaves already stored
    as bits pass through; other dtypes too).

    XLA:CPU has no bfloat16 dynamic-slice: it converts the whole [L, ...] stack to float32 before the
    layer scan slices it, a float32 copy of every layer at once (12.8 GiB at the released size). On
    uint16 the scan slices one layer and `Projection` reinterprets it as bfloat16 inside the loop, so
    only one layer's working copy exists at a time. No numeric change. A bfloat16 argument still
    costs one uint16 copy of the stack at the jit boundary (6.5 GiB): hold the params in the storage
    form of `to_scan_storage` to avoid it.
    """
    def bits(x):
        return jax.lax.bitcast_convert_type(x, jnp.uint16) if _is_scan_float(x) else x
    return {**params, "layers": jax.tree_util.tree_map(bits, params["layers"])}


@jax.jit
def _to_bits(x):
    return jax.lax.bitcast_convert_type(x, jnp.uint16)


@jax.jit
def _to_bfloat16(x):
    return jax.lax.bitcast_convert_type(x, jnp.bfloat16)


def to_scan_storage(params: dict) -> dict:
    """Hold the stacked bfloat16 layer kernels as uint16 bits, the form the jitted prefill/decode
    slice without any whole-stack copy (see `as_scan_bits`). IN PLACE: each leaf of `params` is
    replaced as it is converted, so at most one extra leaf exists at a time (a numpy leaf becomes a
    free view; a device leaf one bitcast copy, sharding kept; an abstract leaf its uint16 struct).
    Returns `params`. Only inference holds this form: `from_scan_storage` gives the float tree back
    (export, training, anything that reads the weights)."""
    def walk(tree):
        for name, leaf in tree.items():
            if isinstance(leaf, dict):
                walk(leaf)
            elif _is_scan_float(leaf):
                if isinstance(leaf, np.ndarray):
                    tree[name] = leaf.view(np.uint16)
                elif isinstance(leaf, jax.ShapeDtypeStruct):
                    tree[name] = jax.ShapeDtypeStruct(leaf.shape, jnp.uint16, sharding=leaf.sharding)
                else:
                    tree[name] = _to_bits(leaf)
    walk(params["layers"])
    return params


def from_scan_storage(params: dict) -> dict:
    """The float params tree of a `to_scan_storage` tree (a new tree; numpy leaves are free views,
    device leaves one bitcast copy each). Other trees come back unchanged."""
    def floats(x):
        if x.dtype != jnp.uint16:
            return x
        return x.view(jnp.bfloat16) if isinstance(x, np.ndarray) else _to_bfloat16(x)
    return {**params, "layers": jax.tree_util.tree_map(floats, params["layers"])}


def check_token_ids(tokens, cfg: LLMConfig) -> None:
    """Reject ids outside the vocabulary before they reach a gather that would clamp them."""
    arr = np.asarray(tokens)
    if arr.size and (arr.min() < 0 or arr.max() >= cfg.vocab_size):
        bad = arr[(arr < 0) | (arr >= cfg.vocab_size)]
        raise ValueError(f"token id {int(bad[0])} is outside the vocabulary [0, {cfg.vocab_size})")


@functools.partial(jax.jit, static_argnames=("cfg",))
def forward(params, cfg: LLMConfig, tokens, positions=None, segment_ids=None):
    """Logits [B, T, V] of a plain forward (no cache). Positions default to 0..T-1."""
    tokens = jnp.asarray(tokens, jnp.int32)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    logits, _ = Step1(cfg).apply({"params": params}, tokens, positions, segment_ids)
    return logits
