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

The KV cache is explicit data, not a Flax collection: `{"k", "v": L x [B * G, S, D], "pos": [B, S]}`
goes in and the updated cache comes out, so prefill and decode are pure functions.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from editx_jax import tree
from editx_jax.config import LLMConfig
from editx_jax.layers.activations import swiglu
from editx_jax.layers.attention import EMPTY_POSITION, alibi_attention, kv_layout
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


# Generation's lm_head runs in this many column blocks (see `_blocked_logits`).
LM_HEAD_BLOCKS = 8
# Prefill attends in blocks of this many queries: a long prompt's float32 scores are the largest
# temporaries of an edit (4 x 805 MB per layer for 2048 tokens at the released size, unblocked).
PREFILL_QUERY_BLOCK = 512


class Attention(nn.Module):
    cfg: LLMConfig
    prefill: bool = False  # the cache is empty before this call: attend over this call's keys only

    @nn.compact
    def __call__(self, x, positions, segment_ids, cache=None, cache_positions=None, cache_index=None):
        cfg = self.cfg
        dtype, pdtype = jnp_dtype(cfg.dtype), jnp_dtype(cfg.param_dtype)
        std = cfg.hidden_size ** -0.5
        proj = functools.partial(Projection, std=std, dtype=dtype, param_dtype=pdtype, quantized=cfg.quantize == "int8")
        h, g, d = cfg.num_heads, cfg.num_groups, cfg.head_dim
        q = proj((h, d), ("embed", "heads", "head_dim"), name="q_proj")(x)
        k = proj((g, d), ("embed", "kv_heads", "head_dim"), name="k_proj")(x)
        v = proj((g, d), ("embed", "kv_heads", "head_dim"), name="v_proj")(x)
        q = nn.with_logical_constraint(q, ("activation_batch", "activation_length", "activation_heads", None))
        k, v = kv_layout(k), kv_layout(v)  # [B * G, T, D]
        if cache is None:
            k_all, v_all, k_pos = k, v, positions
            new_cache = None
        else:
            # This layer's own cache buffers [B * G, S, D]: this call's k/v (grouped, not expanded)
            # are written in place at slots [cache_index, cache_index + T).
            new_cache = {name: jax.lax.dynamic_update_slice_in_dim(cache[name], new.astype(cache[name].dtype),
                                                                   cache_index, axis=1)
                         for name, new in (("k", k), ("v", v))}
            if self.prefill:
                # Every other slot is empty (invisible): the prompt's own keys are all there is.
                k_all, v_all, k_pos = k, v, positions
            else:
                k_all, v_all, k_pos = new_cache["k"], new_cache["v"], cache_positions
            segment_ids = None
        out = alibi_attention(q, k_all.astype(dtype), v_all, positions, k_pos, segment_ids, segment_ids,
                              dtype=dtype, query_block=PREFILL_QUERY_BLOCK if self.prefill else None)
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
        hidden = nn.with_logical_constraint(swiglu(gate, up), ("activation_batch", "activation_length", "activation_mlp"))
        return proj((cfg.hidden_size,), ("mlp", "embed"), std=cfg.intermediate_size ** -0.5,
                    name="down_proj")(hidden)


class DecoderLayer(nn.Module):
    """One layer: `(x, positions, segment_ids, cache, cache_positions, cache_index) -> (x, cache)`.

    Training stacks it with `nn.scan` (x is the carry, the rest broadcast, no cache); generation
    applies it layer by layer with that layer's own cache (`cached_forward`)."""

    cfg: LLMConfig
    prefill: bool = False

    @nn.compact
    def __call__(self, x, positions, segment_ids=None, cache=None, cache_positions=None, cache_index=None):
        cfg = self.cfg
        attn_out, cache = Attention(cfg, self.prefill, name="attn")(_norm(cfg, "input_norm")(x), positions,
                                                                    segment_ids, cache, cache_positions,
                                                                    cache_index)
        x = x + attn_out
        x = x + MLP(cfg, name="mlp")(_norm(cfg, "post_attention_norm")(x))
        x = nn.with_logical_constraint(x, ACT)
        return x, cache


def _norm(cfg: LLMConfig, name: str) -> RMSNorm:
    return RMSNorm(eps=cfg.rms_norm_eps, dtype=jnp_dtype(cfg.dtype), param_dtype=jnp_dtype(cfg.param_dtype), name=name)


def _lm_head(cfg: LLMConfig) -> Projection:
    return Projection((cfg.vocab_size,), ("embed", "vocab"), std=cfg.hidden_size ** -0.5, dtype=jnp_dtype(cfg.dtype),
                      param_dtype=jnp_dtype(cfg.param_dtype), quantized=quantizes_embeddings(cfg), name="lm_head")


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
        if rows.dtype == jnp.uint16:  # bfloat16 bits (the inference form): gathered, then seen as bfloat16
            rows = jax.lax.bitcast_convert_type(rows, jnp.bfloat16)
        if quantized:  # int8 rows, one float32 scale per row (token)
            scale = self.param("embedding_scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed_vocab", None)),
                               (cfg.vocab_size, 1), jnp.float32)
            rows = rows.astype(jnp.float32) * jnp.take(nn.with_logical_constraint(scale, (None, None)), tokens, axis=0)
        return rows.astype(jnp_dtype(self.cfg.dtype))


class Step1(nn.Module):
    """Step1ForCausalLM without a cache (training, scoring): `__call__(tokens, positions, ...)`
    returns the logits [B, T, V]. Generation runs the same layers through `cached_forward`.

    tokens, positions: [B, T] int32 (positions are absolute, -1 marks padding).
    segment_ids: [B, T] for packed training (attention stays inside a segment); None otherwise.
    """

    cfg: LLMConfig

    @nn.compact
    def __call__(self, tokens, positions, segment_ids=None, return_hidden: bool = False):
        cfg = self.cfg
        x = nn.with_logical_constraint(TokenEmbedding(cfg, name="embed")(tokens), ACT)
        layer = DecoderLayer
        if cfg.remat_policy != "none":
            layer = nn.remat(layer, policy=remat_policy(cfg.remat_policy), prevent_cse=False)
        stack = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True},
                        in_axes=(nn.broadcast, nn.broadcast), length=cfg.num_layers,
                        metadata_params={nn.PARTITION_NAME: "layers"})
        x, _ = stack(cfg, name="layers")(x, positions, segment_ids)
        x = _norm(cfg, "final_norm")(x)
        if return_hidden:
            return x
        return nn.with_logical_constraint(_lm_head(cfg)(x), ("activation_batch", "activation_length", "activation_vocab"))


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


# ------------------------------------------------------------------ generation (the inference form)
#
# Generation holds the weights in an inference form: the layers as one tree per layer
# (`params["layers"]` a tuple), run unrolled, each with its own KV cache buffers; bfloat16 kernels
# and the embedding table as their uint16 bits. Why, on XLA:CPU:
#  * a layer scan slices its weights out of the [L, ...] stacks on every step, and a dynamic slice
#    is copied before a dot reads it: decode, which reads every weight once per token, ran several
#    times slower that way (and a bfloat16 stack was widened to float32 whole);
#  * bfloat16 weights are widened to float32 for the dots; as loop-invariant values that widening
#    would be hoisted out of the decode loop (a float32 copy of every weight), and so would a
#    bitcast of them. Held as bits, the weights are tied to the step's data first (`_after`), so
#    each is widened where it is used, one layer's copy at a time.
#  * on a CPU, the layer kernels and the lm_head's are held transposed (`kernel_t`, [*out, *in]):
#    a one-token product then reads each output's weights as one contiguous row. XLA:CPU's
#    matrix-vector product reads the [*in, *out] layout at 24-33 GB/s here and the transposed one
#    at 31-42 GB/s; the 288M-param "LLM mid" decode step went from 33 to 28 ms with the layers
#    transposed. (Only on one CPU device: a mesh keeps the layout its rules table names.)


# Layer kernels whose input spans more than their first axis: o_proj reads [heads, head_dim].
KERNEL_IN_NDIM = {"attn/o_proj/kernel": 2}


def split_layers(params: dict, transpose: bool = True) -> dict:
    """The inference form of a params tree (see above). IN PLACE, one leaf at a time: numpy leaves
    become free views; a device leaf is sliced / bitcast on its devices, sharding kept, and dropped
    when nothing else holds it. Returns `params`. A tree already in this form comes back as it is.

    transpose: the layer kernels and the lm_head's that live on one CPU (numpy leaves or abstract
    ones when the default backend is the CPU) become `kernel_t` copies; a stack and its copies
    exist together once per leaf. False: views only (generate's one-call split of training params)."""
    if isinstance(params["layers"], tuple):
        return params
    for name in ("embed", "lm_head"):
        part = {}
        for key, leaf in params[name].items():
            if transpose and (name, key) == ("lm_head", "kernel") and _on_host_cpu(leaf):
                key, leaf = "kernel_t", _transposed(leaf, "lm_head/kernel")
            part[key] = _as_bits(leaf)
        params[name] = part  # a new dict: the caller's tree keeps its own
    flat = tree.flatten(params.pop("layers"))
    pieces = {}
    for name in list(flat):
        leaf = flat.pop(name)
        slices = _unstack(leaf)
        if transpose and name.endswith("/kernel") and _on_host_cpu(leaf):
            slices = [_transposed(s, name) for s in slices]
            name += "_t"
        del leaf
        pieces[name] = [_as_bits(s) for s in slices]  # each stack freed once sliced
        del slices
    names = list(pieces)
    params["layers"] = tuple(tree.unflatten({name: pieces[name][i] for name in names})
                             for i in range(len(pieces[names[0]])))
    return params


def stack_layers(params: dict, host: bool = False) -> dict:
    """The stored/training form of an inference-form tree: a new tree, the layers stacked again and
    the bits seen as bfloat16 (a copy of the layer weights; `host`: as numpy, a leaf at a time)."""
    if not isinstance(params["layers"], tuple):
        return params
    flats = [tree.flatten(layer) for layer in params["layers"]]

    def stack(name, pieces):
        if name.endswith("/kernel_t"):
            pieces = [_untransposed(p, name.removesuffix("_t")) for p in pieces]
        if host or isinstance(pieces[0], np.ndarray):
            return _as_floats(np.stack([np.asarray(p) for p in pieces]))
        return _as_floats(jnp.stack(pieces))
    out = {**params, "layers": tree.unflatten({name.removesuffix("_t"): stack(name, [f[name] for f in flats])
                                               for name in flats[0]})}
    for name in ("embed", "lm_head"):
        part = {}
        for key, leaf in params[name].items():
            leaf = np.asarray(leaf) if host else leaf
            part[key.removesuffix("_t")] = _as_floats(_untransposed(leaf, "lm_head/kernel") if key == "kernel_t" else leaf)
        out[name] = part
    return out


def _on_one_cpu(x: jax.Array) -> bool:
    devices = x.devices()
    return len(devices) == 1 and next(iter(devices)).platform == "cpu"


def _on_host_cpu(x) -> bool:
    """A leaf that generation reads on one CPU device: numpy, abstract without a mesh sharding (when
    the CPU is the default backend), or a jax array on one CPU device without a mesh."""
    if isinstance(x, np.ndarray) or (isinstance(x, jax.ShapeDtypeStruct) and x.sharding is None):
        return jax.default_backend() == "cpu"
    return isinstance(getattr(x, "sharding", None), jax.sharding.SingleDeviceSharding) and _on_one_cpu(x)


def _transposed(kernel, name: str):
    """A kernel [*in, *out] as `kernel_t` [*out, *in] (a copy); `name` finds its input rank."""
    n_in = KERNEL_IN_NDIM.get(name, 1)
    return _moved(kernel, n_in, kernel.ndim - n_in)


def _untransposed(kernel_t, name: str):
    """`_transposed` undone: [*out, *in] back to [*in, *out]."""
    n_out = kernel_t.ndim - KERNEL_IN_NDIM.get(name, 1)
    return _moved(kernel_t, n_out, kernel_t.ndim - n_out)


def _moved(x, n_front: int, n_back: int):
    """x [*front (n_front dims), *back (n_back dims)] as a contiguous [*back, *front] (a copy)."""
    axes = tuple(range(n_front, n_front + n_back)) + tuple(range(n_front))
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(tuple(x.shape[a] for a in axes), x.dtype, sharding=x.sharding)
    if isinstance(x, np.ndarray):
        return np.ascontiguousarray(x.transpose(axes))
    if _on_one_cpu(x):
        return jax.device_put(np.ascontiguousarray(np.asarray(x).transpose(axes)))
    return jnp.transpose(x, axes)


def _as_bits(x):
    """A bfloat16 kernel (ndim >= 2) as its uint16 bits; anything else unchanged."""
    if x.dtype != jnp.bfloat16 or len(x.shape) < 2:
        return x
    if isinstance(x, np.ndarray):
        return x.view(np.uint16)
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(x.shape, jnp.uint16, sharding=x.sharding)
    if _on_one_cpu(x):  # a view of the same buffer, no copy
        return jax.device_put(np.asarray(x).view(np.uint16))
    return _bitcast_jit(jnp.uint16)(x)


def _as_floats(x):
    if x.dtype != jnp.uint16:
        return x
    return x.view(jnp.bfloat16) if isinstance(x, np.ndarray) else _bitcast_jit(jnp.bfloat16)(x)


@functools.cache
def _bitcast_jit(dtype):
    return jax.jit(lambda x: jax.lax.bitcast_convert_type(x, dtype))


def inference_logical_axes(cfg: LLMConfig):
    """`param_logical_axes` for the inference form (each layer's leaves without the `layers` axis)."""
    axes = param_logical_axes(cfg)
    layer = jax.tree_util.tree_map(lambda spec: jax.sharding.PartitionSpec(*spec[1:]), axes["layers"],
                                   is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    return {**axes, "layers": (layer,) * cfg.num_layers}


def _unstack(leaf) -> list:
    """The layer slices of a stacked leaf. On one CPU device they are views of the stack's own buffer
    (numpy views put back without a copy), so splitting costs no memory; elsewhere they are sliced on
    the devices (the stack and its slices exist together once)."""
    if isinstance(leaf, np.ndarray):
        return list(leaf)
    if isinstance(leaf, jax.Array) and _on_one_cpu(leaf):
        return [jax.device_put(piece) for piece in np.asarray(leaf)]
    if isinstance(leaf, jax.ShapeDtypeStruct):
        piece = jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype, sharding=_drop_first_axis(leaf.sharding))
        return [piece] * leaf.shape[0]
    return list(_unstack_jit(_drop_first_axis(leaf.sharding), leaf.shape[0])(leaf))


def _drop_first_axis(sharding):
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*sharding.spec[1:]))
    return sharding


@functools.cache
def _unstack_jit(sharding, n: int):
    return jax.jit(lambda x: tuple(x[i] for i in range(n)), out_shardings=None if sharding is None else (sharding,) * n)


def _after(x, weights):
    """`weights` unchanged, as values XLA can only compute once `x` exists: integer kernels (bfloat16
    bits, int8) get a zero computed from `x` added (the top bit of a word whose top bit was cleared:
    no pass folds it), which is exact and fuses into their widening. Without it XLA:CPU hoists the
    widening of every layer out of the decode loop or schedules it up front (an optimization barrier
    does not stop it: XLA:CPU drops them before scheduling)."""
    word = jax.lax.bitcast_convert_type(x.reshape(-1)[0].astype(jnp.float32), jnp.int32)
    zero = jax.lax.shift_right_logical(word & 0x7FFFFFFF, 31)
    return jax.tree_util.tree_map(
        lambda w: w + zero.astype(w.dtype) if jnp.issubdtype(w.dtype, jnp.integer) and w.ndim >= 2 else w, weights)


def init_cache(cfg: LLMConfig, batch: int, length: int, dtype=None) -> dict:
    """An empty KV cache: per layer grouped k and v [B * G, S, D] (`layers.attention.kv_layout`),
    slot positions [B, S] (all empty)."""
    dtype = jnp_dtype(dtype or cfg.dtype)
    shape = (batch * cfg.num_groups, length, cfg.head_dim)
    return {"k": tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
            "v": tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
            "pos": jnp.full((batch, length), EMPTY_POSITION, jnp.int32)}


def cached_forward(params: dict, cfg: LLMConfig, tokens, positions, cache: dict, cache_index, prefill: bool = False):
    """The model over `tokens` [B, T] with the KV cache: writes their k/v at columns
    [cache_index, cache_index + T) and returns (float32 logits of the last position [B, V], new cache).

    params: the inference form (`split_layers`). The cache's slot positions are updated from
    `positions` (padding -1, never visible). prefill: the cache holds nothing yet, so attention reads
    this call's keys only.
    """
    cache_index = jnp.asarray(cache_index, jnp.int32)
    cache_positions = jax.lax.dynamic_update_slice_in_dim(cache["pos"], positions.astype(cache["pos"].dtype),
                                                          cache_index, axis=1)
    x = nn.with_logical_constraint(TokenEmbedding(cfg).apply({"params": params["embed"]}, tokens), ACT)
    layer = DecoderLayer(cfg, prefill)
    ks, vs = [], []
    for weights, k, v in zip(params["layers"], cache["k"], cache["v"]):
        weights = _after(x, weights)
        x, new = layer.apply({"params": weights}, x, positions, None, {"k": k, "v": v}, cache_positions, cache_index)
        ks.append(new["k"])
        vs.append(new["v"])
    x = _norm(cfg, "final_norm").apply({"params": params["final_norm"]}, x[:, -1:])
    return _blocked_logits(cfg, params["lm_head"], x)[:, 0].astype(jnp.float32), \
        {"k": tuple(ks), "v": tuple(vs), "pos": cache_positions}


def _blocked_logits(cfg: LLMConfig, lm_head: dict, x):
    """An lm_head stored as integers (bfloat16 bits, int8) in LM_HEAD_BLOCKS column blocks, each
    widened only once the previous block's logits exist (`_after`): one block's float32 copy at a
    time (115 MB at the released size) instead of the whole [E, V] table (0.86 GiB). Each logit is
    the same dot as unblocked. A float lm_head is read as it is, in one product."""
    kernel = lm_head.get("kernel_t", lm_head.get("kernel"))
    n_blocks = LM_HEAD_BLOCKS if jnp.issubdtype(kernel.dtype, jnp.integer) else 1
    size = -(-cfg.vocab_size // n_blocks)
    blocks, ready = [], x
    for start in range(0, cfg.vocab_size, size):
        stop = min(start + size, cfg.vocab_size)
        # kernel [E, V] or kernel_t [V, E], scale [1, V]
        weights = {name: leaf[start:stop] if name == "kernel_t" else leaf[..., start:stop] for name, leaf in lm_head.items()}
        head = Projection((stop - start,), ("embed", "vocab"), dtype=jnp_dtype(cfg.dtype),
                          param_dtype=jnp_dtype(cfg.param_dtype), quantized=quantizes_embeddings(cfg))
        blocks.append(head.apply({"params": _after(ready, weights)}, x))
        ready = blocks[-1]
    return jnp.concatenate(blocks, axis=-1)


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
    return Step1(cfg).apply({"params": params}, tokens, positions, segment_ids)
