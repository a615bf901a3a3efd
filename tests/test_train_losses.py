"""The RL / preference losses against plain numpy references written here."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from editx_jax.train import losses as L


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def test_token_log_probs_and_entropy():
    rng = np.random.RandomState(0)
    logits = rng.randn(2, 5, 11).astype(np.float32)
    targets = rng.randint(0, 11, (2, 5))
    for temp in (1.0, 0.7):
        z = logits / temp
        logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        want = np.take_along_axis(logp, targets[..., None], -1)[..., 0]
        np.testing.assert_allclose(L.token_log_probs(logits, targets, temp), want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(L.token_entropy(logits, temp), -(np.exp(logp) * logp).sum(-1), rtol=1e-5)


def test_bradley_terry():
    rc, rr = np.array([1.0, -0.5, 2.0]), np.array([0.0, 0.5, 1.5])
    m = np.array([0.5, 0.0, 1.0])
    loss, met = L.bradley_terry_loss(jnp.asarray(rc), jnp.asarray(rr))
    np.testing.assert_allclose(loss, np.mean(-np.log(_sigmoid(rc - rr))), rtol=1e-6)
    loss, _ = L.bradley_terry_loss(jnp.asarray(rc), jnp.asarray(rr), jnp.asarray(m), center_coef=0.01)
    want = np.mean(-np.log(_sigmoid(rc - rr - m))) + 0.01 * np.mean((rc + rr) ** 2)
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    np.testing.assert_allclose(met["accuracy"], 2 / 3, rtol=1e-6)
    np.testing.assert_allclose(met["margin"], np.mean(rc - rr), rtol=1e-6)


def test_dpo_sigmoid_loss():
    rng = np.random.RandomState(1)
    pc, pr, rc, rr = (rng.randn(6) * 3 for _ in range(4))
    loss, met = L.dpo_loss(pc, pr, rc, rr, beta=0.1)
    z = 0.1 * ((pc - rc) - (pr - rr))
    np.testing.assert_allclose(loss, np.mean(-np.log(_sigmoid(z))), rtol=1e-5)
    np.testing.assert_allclose(met["reward_margin"], np.mean(z), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(met["reward_accuracy"], np.mean(z > 0))
    loss_ls, _ = L.dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.2)
    np.testing.assert_allclose(loss_ls, np.mean(-0.8 * np.log(_sigmoid(z)) - 0.2 * np.log(_sigmoid(-z))), rtol=1e-5)


def _gae_ref(r, v, m, gamma, lam):
    adv = np.zeros_like(r)
    for b in range(r.shape[0]):
        idx = np.nonzero(m[b])[0]
        last = 0.0
        for k in range(len(idx) - 1, -1, -1):
            t = idx[k]
            nv = v[b, idx[k + 1]] if k + 1 < len(idx) else 0.0
            delta = r[b, t] + gamma * nv - v[b, t]
            last = delta + gamma * lam * last
            adv[b, t] = last
    return adv, (adv + v) * m


def test_gae_reverse_scan_matches_the_loop():
    rng = np.random.RandomState(2)
    r, v = rng.randn(3, 9).astype(np.float32), rng.randn(3, 9).astype(np.float32)
    m = np.zeros((3, 9), np.float32)
    m[0, 2:9] = 1
    m[1, 4:6] = 1
    m[2, 0:3] = 1  # runs that end before the last column: the episode ends there
    for gamma, lam in ((1.0, 0.95), (0.9, 0.5)):
        adv, ret = L.gae(r, v, m, gamma, lam)
        want_adv, want_ret = _gae_ref(r, v, m, gamma, lam)
        np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ret, want_ret, rtol=1e-5, atol=1e-6)


def test_whiten():
    rng = np.random.RandomState(3)
    x = rng.randn(4, 6).astype(np.float32) * 3 + 1
    m = (rng.rand(4, 6) > 0.3).astype(np.float32)
    vals = x[m > 0]
    want = (x - vals.mean()) / np.sqrt(vals.var() + 1e-8) * m
    np.testing.assert_allclose(L.whiten(x, m), want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(L.whiten(x, m, shift_mean=False), (want + vals.mean()) * m, rtol=1e-4, atol=1e-5)


def test_ppo_losses():
    rng = np.random.RandomState(4)
    logp, old = rng.randn(3, 5) * 0.3, rng.randn(3, 5) * 0.3
    adv = rng.randn(3, 5)
    m = (rng.rand(3, 5) > 0.2).astype(np.float64)
    ratio = np.exp(logp - old)
    l1, l2 = -adv * ratio, -adv * np.clip(ratio, 0.8, 1.2)
    loss, clipfrac, _ = L.ppo_policy_loss(logp, old, adv, m, 0.2)
    np.testing.assert_allclose(loss, (np.maximum(l1, l2) * m).sum() / m.sum(), rtol=1e-5)
    np.testing.assert_allclose(clipfrac, ((l2 > l1) * m).sum() / m.sum(), rtol=1e-5)
    assert 0 < float(clipfrac) < 1
    v, ov, ret = rng.randn(3, 5), rng.randn(3, 5), rng.randn(3, 5)
    vloss, _ = L.ppo_value_loss(v, ov, ret, m, 0.2)
    vc = ov + np.clip(v - ov, -0.2, 0.2)
    np.testing.assert_allclose(vloss, 0.5 * (np.maximum((v - ret) ** 2, (vc - ret) ** 2) * m).sum() / m.sum(),
                               rtol=1e-5)
    ev = L.explained_variance(v, ret, m)
    rr, ee = ret[m > 0], (ret - v)[m > 0]
    np.testing.assert_allclose(ev, 1 - ee.var() / rr.var(), rtol=1e-4)
    np.testing.assert_allclose(L.explained_variance(ret, ret, m), 1.0, atol=1e-6)


def test_k3_kl_and_group_advantages():
    rng = np.random.RandomState(5)
    logp, ref = rng.randn(7), rng.randn(7)
    np.testing.assert_allclose(L.k3_kl(logp, ref), np.exp(ref - logp) - (ref - logp) - 1, rtol=1e-6)
    assert float(jnp.min(L.k3_kl(logp, ref))) >= 0
    r = rng.rand(8).astype(np.float32)
    g = r.reshape(2, 4)
    want = ((g - g.mean(1, keepdims=True)) / (g.std(1, ddof=1, keepdims=True) + 1e-4)).reshape(8)
    np.testing.assert_allclose(L.group_advantages(jnp.asarray(r), 4), want, rtol=1e-5)
    np.testing.assert_allclose(L.group_advantages(jnp.ones(4), 2), 0.0)  # equal rewards: no signal
    with pytest.raises(L.LossInputError, match="does not divide"):
        L.group_advantages(jnp.asarray(r), 3)
    with pytest.raises(L.LossInputError, match="at least 2"):
        L.group_advantages(jnp.asarray(r), 1)


def test_grpo_token_mean_loss():
    rng = np.random.RandomState(6)
    logp, old, ref = (rng.randn(4, 6) * 0.2 for _ in range(3))
    adv = rng.randn(4)
    m = (rng.rand(4, 6) > 0.3).astype(np.float64)
    ratio = np.exp(logp - old)
    a = adv[:, None]
    per = -np.minimum(ratio * a, np.clip(ratio, 0.8, 1.2) * a) + 0.1 * (np.exp(ref - logp) - (ref - logp) - 1)
    loss, _ = L.grpo_loss(logp, old, ref, adv, m, 0.2, 0.1)
    np.testing.assert_allclose(loss, (per * m).sum() / m.sum(), rtol=1e-5)
    # a micro-batch normalised by the whole generation batch's token count
    loss_half, _ = L.grpo_loss(logp[:2], old[:2], ref[:2], adv[:2], m[:2], 0.2, 0.1, num_tokens=m.sum())
    np.testing.assert_allclose(loss_half, (per[:2] * m[:2]).sum() / m.sum(), rtol=1e-5)
    # pi_old = pi (one iteration per generation): the gradient is -A * grad logp / N + beta * grad KL
    g = jax.grad(lambda lp: L.grpo_loss(lp, jax.lax.stop_gradient(lp), ref, adv, m, 0.2, 0.0)[0])(jnp.asarray(logp))
    np.testing.assert_allclose(g, -a * m / m.sum(), rtol=1e-5, atol=1e-7)
