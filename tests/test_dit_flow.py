"""DiT estimator, flow-matching ODE, whole flow model and the flow.pt converter (architecture.md §3.4-3.6)."""

import numpy as np
import pytest
from conftest import fixture_dirs

import jax
import jax.numpy as jnp

from editx_jax.config import ConfigError
from editx_jax.convert.flow import (DIT_RULES, convert_dit, convert_flow, expected_flow_shapes, export_flow,
                                    flow_config_from_reference, flow_rules)
from editx_jax.convert.flow import dit_config_from_reference
from editx_jax.convert.keymap import ConversionError
from editx_jax.decoder import dit as dit_mod
from editx_jax.decoder.dit import DiT, DiTConfig, estimator
from editx_jax.decoder.embedding import DualCodebookConfig
from editx_jax.decoder.flow import (FlowConfig, FlowInputError, _inference, abstract_params, cfg_velocity,
                                    cosine_t_span, inference, init_params, noise_from_key, solve_euler,
                                    stretch_prompt_mel)
from editx_jax.decoder.upsample_encoder import UpsampleEncoderConfig
from editx_jax.parity import Fixture, check_fixture
from editx_jax.tree import flatten


@pytest.mark.parametrize("path", fixture_dirs("dit_estimator") + fixture_dirs("flow_inference"), ids=lambda p: p.name)
def test_parity(path):
    result = check_fixture(path)
    assert result.status == "PASS", result.line()


# ------------------------------------------------------------------------------------------ ODE


def test_cosine_t_span():
    t = np.asarray(cosine_t_span(10))
    assert t.dtype == np.float32 and t.shape == (11,)
    assert t[0] == 0.0 and abs(t[-1] - 1.0) < 1e-7
    np.testing.assert_allclose(t, 1 - np.cos(np.pi * np.arange(11) / 20), atol=1e-6)
    assert np.all(np.diff(np.diff(t)) > 0)  # denser near t = 0
    published = [0, 0.0123116, 0.0489435, 0.1089935, 0.1909830, 0.2928932, 0.4122148, 0.5460095,
                 0.6909831, 0.8435655, 1]
    np.testing.assert_allclose(t, published, atol=1e-6)


def test_solve_euler_visits_accumulated_times():
    t_span = cosine_t_span(10)
    # v = t: x(1) is the left Riemann sum of t over the schedule; the last velocity is at t_span[-2]
    x = solve_euler(lambda x, t: jnp.full_like(x, t), jnp.zeros((1, 3)), t_span)
    ts = np.asarray(t_span, np.float64)
    expect = np.sum(ts[:-1] * np.diff(ts))
    np.testing.assert_allclose(np.asarray(x), expect, rtol=1e-5)
    # constant velocity: the steps add up to exactly one unit of time
    x = solve_euler(lambda x, t: jnp.ones_like(x), jnp.zeros((2, 3)), t_span)
    np.testing.assert_allclose(np.asarray(x), 1.0, atol=1e-6)


def test_cfg_velocity_zeroes_conditions_in_the_unconditional_branch():
    seen = {}

    def estimator(x, mask, mu, t, spks, cond):
        seen["t"], seen["mask"] = t, mask
        return x + mu + spks[:, None, :] + cond

    key = jax.random.split(jax.random.key(1), 4)
    x, mu, cond = (jax.random.normal(k, (2, 5, 4)) for k in key[:3])
    spks = jax.random.normal(key[3], (2, 4))
    v = cfg_velocity(estimator, x, jnp.ones((2, 5), bool), mu, jnp.float32(0.3), spks, cond, 0.7)
    # 1.7 (x + mu + spks + cond) - 0.7 x
    np.testing.assert_allclose(np.asarray(v), np.asarray(x + 1.7 * (mu + spks[:, None] + cond)), atol=1e-5)
    assert seen["t"].shape == (4,) and np.allclose(np.asarray(seen["t"]), 0.3)
    assert seen["mask"].shape == (4, 5)


# ------------------------------------------------------------------------------------------ whole model

TINY = FlowConfig(input_size=16, embedding=DualCodebookConfig(input_size=16),
                  encoder=UpsampleEncoderConfig(input_size=16, output_size=16, attention_heads=2, linear_units=32,
                                                num_blocks=1, num_up_blocks=1),
                  estimator=DiTConfig(hidden_size=32, depth=1, num_heads=2, head_dim=16),
                  n_timesteps=3)


@pytest.fixture(scope="module")
def tiny():
    params = init_params(TINY, jax.random.key(3))
    rng = np.random.default_rng(0)
    pairs = lambda n: np.stack([rng.integers(0, 1025, n), rng.integers(1025, 5121, n)], -1)[None]  # noqa: E731
    return dict(params=params, token=pairs(6), prompt_token=pairs(4),
                prompt_feat=rng.standard_normal((1, 9, 80)).astype(np.float32),
                embedding=rng.standard_normal((1, 192)).astype(np.float32))


def test_noise_from_key_is_prefix_stable():
    key = jax.random.key(7)
    short, long = noise_from_key(key, 2, 5, 80), noise_from_key(key, 2, 12, 80)
    assert short.shape == (2, 5, 80)
    np.testing.assert_array_equal(np.asarray(short), np.asarray(long[:, :5]))
    assert not np.allclose(np.asarray(long[:, 5]), np.asarray(long[:, 6]))


def test_inference_noise_as_key_is_reproducible(tiny):
    args = (tiny["params"], tiny["token"], tiny["prompt_token"], tiny["prompt_feat"], tiny["embedding"], TINY)
    a = np.asarray(inference(*args, key=jax.random.key(5)))
    b = np.asarray(inference(*args, key=jax.random.key(5)))
    c = np.asarray(inference(*args, key=jax.random.key(6)))
    assert a.shape == (1, 12, 80) and np.all(np.isfinite(a))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3
    # the key is only a way to draw the explicit noise: passing that noise gives the same mel
    noise = noise_from_key(jax.random.key(5), 1, 20, 80)
    np.testing.assert_allclose(np.asarray(inference(*args, noise=noise)), a, atol=1e-6)


def test_inference_conditions_on_the_stretched_prompt_mel(tiny):
    args = (tiny["params"], tiny["token"], tiny["prompt_token"])
    base = np.asarray(inference(*args, tiny["prompt_feat"], tiny["embedding"], TINY))
    # the 9-frame prompt mel is stretched to 2 * 4 = 8 frames: the same as stretching it ourselves
    stretched = stretch_prompt_mel(tiny["prompt_feat"], 8)
    same = np.asarray(inference(*args, stretched, tiny["embedding"], TINY))
    np.testing.assert_allclose(same, base, atol=1e-6)
    other = np.asarray(inference(*args, tiny["prompt_feat"][:, ::-1], tiny["embedding"], TINY))
    assert np.abs(other - base).max() > 1e-3


def test_stretch_prompt_mel_matches_torch_nearest():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    for t_in, t_out in [(39, 36), (24, 24), (372, 120), (7, 16), (100, 99)]:
        mel = rng.standard_normal((1, t_in, 3)).astype(np.float32)
        want = torch.nn.functional.interpolate(torch.from_numpy(mel).transpose(1, 2), size=t_out,
                                               mode="nearest").transpose(1, 2).numpy()
        np.testing.assert_array_equal(stretch_prompt_mel(mel, t_out), want)


def test_inference_bad_input(tiny):
    p = tiny["params"]
    with pytest.raises(FlowInputError, match="token"):
        inference(p, tiny["token"][..., 0], tiny["prompt_token"], tiny["prompt_feat"], tiny["embedding"], TINY)
    with pytest.raises(FlowInputError, match="embedding"):
        inference(p, tiny["token"], tiny["prompt_token"], tiny["prompt_feat"], tiny["embedding"][:, :80], TINY)
    with pytest.raises(FlowInputError, match="noise"):
        inference(p, tiny["token"], tiny["prompt_token"], tiny["prompt_feat"], tiny["embedding"], TINY,
                  noise=np.zeros((1, 5, 80), np.float32))


def test_config_errors():
    with pytest.raises(ConfigError, match="dit.depth"):
        DiTConfig(depth=0)
    with pytest.raises(ConfigError, match="dit.in_channels"):
        DiTConfig(in_channels=321)
    with pytest.raises(ConfigError, match="flow.estimator"):
        FlowConfig(estimator=DiTConfig(in_channels=4 * 64))
    with pytest.raises(ConfigError, match="flow.decoder.sigma"):
        flow_config_from_reference({"decoder": {"sigma": 1}})
    assert flow_config_from_reference(Fixture.load(fixture_dirs("flow_inference")[0]).config).estimator.depth == 4


# ------------------------------------------------------------------------------------------ converter


def _spec_flow_shapes():
    """flow.pt tensor names and shapes written out from architecture.md §3.4.2 and §3.5 (released sizes)."""
    d, ff, h, mel = 512, 2048, 8, 80
    out = {"input_embedding.embedding.weight": (5121, 256),
           "spk_embed_affine_layer.weight": (80, 192), "spk_embed_affine_layer.bias": (80,),
           "encoder_proj.weight": (80, d), "encoder_proj.bias": (80,),
           "encoder.pre_lookahead_layer.conv1.weight": (d, d, 4), "encoder.pre_lookahead_layer.conv1.bias": (d,),
           "encoder.pre_lookahead_layer.conv2.weight": (d, d, 3), "encoder.pre_lookahead_layer.conv2.bias": (d,),
           "encoder.up_layer.conv.weight": (d, d, 5), "encoder.up_layer.conv.bias": (d,),
           "encoder.after_norm.weight": (d,), "encoder.after_norm.bias": (d,)}
    for e in ("embed", "up_embed"):
        out.update({f"encoder.{e}.out.0.weight": (d, d), f"encoder.{e}.out.0.bias": (d,),
                    f"encoder.{e}.out.1.weight": (d,), f"encoder.{e}.out.1.bias": (d,)})
    for stack, n in (("encoders", 6), ("up_encoders", 4)):
        for i in range(n):
            p = f"encoder.{stack}.{i}"
            for lin in ("linear_q", "linear_k", "linear_v", "linear_out"):
                out.update({f"{p}.self_attn.{lin}.weight": (d, d), f"{p}.self_attn.{lin}.bias": (d,)})
            out.update({f"{p}.self_attn.linear_pos.weight": (d, d), f"{p}.self_attn.pos_bias_u": (h, d // h),
                        f"{p}.self_attn.pos_bias_v": (h, d // h),
                        f"{p}.feed_forward.w_1.weight": (ff, d), f"{p}.feed_forward.w_1.bias": (ff,),
                        f"{p}.feed_forward.w_2.weight": (d, ff), f"{p}.feed_forward.w_2.bias": (d,)})
            for norm in ("norm_ff", "norm_mha"):
                out.update({f"{p}.{norm}.weight": (d,), f"{p}.{norm}.bias": (d,)})
    e = "decoder.estimator"
    out.update({f"{e}.t_embedder.mlp.0.weight": (d, 256), f"{e}.t_embedder.mlp.0.bias": (d,),
                f"{e}.t_embedder.mlp.2.weight": (d, d), f"{e}.t_embedder.mlp.2.bias": (d,),
                f"{e}.in_proj.weight": (d, 4 * mel), f"{e}.in_proj.bias": (d,),
                f"{e}.final_layer.adaLN_modulation.1.weight": (2 * d, d),
                f"{e}.final_layer.adaLN_modulation.1.bias": (2 * d,),
                f"{e}.final_layer.linear.weight": (mel, d), f"{e}.final_layer.linear.bias": (mel,)})
    for i in range(16):
        b = f"{e}.blocks.{i}"
        for lin in ("to_q", "to_k", "to_v", "proj"):
            out.update({f"{b}.attn.{lin}.weight": (d, d), f"{b}.attn.{lin}.bias": (d,)})
        for norm in ("q_norm", "k_norm"):
            out.update({f"{b}.attn.{norm}.weight": (64,), f"{b}.attn.{norm}.bias": (64,)})
        out.update({f"{b}.mlp.fc1.weight": (ff, d), f"{b}.mlp.fc1.bias": (ff,),
                    f"{b}.mlp.fc2.weight": (d, ff), f"{b}.mlp.fc2.bias": (d,),
                    f"{b}.conv.block.1.weight": (d, d, 3), f"{b}.conv.block.1.bias": (d,),
                    f"{b}.conv.block.3.weight": (d,), f"{b}.conv.block.3.bias": (d,),
                    f"{b}.conv.block.6.weight": (d, d, 3), f"{b}.conv.block.6.bias": (d,),
                    f"{b}.adaLN_modulation.1.weight": (9 * d, d), f"{b}.adaLN_modulation.1.bias": (9 * d,)})
    return out


def test_full_size_flow_keys_match_the_spec():
    spec = _spec_flow_shapes()
    assert len(spec) == 605  # §3.4.2
    ours = expected_flow_shapes()
    assert sorted(set(ours) ^ set(spec)) == []
    assert {k: v for k, v in ours.items() if spec[k] != v} == {}
    assert 150e6 < sum(int(np.prod(s)) for s in ours.values()) < 158e6  # §3.5: flow total about 154M


@pytest.fixture(scope="module")
def flow_fixture():
    return Fixture.load(fixture_dirs("flow_inference")[0])


def test_convert_flow_from_torch_file_and_export_round_trip(flow_fixture, tmp_path):
    torch = pytest.importorskip("torch")
    weights = flow_fixture.weights()
    config = flow_config_from_reference(flow_fixture.config)
    path = tmp_path / "flow.pt"
    torch.save({k: torch.from_numpy(v) for k, v in weights.items()}, path)
    from_file = flatten(convert_flow(path, config))
    from_dict = flatten(convert_flow(weights, config))
    assert from_file.keys() == from_dict.keys()
    for k in from_file:
        np.testing.assert_array_equal(from_file[k], from_dict[k])
    exported = dict(export_flow(convert_flow(weights, config)))
    assert exported.keys() == weights.keys()
    for k, v in weights.items():
        np.testing.assert_array_equal(exported[k], v)


def test_convert_flow_bad_input(flow_fixture, tmp_path):
    weights = flow_fixture.weights()
    config = flow_config_from_reference(flow_fixture.config)
    with pytest.raises(ConversionError, match="not found"):
        convert_flow(tmp_path / "missing.pt", config)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a pickle")
    with pytest.raises(ConversionError, match="not a readable torch checkpoint"):
        convert_flow(junk, config)
    with pytest.raises(ConversionError, match="state_dict"):
        convert_flow([1, 2, 3], config)
    name = "decoder.estimator.blocks.2.attn.to_q.weight"
    with pytest.raises(ConversionError, match=name.replace(".", r"\.")):
        convert_flow({k: v for k, v in weights.items() if k != name}, config)
    with pytest.raises(ConversionError, match="expected \\[64, 64\\]"):
        convert_flow({**weights, name: weights[name][:, :32]}, config)
    with pytest.raises(ConversionError, match="decoder.rand_noise"):
        convert_flow({**weights, "decoder.rand_noise": np.zeros((1, 80, 30), np.float32)}, config)
    with pytest.raises(ConversionError, match="out of range"):  # a depth-4 checkpoint into a depth-2 model
        convert_flow(weights, flow_config_from_reference(
            {**flow_fixture.config, "decoder": {"estimator": {**flow_fixture.config["decoder"]["estimator"],
                                                              "depth": 2}}}))


def test_dit_rules_cover_each_block_tensor_once():
    fx = Fixture.load(fixture_dirs("dit_estimator")[0])
    params = convert_dit(fx.weights(), dit_config_from_reference(fx.config))
    assert params["blocks"]["attn"]["to_q"]["kernel"].shape == (4, 64, 64)
    assert len({r.source for r in DIT_RULES}) == len(DIT_RULES)
    assert len({r.target for r in flow_rules()}) == len(flow_rules())


def test_released_size_inference_shapes():
    """The whole jitted ODE at the released sizes traces to the right shape (no weights allocated)."""
    config = FlowConfig()
    lp, lg = 12, 15
    frames = 2 * (lp + lg)
    sds = jax.ShapeDtypeStruct
    out = jax.eval_shape(lambda p, *a: _inference(p, *a, config=config, n_timesteps=10), abstract_params(config),
                         sds((1, lp + lg, 2), jnp.int32), sds((1, 192), jnp.float32),
                         sds((1, frames, 80), jnp.float32), sds((1, frames, 80), jnp.float32))
    assert out.shape == (1, frames, 80) and out.dtype == jnp.float32


def test_unrolled_estimator_equals_the_scanned_dit():
    """`dit.estimator` (blocks sliced once, unrolled: the fast path of the ODE) is the `DiT` module's
    layer scan up to float32 rounding (XLA fuses the two programs differently), padding mask included."""
    config = DiTConfig(hidden_size=32, depth=3, num_heads=2, head_dim=16)
    params = DiT(config).init(jax.random.key(0), jnp.zeros((1, 4, 80)), jnp.ones((1, 4), bool),
                              jnp.zeros((1, 4, 80)), jnp.zeros((1,)), jnp.zeros((1, 80)), jnp.zeros((1, 4, 80)))["params"]
    params = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(1), a.shape), params)
    rng = np.random.default_rng(0)
    x, mu, cond = (jnp.asarray(rng.standard_normal((2, 9, 80)), jnp.float32) for _ in range(3))
    mask = jnp.asarray(np.arange(9)[None, :] < np.array([[9], [6]]))
    args = (x, mask, mu, jnp.asarray([0.2, 0.7]), jnp.asarray(rng.standard_normal((2, 80)), jnp.float32), cond)
    scanned = jax.jit(lambda p: DiT(config).apply({"params": p}, *args))(params)
    unrolled = jax.jit(lambda p: estimator(params=p, config=config)(*args))(params)
    np.testing.assert_allclose(np.asarray(unrolled), np.asarray(scanned), rtol=1e-5, atol=2e-6)


def test_long_inputs_attend_in_query_blocks_with_the_same_result(monkeypatch):
    """Over QUERY_BLOCK frames the DiT attends in query blocks (padded to equal blocks): the same
    velocity as all queries at once, padded key frames masked either way."""
    cfg = DiTConfig(hidden_size=32, depth=2, num_heads=2, head_dim=16)
    params = DiT(cfg).init(jax.random.key(0), *_dit_inputs(cfg, 4))["params"]
    inputs = _dit_inputs(cfg, 1100)  # 3 blocks of 367 queries (1 padded row)
    blocked = estimator(params, cfg)(*inputs)
    monkeypatch.setattr(dit_mod, "QUERY_BLOCK", 4096)
    whole = estimator(params, cfg)(*inputs)
    np.testing.assert_allclose(blocked, whole, atol=1e-5, rtol=1e-5)


def _dit_inputs(cfg, t):
    rng = np.random.default_rng(t)
    x, mu, cond = (jnp.asarray(rng.standard_normal((2, t, 80)), jnp.float32) for _ in range(3))
    mask = jnp.ones((2, t), bool).at[1, t - t // 5:].set(False)  # the second row padded at the end
    return x, mask, mu, jnp.asarray([0.3, 0.7]), jnp.asarray(rng.standard_normal((2, 80)), jnp.float32), cond
