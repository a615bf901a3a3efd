"""Random initialisation scales each kernel by its real fan-in, so random-weight attention is not
saturated (demos and benchmarks run on these weights)."""

import jax
import numpy as np

from editx_jax.config import LLMConfig
from editx_jax.models import llm
from editx_jax.random_init import random_params

# Wide enough that scaling q/k by H (or o_proj by D) instead of E would be far off 1/sqrt(fan_in).
CFG = LLMConfig(vocab_size=64, hidden_size=512, intermediate_size=256, num_heads=8, num_groups=2, num_layers=1)


def _attn(params):
    return {k: np.asarray(v["kernel"], np.float64) for k, v in params["layers"]["attn"].items()}


def _check_kernel_stds(attn):
    e, h, d = CFG.hidden_size, CFG.num_heads, CFG.head_dim
    for name in ("q_proj", "k_proj", "v_proj"):
        assert attn[name].shape[1] == e
        np.testing.assert_allclose(attn[name].std(), e ** -0.5, rtol=0.05, err_msg=name)
    assert attn["o_proj"].shape[1:3] == (h, d)
    np.testing.assert_allclose(attn["o_proj"].std(), (h * d) ** -0.5, rtol=0.05, err_msg="o_proj")


def test_random_params_scale_attention_kernels_by_their_fan_in():
    _check_kernel_stds(_attn(random_params(llm.abstract_params(CFG), seed=0)))


def test_flax_init_scales_attention_kernels_by_their_fan_in():
    _check_kernel_stds(_attn(llm.init_params(CFG, jax.random.key(0))))


def test_random_weight_attention_is_not_saturated():
    """Softmax of q.k/sqrt(D) over 64 keys for unit-variance inputs: with the real fan-in the
    logits have unit scale and the rows keep most of their entropy; a one-hot row has none."""
    attn = _attn(random_params(llm.abstract_params(CFG), seed=1))
    x = np.random.default_rng(2).standard_normal((64, CFG.hidden_size))
    q = np.einsum("te,ehd->htd", x, attn["q_proj"][0])
    k = np.einsum("te,egd->gtd", x, attn["k_proj"][0])
    k = np.repeat(k, CFG.num_heads // CFG.num_groups, axis=0)
    scores = np.einsum("htd,hsd->hts", q, k) / np.sqrt(CFG.head_dim)
    assert 0.5 < scores.std() < 2.0
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    entropy = -(probs * np.log(probs + 1e-30)).sum(-1).mean()
    assert entropy > 0.5 * np.log(64), entropy
