"""Dual-codebook reshape + embedding and the upsampling conformer encoder of the flow model
(architecture.md §3.2, §3.4.1, §3.4.2, Appendix A)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FIXTURES, fixture_dirs

from editx_jax.config import ConfigError
from editx_jax.convert.flow_encoder import (EMBEDDING_RULES, ENCODER_RULES, embedding_from_state_dict,
                                            encoder_abstract, encoder_config_from_state_dict,
                                            encoder_from_state_dict, export_embedding, export_encoder)
from editx_jax.codes import AudioTokenError
from editx_jax.convert.flow_encoder import upsample_encoder_config_from_reference
from editx_jax.convert.keymap import ConversionError, convert
from editx_jax.decoder.embedding import (DualCodebookConfig, DualCodebookEmbedding, dual_frames,
                                         reshape_tokens)
from editx_jax.decoder import upsample_encoder
from editx_jax.decoder.upsample_encoder import (EncoderInputError, UpsampleConformerEncoderV2,
                                                UpsampleEncoderConfig, encode, rel_position_table, rel_shift)
from editx_jax.parity import Fixture, check_fixture


@pytest.fixture(scope="module")
def encoder_fixture():
    return Fixture.load(FIXTURES / "upsample_encoder_v2")


@pytest.fixture(scope="module")
def encoder_setup(encoder_fixture):
    config = upsample_encoder_config_from_reference(encoder_fixture.config)
    return config, encoder_from_state_dict(encoder_fixture.weights(), config)


# ---------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("path", fixture_dirs("dual_codebook_embedding") + fixture_dirs("upsample_encoder_v2"),
                         ids=lambda p: p.name)
def test_parity(path):
    result = check_fixture(path)
    assert result.status == "PASS", result.line()


def test_fixtures_present():
    assert fixture_dirs("dual_codebook_embedding") and fixture_dirs("upsample_encoder_v2")


# ---------------------------------------------------------------------------------------- reshape


def test_appendix_a_shapes():
    prompt = reshape_tokens([0, 1, 1024, 1025, 1026])[None]
    token = reshape_tokens([20, 21, 1027, 1028, 1029, 30, 31])[None]
    assert prompt.shape == (1, 3, 2) and token.shape == (1, 6, 2)
    pairs = np.concatenate([prompt, token], axis=1)
    assert pairs.shape == (1, 9, 2)
    assert dual_frames(5) == 3 and dual_frames(7) == 6
    emb = jax.eval_shape(lambda: DualCodebookEmbedding().init_with_output(jax.random.PRNGKey(0), pairs)[0])
    assert emb.shape == (1, 9, 512)
    h, mask = jax.eval_shape(lambda: UpsampleConformerEncoderV2().init_with_output(
        jax.random.PRNGKey(0), jnp.zeros((1, 9, 512)))[0])
    assert h.shape == (1, 18, 512) and mask.shape == (1, 1, 18)


def test_reshape_values():
    # (a, c+1), (b, d+1), (1024, e+1); len % 5 == 2 pads [1024, 1024, 1024]
    np.testing.assert_array_equal(
        reshape_tokens([20, 21, 1027, 1028, 1029, 30, 31]),
        [[20, 1028], [21, 1029], [1024, 1030], [30, 1025], [31, 1025], [1024, 1025]])
    # len % 5 == 1 pads [0, 1024, 1024, 1024]: the missing vq02 slot is code 0, not the pad id
    np.testing.assert_array_equal(reshape_tokens([5, 6, 1030, 1031, 1032, 7])[3:],
                                  [[7, 1025], [0, 1025], [1024, 1025]])
    assert reshape_tokens([]).shape == (0, 2)


@pytest.mark.parametrize("bad", [[5120], [-1, 3], 7, [[1, 2], [3, 5120]], np.array([1.5])])
def test_reshape_rejects_bad_values(bad):
    with pytest.raises(AudioTokenError):
        reshape_tokens(bad)


def test_embedding_shares_one_table_and_clamps():
    config = DualCodebookConfig(input_size=8)
    table = np.random.default_rng(0).normal(size=(5121, 4)).astype(np.float32)
    params = embedding_from_state_dict({"embedding.weight": table}, config)
    out = np.asarray(DualCodebookEmbedding(config).apply({"params": params}, np.array([[[3, 1030], [-1, 5120]]])))
    np.testing.assert_array_equal(out[0, 0], np.concatenate([table[3], table[1030]]))
    np.testing.assert_array_equal(out[0, 1], np.concatenate([table[0], table[5120]]))  # -1 clamps to row 0
    with pytest.raises(ConfigError, match="input_size"):
        DualCodebookConfig(input_size=7)


# ---------------------------------------------------------------------------------------- attention maths


def test_rel_position_table_and_shift():
    t, d = 5, 8
    table = rel_position_table(t, d)
    assert table.shape == (2 * t - 1, d)
    # the centre row is distance 0: sin 0 = 0, cos 0 = 1; row 0 is +(t-1), the last row -(t-1)
    np.testing.assert_array_equal(table[t - 1, 0::2], 0.0)
    np.testing.assert_array_equal(table[t - 1, 1::2], 1.0)
    np.testing.assert_allclose(table[0, 0], np.sin(t - 1), rtol=1e-6)
    np.testing.assert_allclose(table[-1, 0], -np.sin(t - 1), rtol=1e-6)
    raw = jnp.broadcast_to(jnp.arange(2 * t - 1, dtype=jnp.float32), (t, 2 * t - 1))
    shifted = np.asarray(rel_shift(raw))
    i, j = np.meshgrid(np.arange(t), np.arange(t), indexing="ij")
    np.testing.assert_array_equal(shifted, (t - 1) - i + j)  # the row of distance i - j


# ---------------------------------------------------------------------------------------- ragged batches


def test_ragged_batch_equals_alone(encoder_fixture, encoder_setup):
    config, params = encoder_setup
    xs = encoder_fixture.inputs()["xs"]
    lens = np.array([20, 14, 9])
    batch = np.concatenate([xs, xs[:1, ::-1]], axis=0)  # third item: a different sequence, padded
    out, mask = encode(params, batch, lens, config)
    np.testing.assert_array_equal(np.asarray(mask)[:, 0], np.arange(40)[None] < 2 * lens[:, None])
    for i, n in enumerate(lens):
        alone, _ = encode(params, batch[i:i + 1, :n], np.array([n]), config)
        np.testing.assert_allclose(np.asarray(out)[i, :2 * n], np.asarray(alone)[0], atol=2e-5, rtol=1e-5)


def test_reference_padding_leaks_into_short_items(encoder_fixture, encoder_setup):
    # isolate_padding=False is the reference: a short item reads its padding through the look-ahead
    config, params = encoder_setup
    leaky = dataclasses.replace(config, isolate_padding=False)
    xs = encoder_fixture.inputs()["xs"]
    out, _ = encode(params, xs, np.array([20, 14]), leaky)
    alone, _ = encode(params, xs[1:2, :14], np.array([14]), leaky)
    assert np.abs(np.asarray(out)[1, :28] - np.asarray(alone)[0]).max() > 1e-3


def test_empty_item_stays_finite(encoder_setup):
    config, params = encoder_setup
    out, mask = encode(params, np.ones((2, 6, 32), np.float32), np.array([6, 0]), config)
    assert np.isfinite(np.asarray(out)).all() and not np.asarray(mask)[1].any()


def test_long_inputs_attend_in_query_blocks_with_the_same_result(encoder_setup, monkeypatch):
    """Over QUERY_BLOCK frames the rel-pos attention runs its queries in blocks (padded to equal
    blocks, each row's relative shift from its absolute index): the same output as all at once,
    a ragged second item included."""
    config, params = encoder_setup
    xs = np.random.default_rng(0).standard_normal((2, 300, 32)).astype(np.float32)  # 600 frames after upsampling
    lens = np.array([300, 211])
    blocked, _ = encode(params, xs, lens, config)
    monkeypatch.setattr(upsample_encoder, "QUERY_BLOCK", 4096)
    jax.clear_caches()  # trace the jitted encoder again, unblocked
    whole, _ = encode(params, xs, lens, config)
    np.testing.assert_allclose(blocked, whole, atol=1e-5, rtol=1e-5)


def test_encoder_input_errors(encoder_setup):
    config, params = encoder_setup
    with pytest.raises(EncoderInputError, match="xs must be"):
        encode(params, np.zeros((1, 5, 16), np.float32), None, config)
    with pytest.raises(EncoderInputError, match="xs_lens"):
        encode(params, np.zeros((1, 5, 32), np.float32), np.array([6]), config)


# ---------------------------------------------------------------------------------------- config


def test_encoder_config_validation():
    with pytest.raises(ConfigError, match="attention_heads"):
        UpsampleEncoderConfig(attention_heads=7)
    with pytest.raises(ConfigError, match="input_size"):
        UpsampleEncoderConfig(input_size=80)
    with pytest.raises(ConfigError, match="input_layer"):
        upsample_encoder_config_from_reference({"input_layer": "conv2d"})
    with pytest.raises(ConfigError, match="bogus"):
        upsample_encoder_config_from_reference({"bogus": 1})


# ---------------------------------------------------------------------------------------- converter


def test_converter_round_trip_and_config_from_shapes(encoder_fixture, encoder_setup):
    config, params = encoder_setup
    weights = encoder_fixture.weights()
    assert len(weights) == 206  # the encoder's share of flow.pt's 605 tensors
    back = export_encoder(params)
    assert set(back) == set(weights)
    for name, value in weights.items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)
    inferred = encoder_config_from_state_dict(weights, prefix="encoder.")
    assert inferred == config
    table = np.arange(5121 * 3, dtype=np.float32).reshape(5121, 3)
    emb = embedding_from_state_dict({"embedding.weight": table}, DualCodebookConfig(input_size=6))
    np.testing.assert_array_equal(export_embedding(emb)["embedding.weight"], table)


def _released_flow_pt_shapes() -> dict[str, tuple]:
    """Encoder + embedding tensor names and shapes of the released flow.pt (§3.4.2)."""
    shapes = {"input_embedding.embedding.weight": (5121, 256)}
    for embed in ("embed", "up_embed"):
        shapes |= {f"encoder.{embed}.out.0.weight": (512, 512), f"encoder.{embed}.out.0.bias": (512,),
                   f"encoder.{embed}.out.1.weight": (512,), f"encoder.{embed}.out.1.bias": (512,)}
    for conv, k in (("pre_lookahead_layer.conv1", 4), ("pre_lookahead_layer.conv2", 3), ("up_layer.conv", 5)):
        shapes |= {f"encoder.{conv}.weight": (512, 512, k), f"encoder.{conv}.bias": (512,)}
    for stack, n in (("encoders", 6), ("up_encoders", 4)):
        for i in range(n):
            p = f"encoder.{stack}.{i}."
            for lin in ("linear_q", "linear_k", "linear_v", "linear_out"):
                shapes |= {p + f"self_attn.{lin}.weight": (512, 512), p + f"self_attn.{lin}.bias": (512,)}
            shapes |= {p + "self_attn.linear_pos.weight": (512, 512), p + "self_attn.pos_bias_u": (8, 64),
                       p + "self_attn.pos_bias_v": (8, 64), p + "feed_forward.w_1.weight": (2048, 512),
                       p + "feed_forward.w_1.bias": (2048,), p + "feed_forward.w_2.weight": (512, 2048),
                       p + "feed_forward.w_2.bias": (512,)}
            for norm in ("norm_mha", "norm_ff"):
                shapes |= {p + f"{norm}.weight": (512,), p + f"{norm}.bias": (512,)}
    return shapes | {"encoder.after_norm.weight": (512,), "encoder.after_norm.bias": (512,)}


class _ShapeSource:
    """A lazy source of zeros with the given shapes (no memory for the full-size tensors)."""

    def __init__(self, shapes):
        self._shapes = shapes

    def names(self):
        return list(self._shapes)

    def shape(self, name):
        return self._shapes[name]

    def get(self, name):
        return np.broadcast_to(np.float32(0), self._shapes[name])


def test_rules_fit_released_flow_pt_names():
    shapes = _released_flow_pt_shapes()
    assert len(shapes) == 207
    zeros = {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items() if k.startswith("encoder.")}
    config = encoder_config_from_state_dict(zeros)
    assert config == UpsampleEncoderConfig()
    abstract = encoder_abstract(config) | {"input_embedding": {"embedding": {
        "embedding": jax.ShapeDtypeStruct((5121, 256), jnp.float32)}}}
    params = convert(_ShapeSource(shapes), EMBEDDING_RULES + ENCODER_RULES, abstract)
    assert params["encoder"]["encoders"]["self_attn"]["pos_bias_u"].shape == (6, 8, 64)
    assert params["encoder"]["up_encoders"]["feed_forward"]["w_1"]["kernel"].shape == (4, 512, 2048)


def test_converter_bad_inputs(encoder_fixture, encoder_setup):
    config, _ = encoder_setup
    weights = dict(encoder_fixture.weights())
    missing = {k: v for k, v in weights.items() if k != "up_encoders.2.norm_ff.bias"}
    with pytest.raises(ConversionError, match=r"up_encoders\.2\.norm_ff\.bias"):
        encoder_from_state_dict(missing, config)
    wrong = weights | {"encoders.0.self_attn.linear_q.weight": weights["encoders.0.self_attn.linear_q.weight"][:, :16]}
    with pytest.raises(ConversionError, match=r"linear_q\.weight.*expected \[32, 32\]"):
        encoder_from_state_dict(wrong, config)
    with pytest.raises(ConversionError, match="unexpected"):
        encoder_from_state_dict(weights | {"encoders.0.conv_module.weight": np.zeros(3)}, config)
    with pytest.raises(ConversionError, match="out of range"):
        encoder_from_state_dict(weights | {"encoders.6.norm_ff.bias": np.zeros(32, np.float32)}, config)
    with pytest.raises(ConversionError, match="state_dict"):
        encoder_from_state_dict([1, 2], config)
    with pytest.raises(ConversionError, match="embedding"):
        embedding_from_state_dict({"embedding.weight": np.zeros((5120, 8), np.float32)},
                                  DualCodebookConfig(input_size=16))
