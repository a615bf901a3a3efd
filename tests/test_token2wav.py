"""token2wav (offline, batched, streaming), prompt features, the decoder converter and bad input."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import AUDIO, FIXTURES
from reference_models import export_campplus_onnx, torch_campplus

from editx_jax.audio.io import prepare_clip
from editx_jax.codes import AudioTokenError
from editx_jax.config import ConfigError
from editx_jax.convert.bigvgan import rules
from editx_jax.convert.campplus import campplus_config_from_reference, from_state_dict
from editx_jax.convert.flow import export_flow
from editx_jax.convert.hift import to_state_dict
from editx_jax.convert.keymap import export
from editx_jax.decoder import bigvgan as bigvgan_mod
from editx_jax.decoder import campplus, mel
from editx_jax.decoder import flow as flow_mod
from editx_jax.decoder import hift as hift_mod
from editx_jax.decoder import stream as stream_mod
from editx_jax.decoder.bigvgan import BigVGANConfig, abstract_params
from editx_jax.decoder.campplus import embed_feats
from editx_jax.decoder.dit import DiTConfig
from editx_jax.decoder.embedding import DualCodebookConfig, DualCodebookEmbedding, reshape_tokens
from editx_jax.decoder.stream import Token2WavStream
from editx_jax.decoder.token2wav import Decoder, Token2WavConfig, _encode, flow_batch
from editx_jax.decoder.tokens import Token2WavError, bf16_round, reshape_values
from editx_jax.decoder.upsample_encoder import UpsampleEncoderConfig
from editx_jax.layers.activations import kaiser_sinc_filter
from editx_jax.parity import Fixture, compare
from editx_jax.parity.runners.decoder_token2wav import run_token2wav, run_token2wav_hift
from editx_jax.random_init import random_params

ROOT = pathlib.Path(__file__).resolve().parents[1]
OFFSET = 65536


# ----------------------------------------------------------------------------------- small models


def small_flow_config(depth: int = 2) -> flow_mod.FlowConfig:
    return flow_mod.FlowConfig(
        input_size=32, embedding=DualCodebookConfig(input_size=32),
        encoder=UpsampleEncoderConfig(input_size=32, output_size=32, attention_heads=4, linear_units=64),
        estimator=DiTConfig(hidden_size=64, depth=depth, num_heads=4, head_dim=16))


SMALL_HIFT = hift_mod.HiFTConfig(base_channels=16, f0_cond_channels=16)


@pytest.fixture(scope="module")
def small_decoder():
    cfg = small_flow_config()
    fp = random_params(flow_mod.abstract_params(cfg), 1)
    # small vocoder kernels keep HiFT out of its chaotic regime (exp magnitudes clipped at 100, f0
    # in the kHz), where float rounding alone flips samples between +-0.99
    vp = random_params(hift_mod.abstract_params(SMALL_HIFT), 3, kernel_scale=0.3)
    return Decoder(fp, cfg, vp, SMALL_HIFT)


def ids(n: int, seed: int = 0) -> np.ndarray:
    """n LLM ids in the group pattern [vq02, vq02, vq06, vq06, vq06]."""
    rng = np.random.default_rng(seed)
    out = [OFFSET + (int(rng.integers(0, 1024)) if i % 5 < 2 else 1024 + int(rng.integers(0, 4096))) for i in range(n)]
    return np.asarray(out, np.int64)


def prompt(seed: int = 0, n_ids: int = 20):
    rng = np.random.default_rng(seed + 100)
    frames = 2 * 3 * -(-n_ids // 5)
    return ids(n_ids, seed + 50), rng.normal(-5, 2, (frames + 3, 80)).astype(np.float32), \
        rng.normal(size=192).astype(np.float32)


# ----------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("name", ["token2wav", "token2wav_hift"])
def test_parity(name):
    fx = Fixture.load(FIXTURES / name)
    got = (run_token2wav if name == "token2wav" else run_token2wav_hift)(fx)
    ok, max_abs, _, detail = compare(fx.outputs(), got, float(fx.manifest["atol"]), float(fx.manifest["rtol"]))
    assert ok, detail
    assert max_abs < float(fx.manifest["atol"])


# ----------------------------------------------------------------------------------- tokens


def test_reshape_and_stray_ids_clamped():
    values = np.array([5, 6, 1024 + 7, 1024 + 8, 1024 + 9, -3, 2, -10, 1030, 1031])
    pairs = reshape_values(values)
    np.testing.assert_array_equal(pairs[:3], [[5, 7 + 1025], [6, 8 + 1025], [1024, 9 + 1025]])
    # a stray text id (value < 0) reads row 0 in either slot, as clamp(min=0) in flow.inference
    np.testing.assert_array_equal(pairs[3:], [[0, 0], [2, 6 + 1025], [1024, 7 + 1025]])
    # ragged tails follow the official padding
    assert reshape_values(np.array([1, 2, 1024 + 3])).tolist() == [[1, 3 + 1025], [2, 1025], [1024, 1025]]
    assert reshape_values(np.array([1])).tolist() == [[1, 1025], [0, 1025], [1024, 1025]]


def test_stray_text_id_equals_vq02_code_zero(small_decoder):
    p_ids, p_mel, emb = prompt()
    gen = ids(10, 1)
    stray, zero = gen.copy(), gen.copy()
    stray[0] = 1234  # a text id: 1234 - 65536 < 0
    zero[0] = OFFSET  # vq02 code 0
    a = small_decoder.token2wav(stray, p_ids, p_mel, emb)
    b = small_decoder.token2wav(zero, p_ids, p_mel, emb)
    np.testing.assert_array_equal(a.speech, b.speech)
    with pytest.raises(AudioTokenError, match="above the audio range"):
        small_decoder.token2wav(np.r_[gen, OFFSET + 5120], p_ids, p_mel, emb)
    with pytest.raises(AudioTokenError, match="not an audio id"):
        small_decoder.token2wav(stray, p_ids, p_mel, emb, clamp_stray=False)


def official_reshape(mix_seq: list[int]) -> list[list[int]]:
    """cli/cosyvoice.py `_reshape`, written out on Python lists (the rows before torch.stack)."""
    mix_seq = list(mix_seq)
    if len(mix_seq) % 5 > 0:
        mix_seq += [0, 0, 0, 1024, 1024, 1024][-(5 - len(mix_seq) % 5):]
    rows = []
    for g in range(len(mix_seq) // 5):
        a, b, c, d, e = mix_seq[g * 5:g * 5 + 5]
        rows += [[a, c - 1024 + 1025], [b, d - 1024 + 1025], [1024, e - 1024 + 1025]]
    return rows


def test_reshape_takes_a_batch_and_any_length():
    rng = np.random.default_rng(0)
    for n in range(0, 12):
        batch = np.stack([ids(n, s) - OFFSET for s in range(3)]) if n else np.zeros((3, 0), np.int64)
        got = reshape_tokens(batch)
        assert got.shape == (3, 3 * -(-n // 5), 2)
        for row, values in zip(got, batch):
            assert row.tolist() == (official_reshape(values.tolist()) if n else [])
    deep = rng.integers(0, 5120, size=(2, 3, 7))
    assert reshape_tokens(deep).shape == (2, 3, 6, 2)
    np.testing.assert_array_equal(reshape_tokens(deep)[1, 2], reshape_tokens(deep[1, 2]))
    with pytest.raises(AudioTokenError, match="outside"):
        reshape_tokens(np.array([[1, 2], [3, 5120]]))


def test_embedding_takes_what_the_official_module_takes(small_decoder):
    """DualCodebookEmbedding.forward: token (b, t, 2) -> cat(E[token[..., 0]], E[token[..., 1]]); any
    leading dims, a single frame included."""
    cfg = small_decoder.flow_config.embedding
    params = small_decoder.flow_params["input_embedding"]
    table = np.asarray(params["embedding"]["embedding"])
    module = DualCodebookEmbedding(cfg)
    rng = np.random.default_rng(1)
    for shape in [(4, 9, 2), (9, 2), (1, 1, 2), (2,), (2, 3, 1, 2)]:
        pairs = rng.integers(0, cfg.vocab_size, size=shape)
        got = np.asarray(module.apply({"params": params}, pairs))
        want = np.concatenate([table[pairs[..., 0]], table[pairs[..., 1]]], axis=-1)
        np.testing.assert_array_equal(got, want)


def test_stray_text_id_in_a_vq06_slot_reads_row_zero(small_decoder):
    """tts.py: values = ids - 65536; `_reshape`; flow.inference embeds clamp(token, min=0)."""
    p_ids, p_mel, emb = prompt()
    gen = ids(10, 2)
    gen[3] = 1234  # a text id in the second vq06 slot of group 0
    values = (gen - OFFSET).tolist()
    rows = np.maximum(np.asarray(official_reshape(values)), 0)
    assert rows[1].tolist() == [int(gen[1] - OFFSET), 0]
    gen_pairs = small_decoder.prepare(gen, p_ids, p_mel, emb)[0][0]
    np.testing.assert_array_equal(gen_pairs, rows)
    table = np.asarray(small_decoder.flow_params["input_embedding"]["embedding"]["embedding"])
    x = flow_mod.FlowModel(small_decoder.flow_config).apply({"params": small_decoder.flow_params}, jnp.asarray(gen_pairs),
                                                            method=lambda m, p: m.input_embedding(p))
    np.testing.assert_array_equal(np.asarray(x)[1], np.concatenate([table[rows[1, 0]], table[0]]))
    # the remap EditX used to do (to <audio_0>, value 0) reads another row in a vq06 slot: 0 - 1024 + 1025 = 1
    remapped = gen.copy()
    remapped[3] = OFFSET
    assert small_decoder.prepare(remapped, p_ids, p_mel, emb)[0][0][1, 1] == 1


# ----------------------------------------------------------------------------------- batching


def test_batch_items_equal_alone(small_decoder):
    """Different generated and prompt lengths in one batch: every item as alone."""
    items = [(ids(7, 1), prompt(0, 20)), (ids(23, 2), prompt(1, 10)), (ids(12, 3), prompt(2, 25))]
    gens = [g for g, _ in items]
    batch = small_decoder.token2wav(gens, [p[0] for _, p in items], [p[1] for _, p in items],
                                    [p[2] for _, p in items])
    for i, (g, (p_ids, p_mel, emb)) in enumerate(items):
        alone = small_decoder.token2wav(g, p_ids, p_mel, emb)
        n = 2 * 3 * -(-len(g) // 5)
        assert batch.mel_lengths[i] == n and batch.lengths[i] == 480 * n
        np.testing.assert_allclose(batch.mel[i, :n], alone.mel[0], atol=2e-5, rtol=1e-5)
        # HiFT turns float-rounding mel differences into f0 and phase differences (see the
        # token2wav_hift fixture notes): its end-to-end tolerance
        np.testing.assert_allclose(batch.item(i), alone.item(0), atol=1e-3, rtol=1e-3)
        assert not np.any(batch.speech[i, 480 * n:])  # zero after the item


def test_masking_matters(small_decoder):
    """The flow's mask is load-bearing: without lengths, a short item changes (so the test above can fail)."""
    g1, g2 = ids(10, 1), ids(40, 2)
    p_ids, p_mel, emb = prompt()
    gp, pp, conds, embs = small_decoder.prepare([g1, g2], p_ids, p_mel, emb)
    seq = [np.concatenate([pp[i], gp[i]]) for i in range(2)]
    width = max(len(s) for s in seq)
    pairs = np.zeros((2, width, 2), np.int32)
    cond = np.zeros((2, 2 * width, 80), np.float32)
    for i, s in enumerate(seq):
        pairs[i, :len(s)] = s
        cond[i, :len(conds[i])] = conds[i]
    noise = flow_mod.noise_from_key(jax.random.key(0), 1, 2 * width, 80)
    cfg = small_decoder.flow_config
    masked = flow_batch(small_decoder.flow_params, pairs, np.array([len(s) for s in seq], np.int32), embs, cond,
                        noise, cfg, 10)
    unmasked = flow_batch(small_decoder.flow_params, pairs, np.full(2, width, np.int32), embs, cond, noise, cfg, 10)
    n = 2 * len(seq[0])
    assert np.abs(np.asarray(masked[0, :n]) - np.asarray(unmasked[0, :n])).max() > 1e-2


def test_bigvgan_vocoder_and_shapes():
    cfg = small_flow_config(1)
    fp = random_params(flow_mod.abstract_params(cfg), 4)
    vc = BigVGANConfig(upsample_initial_channel=32, upsample_rates=(8, 6, 10), upsample_kernel_sizes=(16, 12, 20))
    dec = Decoder(fp, cfg, random_params(abstract_params(vc), 5), vc)
    assert dec.config.vocoder == "bigvgan"
    p_ids, p_mel, emb = prompt()
    out = dec.token2wav([ids(7), ids(11)], p_ids, p_mel, emb)
    assert out.lengths.tolist() == [2 * 3 * 2 * 480, 2 * 3 * 3 * 480]
    assert np.all(np.abs(out.speech) <= 1.0)


def test_bigvgan_stream_length():
    """The stream with a vocoder that has a context (BigVGAN: reflect-padded before the first chunk and
    after the last, so a smaller overlap) still gives the offline length."""
    cfg = small_flow_config(1)
    vc = bigvgan_mod.BigVGANConfig(upsample_initial_channel=32, upsample_rates=(8, 6, 10), upsample_kernel_sizes=(16, 12, 20))
    t2w = Token2WavConfig(vocoder="bigvgan", chunk_size_list=(6, 9), estimator_left_context=12)
    dec = Decoder(random_params(flow_mod.abstract_params(cfg), 4), cfg, random_params(bigvgan_mod.abstract_params(vc), 5),
                  vc, config=t2w)
    p_ids, p_mel, emb = prompt()
    gen = ids(40, 8)
    st = Token2WavStream(dec, p_ids, p_mel, emb)
    speech = np.concatenate([st.push(gen[:-1]), st.push(gen[-1:], last=True)])
    assert len(st.mels) > 2 and speech.shape == (480 * 2 * 3 * 8,) and np.all(np.isfinite(speech))


# ----------------------------------------------------------------------------------- bad input


def test_bad_input(small_decoder):
    p_ids, p_mel, emb = prompt()
    # empty generation: an empty waveform (the reference crashes in _reshape)
    out = small_decoder.token2wav([], p_ids, p_mel, emb)
    assert out.lengths.tolist() == [0] and out.speech.shape == (1, 0)
    mixed = small_decoder.token2wav([[], ids(5)], p_ids, p_mel, emb)
    assert mixed.lengths.tolist() == [0, 2880]
    # fewer than one group: padded to one group like the reference
    assert small_decoder.token2wav(ids(3), p_ids, p_mel, emb).lengths.tolist() == [2880]
    # no prompt ids: no prompt conditioning, still a result
    assert small_decoder.token2wav(ids(5), [], np.zeros((0, 80), np.float32), emb).lengths.tolist() == [2880]
    with pytest.raises(Token2WavError, match="factor 4"):
        small_decoder.token2wav(ids(5), p_ids, p_mel[:5], emb)
    with pytest.raises(Token2WavError, match="factor 4"):
        small_decoder.token2wav(ids(5), p_ids, np.concatenate([p_mel] * 5), emb)
    with pytest.raises(Token2WavError, match=r"prompt_mel\[0\] must be"):
        small_decoder.token2wav(ids(5), p_ids, p_mel[:, :40], emb)
    with pytest.raises(Token2WavError, match="192 finite values"):
        small_decoder.token2wav(ids(5), p_ids, p_mel, emb[:128])
    with pytest.raises(Token2WavError, match="192 finite values"):
        small_decoder.token2wav(ids(5), p_ids, p_mel, np.full(192, np.nan, np.float32))
    with pytest.raises(Token2WavError, match="batch of 2"):
        small_decoder.token2wav([ids(5), ids(5)], p_ids, p_mel, np.stack([emb] * 3))
    with pytest.raises(Token2WavError, match="noise must be"):
        small_decoder.token2wav(ids(5), p_ids, p_mel, emb, noise=np.zeros((1, 3, 80), np.float32))
    with pytest.raises(ConfigError, match="token2wav.vocoder"):
        Token2WavConfig(vocoder="griffinlim")
    with pytest.raises(ConfigError, match="chunk_size_list"):
        Token2WavConfig(chunk_size_list=(10,))
    with pytest.raises(ConfigError, match="mel_cache_len"):
        Token2WavConfig(chunk_size_list=(3, 6))
    with pytest.raises(ConfigError, match="token2wav.vocoder"):
        Decoder(small_decoder.flow_params, small_decoder.flow_config, small_decoder.vocoder_params, SMALL_HIFT,
                config=Token2WavConfig(vocoder="bigvgan"))


# ----------------------------------------------------------------------------------- streaming


def test_stream_chunk_functions_equal_offline_modules(small_decoder):
    """With empty caches, the chunk encoder and chunk ODE are the offline encoder and ODE, whatever
    padding follows the real frames."""
    cfg, p = small_decoder.flow_config, small_decoder.flow_params
    rng = np.random.default_rng(0)
    pairs = reshape_values(ids(20, 4) - OFFSET).astype(np.int32)[None]
    emb = rng.normal(size=(1, 192)).astype(np.float32)
    model = flow_mod.FlowModel(cfg)
    mu_ref, spks, _ = model.apply({"params": p}, pairs, np.array([pairs.shape[1]]), emb, method=_encode)
    x_emb = model.apply({"params": p}, pairs, method=lambda m, q: m.input_embedding(q))
    n = pairs.shape[1]
    e = lambda layers, c: jnp.zeros((layers, 1, c, 4, 8))  # noqa: E731
    for pad, cap in ((0, n), (0, stream_mod.cache_capacity(n) + 32), (7, n + 7)):  # exact / padded buffers and input
        x_in = jnp.pad(x_emb, ((0, 0), (0, pad), (0, 0)), constant_values=3.0)  # padding is never read
        mu, *_ = stream_mod.encoder_chunk(p, x_in, jnp.zeros((1, 2, 32)), jnp.zeros((1, 4, 32)), e(6, cap),
                                          e(6, cap), e(4, 2 * cap), e(4, 2 * cap), 0, n, n, cfg)
        assert mu.shape[1] == 2 * (n + pad)
        np.testing.assert_allclose(mu[:, :2 * n], mu_ref, atol=2e-5, rtol=1e-5)
    t = mu_ref.shape[1]
    noise = jax.random.normal(jax.random.key(5), (1, t, 80))
    cond = jnp.zeros((1, t, 80)).at[:, :6].set(1.0)
    ref = flow_batch(p, pairs, np.array([pairs.shape[1]], np.int32), emb, cond, noise, cfg, 10)
    conv = jnp.zeros((10, 2, 2, 2, 64))
    kv = lambda f: jnp.zeros((10, 2, 2, f, 4, 16))  # noqa: E731
    for pad in (0, 5):
        padded = lambda a: jnp.pad(a, ((0, 0), (0, pad), (0, 0)), constant_values=2.0)  # noqa: E731
        out, *caches = stream_mod.dit_chunk_ode(p, padded(noise), padded(mu_ref), spks, padded(cond), t, conv, conv,
                                                kv(0), kv(0), 0, kv(4), kv(4), 0, cfg, 10)
        np.testing.assert_allclose(out[:, :t], ref, atol=2e-5, rtol=1e-5)
        assert caches[2].shape == (10, 2, 2, t + pad, 4, 16)


def test_cut_window_keeps_what_the_reference_cache_cut_keeps():
    """The reference puts each chunk's K/V (in time order) in front of its cache and keeps the first
    W frames: with W = 5, window [a0 a1] and a chunk [b0 b1 b2 b3] (3 real) -> [b0 b1 b2 a0 a1]."""
    def frames(values):
        return jnp.asarray(np.asarray(values, np.float32)[None, None, None, :, None, None])
    window = frames([10, 11, 0, 0, 0])
    out = stream_mod.cut_window(window, frames([20, 21, 22, 99]), 3, 2)
    np.testing.assert_array_equal(np.asarray(out).ravel(), [20, 21, 22, 10, 11])
    out = stream_mod.cut_window(window, frames([20, 21, 22, 23, 24, 25, 99]), 6, 2)  # a long chunk: its first 5
    np.testing.assert_array_equal(np.asarray(out).ravel(), [20, 21, 22, 23, 24])


def _stream_decoder(small_decoder, **cfg):
    t2w = Token2WavConfig(chunk_size_list=(6, 9), estimator_left_context=12, **cfg)
    return Decoder(small_decoder.flow_params, small_decoder.flow_config, small_decoder.vocoder_params,
                   small_decoder.vocoder_config, config=t2w)


def test_stream_compiles_a_bounded_number_of_times(small_decoder):
    """Chunks are padded to fixed shapes: 11 chunks compile the encoder for the setup and once per
    K/V capacity (one here), the DiT for the setup and once per chunk size,
    whatever the cache cut does; a second stream whose prompt falls in the same bucket compiles
    nothing new."""
    dec = _stream_decoder(small_decoder)
    p_ids, p_mel, emb = prompt()
    enc0, dit0 = stream_mod.encoder_chunk._cache_size(), stream_mod.dit_chunk_ode._cache_size()
    st = Token2WavStream(dec, p_ids, p_mel, emb)
    speech = np.concatenate([st.push(ids(152, 9)[:-1]), st.push(ids(152, 9)[-1:], last=True)])
    assert len(st.mels) == 11 and speech.shape == (480 * 2 * 3 * 31,)
    # room for the 32-pair prompt bucket and 8 chunks of 9 + 3 pairs: 128 frames, never grown here
    assert st.encoder_caches[2].shape[2] == 128 >= st.encoder_frames + 12  # 12 prompt + 93 generated frames
    assert stream_mod.encoder_chunk._cache_size() - enc0 <= 2  # the setup and the chunks
    assert stream_mod.dit_chunk_ode._cache_size() - dit0 <= 3  # setup, 6- and 9-pair chunks (the last fits 9)
    enc1, dit1 = stream_mod.encoder_chunk._cache_size(), stream_mod.dit_chunk_ode._cache_size()
    p_ids2, p_mel2, emb2 = prompt(seed=3, n_ids=30)  # 18 prompt pairs instead of 12: the same bucket
    st2 = Token2WavStream(dec, p_ids2, p_mel2, emb2)
    st2.push(ids(100, 4)[:-1])
    st2.push(ids(100, 4)[-1:], last=True)
    assert len(st2.mels) == 7
    assert stream_mod.encoder_chunk._cache_size() == enc1 and stream_mod.dit_chunk_ode._cache_size() == dit1


def test_stream_encoder_buffers_grow_without_changing_the_speech(small_decoder, monkeypatch):
    """Without headroom the encoder K/V buffers start at 64 frames and double mid-stream; the zero
    padding is masked, so the mels are those of buffers that never grew."""
    dec = _stream_decoder(small_decoder)
    p_ids, p_mel, emb = prompt()

    def run():
        st, gen = Token2WavStream(dec, p_ids, p_mel, emb), ids(152, 9)
        st.push(gen[:5])  # the setup only
        capacities = [st.encoder_caches[2].shape[2]]
        st.push(gen[5:-1])
        st.push(gen[-1:], last=True)
        return np.concatenate(st.mels), capacities + [st.encoder_caches[2].shape[2]]
    roomy, caps = run()
    monkeypatch.setattr(stream_mod, "HEADROOM_CHUNKS", 0)
    grown, caps_grown = run()
    assert caps == [128, 128] and caps_grown == [64, 128]  # 64: the 32-pair prompt bucket, then doubled
    np.testing.assert_allclose(grown, roomy, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_stream_chunking_lengths_and_push_pattern(small_decoder):
    dec = _stream_decoder(small_decoder)
    p_ids, p_mel, emb = prompt()
    gen = ids(52, 7)
    one = Token2WavStream(dec, p_ids, p_mel, emb)
    pieces = [one.push([t]) for t in gen[:-1]] + [one.push(gen[-1:], last=True)]
    # chunks of 6, 9, 9 pair frames (10, 15, 15 ids + 5 look-ahead), then the last 12 ids (3 groups);
    # the DiT cache (24 prompt + 12 newest mel frames) is cut after the second chunk
    assert [m.shape[0] for m in one.mels] == [12, 18, 18, 18]
    speech = np.concatenate(pieces)
    assert speech.shape == (480 * 2 * 3 * 11,)  # the offline length: 11 groups
    # pushing everything at once gives the same chunks and speech
    bulk = Token2WavStream(dec, p_ids, p_mel, emb)
    speech_bulk = np.concatenate([bulk.push(gen[:33]), bulk.push(gen[33:], last=True)])
    np.testing.assert_allclose(speech_bulk, speech, atol=1e-6)
    # the first chunk needs 6 + 3 pair frames: nothing before the 15th id
    s = Token2WavStream(dec, p_ids, p_mel, emb)
    assert all(s.push([t]).size == 0 for t in gen[:14]) and s.push(gen[14:15]).size > 0
    with pytest.raises(Token2WavError, match="finished"):
        one.push(gen[:1])
    with pytest.raises(Token2WavError, match="prompt ids"):
        Token2WavStream(dec, [], p_mel, emb)
    # fewer than 5 ids in all: still audio
    short = Token2WavStream(dec, p_ids, p_mel, emb)
    assert short.push(gen[:3], last=True).shape == (2880,)


def test_stream_versus_offline(small_decoder):
    """Streaming differs from offline by design (block-causal attention, cut DiT context, re-used
    noise, vocoder overlap): same mel length, different values. (Against the official
    token2wav_stream run on CPU the chunk mels agree to 6e-6; see the report.)"""
    dec = _stream_decoder(small_decoder)
    p_ids, p_mel, emb = prompt()
    gen = ids(40, 8)
    st = Token2WavStream(dec, p_ids, p_mel, emb)
    st.push(gen[:-1])
    st.push(gen[-1:], last=True)
    stream_mel = np.concatenate(st.mels)
    off = dec.token2wav(gen, p_ids, p_mel, emb)
    assert stream_mel.shape == off.mel[0].shape
    gap = np.abs(stream_mel - off.mel[0])
    assert gap.max() > 1e-3  # not the offline result
    # the first chunk sees the prompt and itself only; its mel is the offline one of the same tokens
    # with attention cut at the chunk end, so it is closer to offline than the later chunks are
    first = st.mels[0].shape[0]
    assert np.abs(gap[:first]).mean() < np.abs(gap[first:]).mean()


# ----------------------------------------------------------------------------------- prompt features


def test_prompt_features_bf16_rounding():
    fx = Fixture.load(FIXTURES / "campplus")
    cam_cfg = campplus_config_from_reference(fx.config)
    dec = Decoder(None, small_flow_config(), None, SMALL_HIFT, from_state_dict(fx.weights(), cam_cfg), cam_cfg)
    clip = prepare_clip(AUDIO / "en_happy_prompt.wav")  # mono, peak capped at 0.6
    feat, emb = dec.prompt_features(clip)
    assert feat.shape == (mel.num_mel_frames(len(clip.wave) * 24000 // clip.sr), 80) and emb.shape == (192,)
    for a in (feat, emb):  # bf16-representable: the low 16 bits of every float32 are zero
        assert not np.any(a.view(np.uint32) & 0xFFFF)
    mel_ref = fx_mel = Fixture.load(FIXTURES / "mel_24k").outputs()["speech_feat"][0]
    np.testing.assert_allclose(feat, bf16_round(fx_mel), atol=0, rtol=1 / 128)  # within one bf16 step
    unrounded = np.asarray(mel.mel_spectrogram(clip.wave, mel.MelConfig()))
    assert np.abs(unrounded - feat).max() > 0 and np.abs(unrounded - feat).max() <= np.abs(mel_ref).max() / 256


# ----------------------------------------------------------------------------------- converter


YAML = """mel_conf:
    num_mels: 80
    n_fft: 1920
    hop_size: 480
    win_size: 1920
    sampling_rate: !ref <sample_rate>
    fmin: 0
    fmax: 8000
sample_rate: 24000
flow: !new:stepvocoder.cosyvoice2.flow.flow.CausalMaskedDiffWithXvec
    input_size: 32
    output_size: 80
    spk_embed_dim: 192
    output_type: 'mel'
    vocab_size: 5121    # 1024(vq02) + 4096(vq06) + 1(vq02-pad)
    input_embedding: !new:stepvocoder.cosyvoice2.embedding.dual_codebook.DualCodebookEmbedding
        vocab_size: 5121
        input_size: 32
    encoder: !new:stepvocoder.cosyvoice2.transformer.upsample_encoder_v2.UpsampleConformerEncoderV2
        input_size: 32
        output_size: 32
        input_layer: 'linear'
        pre_lookahead_len: 3
        num_blocks: 6
        num_up_blocks: 4
        up_stride: 2
        up_scale_factor: 2
        attention_heads: 4
        pos_enc_layer_type: 'rel_pos_espnet'
        selfattention_layer_type: 'rel_selfattn'
        key_bias: true
        linear_units: 64
        dropout_rate: 0.1
        positional_dropout_rate: 0.1
        attention_dropout_rate: 0.1
        normalize_before: True
    decoder: !new:stepvocoder.cosyvoice2.flow.flow_matching.CausalConditionalCFM
        in_channels: 80
        n_spks: 1
        spk_emb_dim: 192
        cfm_params: !new:types.SimpleNamespace
            sigma_min: 1.0e-06
            solver: euler
            t_scheduler: cosine
            training_cfg_rate: 0.2
            inference_cfg_rate: 0.7
            reg_loss_type: l1
        estimator: !new:stepvocoder.cosyvoice2.flow.decoder_dit.DiT
            in_channels: 320
            out_channels: 80
            mlp_ratio: 4.0
            depth: 2
            num_heads: 4
            head_dim: 16
            hidden_size: 64
hift: !new:stepvocoder.cosyvoice2.hifigan.generator.HiFTGenerator
    in_channels: 80
    base_channels: 16
    nb_harmonics: 8
    sampling_rate: !ref <sample_rate>
    nsf_alpha: 0.1
    nsf_sigma: 0.003
    nsf_voiced_threshold: 10
    upsample_rates: [8, 5, 3]
    upsample_kernel_sizes: [16, 11, 7]
    istft_params:
        n_fft: 16
        hop_len: 4
    resblock_kernel_sizes: [3, 7, 11]
    resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5], [1, 3, 5]]
    source_resblock_kernel_sizes: [7, 7, 11]
    source_resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5], [1, 3, 5]]
    lrelu_slope: 0.1
    audio_limit: 0.99
    f0_predictor: !new:stepvocoder.cosyvoice2.hifigan.f0_predictor.ConvRNNF0Predictor
        num_class: 1
        in_channels: 80
        cond_channels: 16
"""


def _write_released_folder(root: pathlib.Path, small_decoder) -> dict:
    """A fake `CosyVoice-300M-25Hz/` in the official names: flow.pt, hift.pt (parametrized weight norm),
    campplus.onnx (exported from a small torch CAM++), cosyvoice.yaml."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnx")

    root.mkdir()
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in export_flow(small_decoder.flow_params)},
               root / "flow.pt")
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in to_state_dict(small_decoder.vocoder_params, SMALL_HIFT).items()},
               root / "hift.pt")
    cam_cfg = campplus.CAMPPlusConfig(growth_rate=8, bn_size=2, init_channels=32, num_layers=(2, 3, 2))
    model = torch_campplus(cam_cfg)
    with torch.no_grad():
        for name, p in model.state_dict().items():
            if name.endswith("running_var"):
                p.copy_(torch.rand(p.shape) + 0.5)
            elif p.dtype.is_floating_point:
                p.copy_(torch.randn(p.shape) * 0.2)
    feat = np.random.default_rng(0).normal(size=(1, 60, 80)).astype(np.float32)
    export_campplus_onnx(model, feat, root / "campplus.onnx")
    with torch.no_grad():
        emb = model(torch.from_numpy(feat)).numpy()
    (root / "cosyvoice.yaml").write_text(YAML)
    return {"feat": feat, "emb": emb, "cam_cfg": cam_cfg}


@pytest.mark.slow
def test_convert_decoder_folder(small_decoder, tmp_path):
    made = _write_released_folder(tmp_path / "CosyVoice-300M-25Hz", small_decoder)
    dst = tmp_path / "decoder_ckpt"
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "convert.py"), "decoder",
                          str(tmp_path / "CosyVoice-300M-25Hz"), str(dst), "--quiet"],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary["vocoder"] == "hift" and summary["yaml"] is True
    dec = Decoder.from_pretrained(dst)
    assert dec.flow_config == small_decoder.flow_config and dec.vocoder_config == SMALL_HIFT
    assert dec.campplus_config == made["cam_cfg"]
    for a, b in zip(jax.tree_util.tree_leaves(dec.flow_params), jax.tree_util.tree_leaves(small_decoder.flow_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree_util.tree_leaves(dec.vocoder_params),
                    jax.tree_util.tree_leaves(small_decoder.vocoder_params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5)  # weight norm round trip
    np.testing.assert_allclose(np.asarray(embed_feats(dec.campplus_params, made["feat"], dec.campplus_config)),
                               made["emb"], atol=1e-4, rtol=1e-4)
    p_ids, p_mel, emb = prompt()
    np.testing.assert_allclose(dec.token2wav(ids(10), p_ids, p_mel, emb).speech,
                               small_decoder.token2wav(ids(10), p_ids, p_mel, emb).speech, atol=1e-5)

    # a BigVGAN checkpoint instead of hift.pt; config.json beside it gives the sizes
    torch = pytest.importorskip("torch")
    vc = BigVGANConfig(upsample_initial_channel=32, upsample_rates=(8, 6, 10), upsample_kernel_sizes=(16, 12, 20))
    vp = random_params(abstract_params(vc), 9)
    sd = {k: torch.from_numpy(np.array(v)) for k, v in export(vp, rules(vc))}
    filt = torch.from_numpy(np.asarray(kaiser_sinc_filter(0.25, 0.3, 12), np.float32).reshape(1, 1, 12))
    for name in list(sd):
        if ".act." in name and name.endswith(".alpha"):
            base = name[:-len(".act.alpha")]
            sd[base + ".upsample.filter"] = filt
            sd[base + ".downsample.lowpass.filter"] = filt
    torch.save({"generator": sd}, tmp_path / "bigvgan_generator.pt")
    (tmp_path / "config.json").write_text(json.dumps({"upsample_rates": [8, 6, 10], "upsample_kernel_sizes": [16, 12, 20],
                                                      "upsample_initial_channel": 32, "batch_size": 16}))
    convert_cli = _convert_cli()
    dst2 = tmp_path / "decoder_bigvgan"
    assert convert_cli.main(["decoder", str(tmp_path / "CosyVoice-300M-25Hz"), str(dst2), "--quiet",
                             "--bigvgan", str(tmp_path / "bigvgan_generator.pt")]) == 0
    dec2 = Decoder.from_pretrained(dst2)
    assert dec2.config.vocoder == "bigvgan" and dec2.vocoder_config == vc
    for a, b in zip(jax.tree_util.tree_leaves(dec2.vocoder_params), jax.tree_util.tree_leaves(vp)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert dec2.token2wav(ids(5), p_ids, p_mel, emb).lengths.tolist() == [2880]


def _convert_cli():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import convert as convert_cli  # noqa: PLC0415  (tools/convert.py, importable only once tools/ is on the path)
    finally:
        sys.path.pop(0)
    return convert_cli


def test_convert_decoder_errors(tmp_path, capsys):
    convert_cli = _convert_cli()
    assert convert_cli.main(["decoder", str(tmp_path / "nope"), str(tmp_path / "out"), "--quiet"]) == 1
    assert "decoder folder not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert convert_cli.main(["decoder", str(tmp_path / "empty"), str(tmp_path / "out"), "--quiet"]) == 1
    assert "missing flow.pt, campplus.onnx, hift.pt" in capsys.readouterr().err
    (tmp_path / "empty" / "cosyvoice.yaml").write_text("flow: !new:x.Y\n  input_size: 512\n  bogus: 1\nhift: {}\n")
    assert convert_cli.main(["decoder", str(tmp_path / "empty"), str(tmp_path / "out"), "--quiet"]) == 1
    assert "flow.bogus" in capsys.readouterr().err
