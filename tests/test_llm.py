import jax
import jax.numpy as jnp
import numpy as np
import pytest

from editx_jax.config import LLMConfig
from editx_jax.layers.activations import swiglu
from editx_jax.layers.attention import alibi_attention, alibi_slopes, kv_layout
from editx_jax.models import llm

TINY = LLMConfig(vocab_size=512, hidden_size=48, intermediate_size=96, num_heads=6, num_groups=2, num_layers=2)


@pytest.fixture(scope="module")
def params():
    return llm.init_params(TINY, jax.random.key(1))


def test_slopes_for_48_heads_match_the_released_table():
    s = alibi_slopes(48)
    assert s.shape == (48,)
    np.testing.assert_allclose(s[[0, 1, 3, 15, 16, 31]], [0.840896, 0.707107, 0.5, 0.0625, 0.052556, 0.003906], atol=1e-6)
    np.testing.assert_allclose(s[[32, 33, 47]], [0.917004, 0.771105, 0.068157], atol=1e-6)
    np.testing.assert_allclose(alibi_slopes(8), 2.0 ** (-np.arange(1, 9)), rtol=1e-6)


def test_logical_axes_on_every_param():
    axes = llm.param_logical_axes(TINY)
    leaves = jax.tree_util.tree_leaves(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    assert len(leaves) == 12 and all(len(spec) >= 1 and all(a is not None for a in spec) for spec in leaves)
    assert axes["layers"]["attn"]["q_proj"]["kernel"] == jax.sharding.PartitionSpec("layers", "embed", "heads", "head_dim")


def test_causal(params):
    tokens = np.random.RandomState(0).randint(0, 512, (1, 10))
    full = llm.forward(params, TINY, tokens)
    prefix = llm.forward(params, TINY, tokens[:, :6])
    np.testing.assert_allclose(full[:, :6], prefix, atol=1e-5)


def test_packed_segments_equal_each_example_alone(params):
    rng = np.random.RandomState(1)
    a, b = rng.randint(0, 512, 7), rng.randint(0, 512, 5)
    packed = np.concatenate([a, b])[None]
    positions = np.concatenate([np.arange(7), np.arange(5)])[None]
    segments = np.array([[1] * 7 + [2] * 5])
    out = llm.forward(params, TINY, packed, jnp.asarray(positions), jnp.asarray(segments))
    np.testing.assert_allclose(out[0, :7], llm.forward(params, TINY, a[None])[0], atol=1e-5)
    np.testing.assert_allclose(out[0, 7:], llm.forward(params, TINY, b[None])[0], atol=1e-5)


def test_remat_policies_give_the_same_loss_and_grads(params):
    tokens = jnp.asarray(np.random.RandomState(2).randint(0, 512, (2, 8)))

    def loss(p, cfg):
        logits = llm.forward(p, cfg, tokens)
        return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    ref_l, ref_g = jax.value_and_grad(loss)(params, TINY)
    for policy in ("full", "dots_saveable"):
        cfg = LLMConfig(**{**TINY.__dict__, "remat_policy": policy})
        l, g = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, cfg)
        np.testing.assert_allclose(l, ref_l, rtol=1e-5)
        jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5), g, ref_g)


def test_swiglu_backward_equals_autodiff_of_its_expression():
    rng = np.random.RandomState(4)
    gate, up, grad = (jnp.asarray(rng.randn(3, 5, 7).astype(np.float32) * 4) for _ in range(3))
    out, vjp = jax.vjp(swiglu, gate, up)
    ref_out, ref_vjp = jax.vjp(lambda g, u: jax.nn.silu(g) * u, gate, up)
    np.testing.assert_array_equal(out, ref_out)
    for got, want in zip(vjp(grad), ref_vjp(grad)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_attention_gradients_equal_a_plain_softmax_attention():
    """alibi_attention's backward (its max shift held constant) against autodiff of the textbook
    form: expanded heads, a masked softmax (jax.nn.softmax)."""
    b, t, h, g, d = 2, 9, 4, 2, 8
    rng = np.random.RandomState(5)
    q = jnp.asarray(rng.randn(b, t, h, d).astype(np.float32))
    k, v = (jnp.asarray(rng.randn(b, t, g, d).astype(np.float32)) for _ in range(2))
    pos = jnp.asarray(np.stack([np.arange(t), np.r_[-1, -1, np.arange(t - 2)]]))  # row 1 left-padded
    probe = jnp.asarray(rng.randn(b, t, h, d).astype(np.float32))

    def ours(q, k, v):
        return jnp.sum(alibi_attention(q, kv_layout(k), kv_layout(v), pos, pos) * probe * (pos[..., None, None] >= 0))

    def plain(q, k, v):
        kh, vh = (jnp.repeat(a, h // g, axis=2) for a in (k, v))
        dist = (pos[:, :, None] - pos[:, None, :]).astype(jnp.float32)
        bias = -jnp.asarray(alibi_slopes(h))[None, :, None, None] * jnp.sqrt(jnp.maximum(dist, 0.0))[:, None]
        scores = jnp.einsum("bthd,bshd->bhts", q, kh) / np.sqrt(d) + bias
        scores = jnp.where(((dist >= 0) & (pos[:, None, :] >= 0))[:, None], scores, -1e30)
        out = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(scores, axis=-1), vh)
        return jnp.sum(jnp.where(pos[..., None, None] >= 0, out * probe, 0.0))

    got, want = jax.grad(ours, argnums=(0, 1, 2))(q, k, v), jax.grad(plain, argnums=(0, 1, 2))(q, k, v)
    for a, w in zip(got, want):
        np.testing.assert_allclose(a, w, rtol=1e-4, atol=1e-5)


def test_bfloat16_runs_close_to_float32(params):
    cfg = LLMConfig(**{**TINY.__dict__, "dtype": "bfloat16", "param_dtype": "bfloat16"})
    p16 = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
    tokens = np.random.RandomState(3).randint(0, 512, (1, 12))
    out16 = llm.forward(p16, cfg, tokens)
    out32 = llm.forward(params, TINY, tokens)
    assert out16.dtype == jnp.bfloat16
    assert float(jnp.max(jnp.abs(out16.astype(jnp.float32) - out32))) < 0.1 * float(jnp.max(jnp.abs(out32)))


def test_token_ids_outside_the_vocabulary_are_rejected():
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.check_token_ids([[1, 2, 512]], TINY)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.check_token_ids([[-1]], TINY)
