"""The vq06 stream: S3 tokenizer v1 25 Hz encoder + VQ, its 30 s chunking and its converters."""

import dataclasses
import re

import jax
import numpy as np
import pytest
from conftest import fixture_dirs
from reference_models import export_s3_onnx

from editx_jax.config import ConfigError
from editx_jax.convert.keymap import ConversionError
from editx_jax.convert.s3tokenizer import from_onnx, from_state_dict, s3tokenizer_config_from_reference
from editx_jax.parity import Fixture, check_fixture
from editx_jax.tokenizer.s3tokenizer import (S3InputError, S3TokenizerConfig, abstract_params, init_params,
                                             split_chunks, tokenize, tokenize_waveforms)

S3_FIXTURES = fixture_dirs("s3tokenizer_v1")
SMALL = S3TokenizerConfig(n_audio_ctx=768, n_audio_state=32, n_audio_head=4, n_audio_layer=2, codebook_size=64)


@pytest.mark.parametrize("path", S3_FIXTURES, ids=lambda p: p.name)
def test_parity(path):
    result = check_fixture(path)
    assert result.status == "PASS", result.line()


def test_fixtures_present():
    assert S3_FIXTURES, "no s3tokenizer_v1 fixture found in ../shared/fixtures"


@pytest.mark.parametrize("path", S3_FIXTURES, ids=lambda p: p.name)
def test_batched_equals_alone(path):
    fx = Fixture.load(path)
    config = s3tokenizer_config_from_reference(fx.config)
    params = from_state_dict(fx.weights(), config)
    mel, mel_len = fx.inputs()["mel"], fx.inputs()["mel_len"].astype(np.int32)
    tokens, token_len, hidden = map(np.asarray, tokenize(params, mel, mel_len, config))
    assert len(set(mel_len.tolist())) > 1, "the fixture batch should mix lengths"
    for b, n in enumerate(mel_len):
        t1, l1, h1 = map(np.asarray, tokenize(params, mel[b:b + 1, :, :n], np.array([n], np.int32), config))
        assert int(l1[0]) == int(token_len[b]) == h1.shape[1]
        np.testing.assert_array_equal(t1[0], tokens[b, :token_len[b]])
        np.testing.assert_allclose(h1[0], hidden[b, :token_len[b]], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------- chunking


def _toy_logmel(audio):
    """A cheap stand-in for the whisper log-mel with its shape contract: [128, len // 160]."""
    n = len(audio) // 160
    frames = np.asarray(audio[:n * 160], np.float64).reshape(n, 160)
    spec = np.abs(np.fft.rfft(frames, n=254, axis=1)) ** 2
    log = np.log10(np.maximum(spec, 1e-10))
    return ((np.maximum(log, log.max() - 8.0) + 4.0) / 4.0).T.astype(np.float32)


def _speechy(n, seed):
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 16000
    return (0.3 * np.sin(2 * np.pi * 180 * t * (1 + 0.1 * np.sin(t))) * (np.sin(3 * t) > 0)
            + 0.05 * rng.standard_normal(n)).astype(np.float32)


def test_split_chunks_follows_official_rule():
    cfg = S3TokenizerConfig()
    lengths = lambda n: [len(c) for c in split_chunks(np.zeros(n, np.float32), cfg)]  # noqa: E731
    assert lengths(0) == []
    assert lengths(479) == []
    assert lengths(480) == [480]
    assert lengths(480_000) == [480_000]
    assert lengths(960_479) == [480_000, 480_000]  # a tail under 480 samples is dropped
    assert lengths(960_480) == [480_000, 480_000, 480]


@pytest.fixture(scope="module")
def small_params():
    return init_params(SMALL)


def test_long_audio_equals_per_chunk_runs(small_params):
    params = small_params
    long_clip = _speechy(2 * 480_000 + 5 * 16000 + 123, seed=1)  # 65 s: pieces of 30, 30 and 5 s
    short_clip = _speechy(3 * 16000 + 7, seed=2)
    tiny_clip = _speechy(300, seed=3)  # under 480 samples: no piece, no codes
    got = tokenize_waveforms(params, [long_clip, short_clip, tiny_clip], SMALL, batch_size=2,
                             logmel_fn=_toy_logmel)

    def alone(clip):  # each piece on its own, unpadded, batch 1: what the official loop does
        out = []
        for piece in split_chunks(clip, SMALL):
            mel = _toy_logmel(piece)[None]
            tokens, _, _ = tokenize(params, mel, np.array([mel.shape[-1]], np.int32), SMALL)
            out.append(np.asarray(tokens)[0])
        return np.concatenate(out) if out else np.zeros((0,), np.int32)

    want_long = alone(long_clip)
    # 30 s = 3000 frames -> 750 tokens; 5 s + 123 samples = 500 frames -> 125 tokens
    assert len(want_long) == 750 + 750 + 125
    np.testing.assert_array_equal(got[0], want_long)
    np.testing.assert_array_equal(got[1], alone(short_clip))
    assert got[2].shape == (0,)
    assert len(set(want_long.tolist())) > 5, "random weights should give varied codes"


def test_tokenize_waveforms_rejects_bad_audio(small_params):
    params = small_params
    with pytest.raises(S3InputError, match="NaN or Inf"):
        tokenize_waveforms(params, [np.full(16000, np.nan, np.float32)], SMALL, logmel_fn=_toy_logmel)
    with pytest.raises(S3InputError, match="1-D"):
        tokenize_waveforms(params, [np.zeros((2, 16000), np.float32)], SMALL, logmel_fn=_toy_logmel)


def test_tokenize_rejects_bad_shapes(small_params):
    cfg, params = SMALL, small_params
    with pytest.raises(S3InputError, match="mel must be"):
        tokenize(params, np.zeros((1, 80, 40), np.float32), np.array([40], np.int32), cfg)
    with pytest.raises(S3InputError, match="mel_len must be"):
        tokenize(params, np.zeros((2, 128, 40), np.float32), np.array([40], np.int32), cfg)
    with pytest.raises(S3InputError, match="within"):
        tokenize(params, np.zeros((1, 128, 40), np.float32), np.array([41], np.int32), cfg)
    with pytest.raises(S3InputError, match="n_audio_ctx"):  # 3080 frames -> 770 positions > 768
        tokenize(params, np.zeros((1, 128, 3080), np.float32), np.array([3080], np.int32), cfg)


def test_config_validation_names_the_field():
    with pytest.raises(ConfigError, match="n_audio_head"):
        S3TokenizerConfig(n_audio_state=64, n_audio_head=5)
    with pytest.raises(ConfigError, match="conv1_stride"):
        S3TokenizerConfig(conv1_stride=3)
    with pytest.raises(ConfigError, match="codebook_size"):
        S3TokenizerConfig(codebook_size=0)
    with pytest.raises(ConfigError, match="name"):
        s3tokenizer_config_from_reference({"name": "speech_tokenizer_v2_25hz"})


# ---------------------------------------------------------------------------------------- converters


@pytest.fixture(scope="module")
def fixture_state():
    fx = Fixture.load(S3_FIXTURES[0])
    return fx.weights(), s3tokenizer_config_from_reference(fx.config)


def test_state_dict_missing_tensor(fixture_state):
    weights, config = fixture_state
    bad = {k: v for k, v in weights.items() if k != "encoder.blocks.1.attn.value.bias"}
    with pytest.raises(ConversionError, match=r"encoder\.blocks\.1\.attn\.value\.bias"):
        from_state_dict(bad, config)


def test_state_dict_wrong_shape_and_extra_tensor(fixture_state):
    weights, config = fixture_state
    bad = dict(weights, **{"encoder.conv1.weight": weights["encoder.conv1.weight"][:, :, :2]})
    with pytest.raises(ConversionError, match=r"encoder\.conv1\.weight.*shape"):
        from_state_dict(bad, config)
    bad = dict(weights, **{"encoder.blocks.0.attn.key.bias": np.zeros(64, np.float32)})
    with pytest.raises(ConversionError, match=r"encoder\.blocks\.0\.attn\.key\.bias"):
        from_state_dict(bad, config)  # the key projection has no bias
    with pytest.raises(ConversionError, match="layer 1 is out of range"):
        from_state_dict(weights, dataclasses.replace(config, n_audio_layer=1))


def test_onnx_bad_files(tmp_path):
    with pytest.raises(ConversionError, match="not found"):
        from_onnx(tmp_path / "missing.onnx", SMALL)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"RIFF\x00\x00 this is not a protobuf \xff\xfe")
    with pytest.raises(ConversionError, match="not a readable ONNX model"):
        from_onnx(junk, SMALL)


@pytest.fixture(scope="module")
def exported_onnx(tmp_path_factory):
    """A small random PyPI S3Tokenizer (25 Hz v1), exported to ONNX with the legacy exporter."""
    import torch  # noqa: PLC0415  (torch is optional: the convert extra)
    ref_cfg = dict(n_mels=128, n_audio_ctx=128, n_audio_state=64, n_audio_head=4, n_audio_layer=2,
                   n_codebook_size=256)
    mel = (np.random.default_rng(7).standard_normal((1, 128, 301)) * 0.5).astype(np.float32)
    mel_len = np.array([301], np.int32)
    path = tmp_path_factory.mktemp("s3onnx") / "speech_tokenizer_small.onnx"
    tok = export_s3_onnx(path, ref_cfg, seed=1234, mel=mel)
    with torch.no_grad():
        want = tok.quantize(torch.from_numpy(mel), torch.from_numpy(mel_len))[0].numpy()
    state = {k: v.numpy() for k, v in tok.state_dict().items()}
    config = s3tokenizer_config_from_reference(ref_cfg)
    return path, state, config, mel, mel_len, want


def test_onnx_converter_matches_state_dict_and_torch(exported_onnx):
    path, state, config, mel, mel_len, want = exported_onnx
    from_pt = from_state_dict(state, config)
    from_ox = from_onnx(path, config)
    flat_pt = jax.tree_util.tree_leaves_with_path(from_pt)
    flat_ox = dict(jax.tree_util.tree_leaves_with_path(from_ox))
    assert len(flat_pt) == len(flat_ox)
    for key, value in flat_pt:
        np.testing.assert_array_equal(np.asarray(flat_ox[key]), np.asarray(value), err_msg=str(key))
    tokens, token_len, _ = tokenize(from_ox, mel, mel_len, config)
    assert int(token_len[0]) == want.shape[1] == 76  # 301 -> 151 -> 76
    np.testing.assert_array_equal(np.asarray(tokens), want)
    assert len(set(want[0].tolist())) > 5


def test_onnx_converter_matches_onnxruntime(exported_onnx):
    ort = pytest.importorskip("onnxruntime")
    path, _, config, mel, mel_len, _ = exported_onnx
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    codes = session.run(None, {names[0]: mel, names[1]: mel_len})[0]
    tokens, _, _ = tokenize(from_onnx(path, config), mel, mel_len, config)
    np.testing.assert_array_equal(np.asarray(tokens).ravel(), codes.ravel())


def test_onnx_unrecognised_initializer(exported_onnx, tmp_path):
    import onnx  # noqa: PLC0415  (onnx is optional: the convert extra)
    from onnx import numpy_helper  # noqa: PLC0415  (as above)
    path, _, config, *_ = exported_onnx
    model = onnx.load(str(path))
    model.graph.initializer.append(numpy_helper.from_array(np.ones((3, 3), np.float32), "onnx::Stray_1"))
    bad = tmp_path / "stray.onnx"
    onnx.save(model, str(bad))
    with pytest.raises(ConversionError, match="onnx::Stray_1"):
        from_onnx(bad, config)


def test_released_sizes_shapes():
    """One full 30 s piece at the released sizes gives 750 codes (shape-only: no weights computed)."""
    cfg = S3TokenizerConfig()
    params = abstract_params(cfg)
    assert params["encoder"]["blocks"]["fc1"]["kernel"].shape == (6, 1280, 5120)
    assert params["quantizer"]["codebook"].shape == (4096, 1280)
    mel = jax.ShapeDtypeStruct((1, 128, 3000), np.float32)
    lens = jax.ShapeDtypeStruct((1,), np.int32)
    tokens, token_len, hidden = jax.eval_shape(lambda p, m, n: tokenize(p, m, n, cfg), params, mel, lens)
    assert tokens.shape == (1, 750) and hidden.shape == (1, 750, 1280)
    n_params = sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params))
    # the released file is 523 MB of float32 (§2.2): 130.6M values with the position table and codebook
    assert 522e6 < 4 * n_params < 524e6


def test_default_front_end_is_whisper_log_mel(small_params):
    """Without logmel_fn, pieces go through the project's whisper 128-bin log-mel."""
    frontend = pytest.importorskip("editx_jax.audio.features")
    clip = _speechy(16000 + 55, seed=4)
    got = tokenize_waveforms(small_params, [clip], SMALL)[0]
    mel = np.asarray(frontend.whisper_log_mel(clip))[None]
    want, _, _ = tokenize(small_params, mel, np.array([mel.shape[-1]], np.int32), SMALL)
    assert len(got) == 25  # 16055 samples -> 100 frames -> 50 -> 25
    np.testing.assert_array_equal(got, np.asarray(want)[0])


def test_onnx_official_naming(exported_onnx, tmp_path):
    """The released file names conv, LayerNorm and position tensors (`encoders.conv1.weight`, ...) and
    has no `/encoder` scope (`/blocks.0/attn/query/MatMul`, `/quantizer/rq/model/layers.0/_codebook/MatMul`).
    Rewrite our export that way: the converter must give the same params."""
    import onnx  # noqa: PLC0415  (onnx is optional: the convert extra)
    path, state, config, *_ = exported_onnx
    model = onnx.load(str(path))
    graph = model.graph
    rename = {}
    for node in graph.node:
        node.name = node.name.replace("/encoder/", "/")
        if node.op_type == "MatMul" and not node.name.startswith("/blocks."):
            node.name = "/quantizer/rq/model/layers.0/_codebook/MatMul"
        if m := re.fullmatch(r"/(conv[12])/Conv", node.name):
            rename[node.input[1]], rename[node.input[2]] = f"encoders.{m[1]}.weight", f"encoders.{m[1]}.bias"
        if m := re.fullmatch(r"/blocks\.(\d+)/(\w+_ln)/LayerNormalization", node.name):
            for slot, what in ((1, "weight"), (2, "bias")):
                rename[node.input[slot]] = f"encoders.blocks.{m[1]}.{m[2]}.{what}"
    rename["encoder.positional_embedding"] = "encoders.positional_embedding"
    assert len(rename) == 4 + 1 + 4 * config.n_audio_layer
    for init in graph.initializer:
        init.name = rename.get(init.name, init.name)
    for node in graph.node:
        for slot, name in enumerate(node.input):
            node.input[slot] = rename.get(name, name)
    official = tmp_path / "official_naming.onnx"
    onnx.save(model, str(official))
    got = dict(jax.tree_util.tree_leaves_with_path(from_onnx(official, config)))
    for key, value in jax.tree_util.tree_leaves_with_path(from_state_dict(state, config)):
        np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(value), err_msg=str(key))
    with pytest.raises(ConversionError, match=r"codebook initializer of shape \[64, 128\]"):
        from_onnx(official, dataclasses.replace(config, codebook_size=128))
