"""vq02 encoder (SANM streaming chunk mode), its converter and the k-means assignment."""

import json

import numpy as np
import pytest
import yaml
from conftest import FIXTURES, fixture_dirs
from reference_models import write_am_mvn

from editx_jax.config import ConfigError
from editx_jax.convert.keymap import ConversionError
from editx_jax.convert import paraformer as convert_paraformer
from editx_jax.parity import Fixture, check_fixture
from editx_jax.tokenizer.codebook import nearest_centroid, quantize_vq02
from editx_jax.tokenizer.paraformer import (ParaformerEncoderConfig, StreamError, encode_stream,
                                            random_params, window_plan)
from editx_jax.tree import flatten

ENCODER_FIXTURE = FIXTURES / "paraformer_encoder"


# ------------------------------------------------------------------ parity gate


@pytest.mark.parametrize("path", fixture_dirs("paraformer_encoder") + fixture_dirs("linguistic_kmeans"),
                         ids=lambda p: p.name)
def test_parity(path):
    result = check_fixture(path)
    assert result.status == "PASS", result.line()


# ------------------------------------------------------------------ an independent float64 reference


def _reference_stream(sd, cfg: ParaformerEncoderConfig, feats, chunk_lens):
    """The official forward_chunk loop written plainly in numpy float64, from the torch state_dict:
    variable-length caches, no masks, no padding. For one clip feats [T, input_size]."""
    f64 = {k: v.astype(np.float64) for k, v in sd.items()}
    c0, stride, c2 = cfg.chunk_size
    heads, dk = cfg.attention_heads, cfg.head_dim
    inv = np.exp(-np.arange(cfg.input_size // 2) * np.log(10000.0) / (cfg.input_size / 2 - 1))

    def ln(x, p):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + cfg.layer_norm_eps) * f64[p + ".weight"] + f64[p + ".bias"]

    def lin(x, p):
        return x @ f64[p + ".weight"].T + f64[p + ".bias"]

    def layer(x, p, cache, residual):
        h = ln(x, p + "norm1")
        q, k, v = np.split(lin(h, p + "self_attn.linear_q_k_v"), 3, axis=-1)
        w = x.shape[0]
        kh, vh = (t.reshape(w, heads, dk).transpose(1, 0, 2) for t in (k, v))
        qh = q.reshape(w, heads, dk).transpose(1, 0, 2)
        left, right = cfg.fsmn_padding
        vp = np.concatenate([np.zeros((left, v.shape[1])), v, np.zeros((right, v.shape[1]))])
        kern = f64[p + "self_attn.fsmn_block.weight"][:, 0, :]  # [D, k]
        fsmn = np.stack([(vp[t:t + cfg.kernel_size] * kern.T).sum(0) for t in range(w)])
        if cache is None:
            keys, vals = kh, vh
            cache = (kh[:, :-c2], vh[:, :-c2])
        else:
            keys, vals = np.concatenate([cache[0], kh], 1), np.concatenate([cache[1], vh], 1)
            n = cfg.cache_frames
            cache = (np.concatenate([cache[0], kh[:, :-c2]], 1)[:, -n:],
                     np.concatenate([cache[1], vh[:, :-c2]], 1)[:, -n:])
        s = (qh * dk ** -0.5) @ keys.transpose(0, 2, 1)
        pr = np.exp(s - s.max(-1, keepdims=True))
        pr /= pr.sum(-1, keepdims=True)
        att = (pr @ vals).transpose(1, 0, 2).reshape(w, -1)
        out = lin(att, p + "self_attn.linear_out") + v + fsmn
        x = x + out if residual else out
        h = ln(x, p + "norm2")
        ff = lin(np.maximum(lin(h, p + "feed_forward.w_1"), 0), p + "feed_forward.w_2")
        return x + ff, cache

    overlap = np.zeros((c0 + c2, cfg.input_size))
    caches = [None] * cfg.num_blocks
    start, off, outs = 0, 0, []
    for n in chunk_lens:
        x = feats[off:off + n].astype(np.float64) * np.sqrt(cfg.output_size)
        pos = np.arange(start + 1, start + n + 1)[:, None] * inv
        x = x + np.concatenate([np.sin(pos), np.cos(pos)], -1)
        window = np.concatenate([overlap, x])
        overlap = window[-(c0 + c2):]
        names = ["encoder.encoders0.0."] + [f"encoder.encoders.{i}." for i in range(cfg.num_blocks - 1)]
        for i, p in enumerate(names):
            window, caches[i] = layer(window, p, caches[i], residual=i > 0)
        outs.append(ln(window, "encoder.after_norm")[-n:])
        start, off = start + n, off + n
    return np.concatenate(outs)


def _random_state_dict(cfg, seed=0):
    return convert_paraformer.export_state_dict(random_params(cfg, seed))


@pytest.mark.parametrize("chunk_size,look_back,lens", [
    ((0, 4, 5), 4, [4, 4, 4, 4, 4, 4, 2]),
    ((1, 3, 2), 1, [6, 3, 3, 0, 3, 1]),  # first call longer than the look-back cache; an empty call
])
@pytest.mark.parametrize("method", ["parallel", "sequential"])
def test_matches_plain_reference(chunk_size, look_back, lens, method):
    cfg = ParaformerEncoderConfig(input_size=24, output_size=16, attention_heads=2, linear_units=20,
                                  num_blocks=3, kernel_size=5, chunk_size=chunk_size, look_back=look_back)
    sd = _random_state_dict(cfg)
    params, _ = convert_paraformer.convert_state_dict(sd, cfg)
    feats = np.random.default_rng(1).standard_normal((sum(lens), cfg.input_size)).astype(np.float32)
    want = _reference_stream(sd, cfg, feats, [n for n in lens if n])
    got, out_lens = encode_stream(params, cfg, feats[None], lens, method=method)
    assert out_lens.tolist() == [sum(lens)]
    np.testing.assert_allclose(got[0], want, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["parallel", "sequential"])
def test_batched_rows_match_single_rows(method):
    """Clips of different lengths streamed together give each clip's output as alone."""
    fx = Fixture.load(ENCODER_FIXTURE)
    cfg = convert_paraformer.config_from_funasr(fx.config)
    params, _ = convert_paraformer.convert_state_dict(fx.weights(), cfg)
    feats, lens = fx.inputs()["feats"][0], fx.inputs()["chunk_lens"]
    other = np.random.default_rng(3).standard_normal(feats.shape).astype(np.float32)
    short = np.array([3, 4, 4, 4, 1] + [0] * (len(lens) - 5))  # ends early, with a 3-frame first chunk
    batch = np.stack([feats, other])
    got, out_lens = encode_stream(params, cfg, batch, np.stack([lens, short]), method=method)
    assert out_lens.tolist() == [lens.sum(), short.sum()]
    alone0, _ = encode_stream(params, cfg, feats[None], lens, method="sequential")
    alone1, _ = encode_stream(params, cfg, other[None, :short.sum()], short[short > 0], method="sequential")
    np.testing.assert_allclose(got[0], alone0[0], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(got[1, :short.sum()], alone1[0], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(got[0], fx.outputs()["enc_out"][0], atol=2e-4, rtol=1e-4)


def test_stream_bad_input():
    cfg = ParaformerEncoderConfig(output_size=16, attention_heads=2, linear_units=8, num_blocks=2)
    params = random_params(cfg)
    with pytest.raises(StreamError, match="method"):
        encode_stream(params, cfg, np.zeros((1, 8, 560)), [4, 4], method="fast")
    with pytest.raises(StreamError, match="integers"):
        encode_stream(params, cfg, np.zeros((1, 8, 560)), [4.0, 4.0])
    with pytest.raises(StreamError, match="feats must be"):
        encode_stream(params, cfg, np.zeros((1, 8, 80)), [4, 4])
    with pytest.raises(StreamError, match="add up to"):
        encode_stream(params, cfg, np.zeros((1, 7, 560)), [4, 4])
    with pytest.raises(StreamError, match="non-negative"):
        encode_stream(params, cfg, np.zeros((1, 8, 560)), [4, -1])
    for method in ("parallel", "sequential"):
        out, lens = encode_stream(params, cfg, np.zeros((1, 0, 560)), [0], method=method)
        assert out.shape == (1, 0, 16) and lens.tolist() == [0]


def test_window_plan_replays_the_official_cache():
    cfg = ParaformerEncoderConfig()  # overlap 5, cache 16 frames
    plan = window_plan(cfg, np.array([[4, 4, 4, 4, 4, 2]]), frames=22)
    w = 9  # 5 + 4
    assert plan.rows[-1] == (0, 20, 2)
    assert plan.positions[1].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8]  # 5 frames before call 2: a zero, then 1..4
    # call 1 caches window 0's first 4 frames (the zero prefix); call 5 sees the last 16 appended
    assert plan.cache_index[1].tolist() == [-1] * 12 + [0, 1, 2, 3]
    assert plan.cache_index[5].tolist() == [w * r + t for r in (1, 2, 3, 4) for t in range(4)]


@pytest.mark.parametrize("field,value", [("output_size", 30), ("chunk_size", (0, 4, 0)), ("look_back", 0),
                                         ("num_blocks", 0), ("matmul_precision", "fast"),
                                         ("input_size", 561)])
def test_config_validation_names_field(field, value):
    with pytest.raises(ConfigError, match=field):
        ParaformerEncoderConfig(**{field: value})


def test_released_config_constants():
    cfg = ParaformerEncoderConfig()
    assert (cfg.head_dim, cfg.overlap_frames, cfg.cache_frames, cfg.fsmn_padding) == (128, 5, 16, (5, 5))
    assert cfg.input_scale == pytest.approx(22.627417)
    leaves = convert_paraformer.abstract_params(cfg)
    n_tensors = sum(leaf.shape[0] if path.startswith("encoders/") else 1
                    for path, leaf in flatten(leaves).items())
    assert n_tensors == 652


# ------------------------------------------------------------------ converter: a fake FunASR folder


def _fake_tokenizer_root(tmp_path, extra=None, drop=None):
    import torch  # noqa: PLC0415  (torch is optional: the convert extra)
    fx = Fixture.load(ENCODER_FIXTURE)
    root = tmp_path / "Step-Audio-Tokenizer"
    folder = root / convert_paraformer.PARAFORMER_SUBDIR
    folder.mkdir(parents=True)
    sd = {k: torch.from_numpy(v.copy()) for k, v in fx.weights().items()}
    sd["decoder.decoders.0.self_attn.linear_q.weight"] = torch.zeros(4, 4)  # non-encoder keys: ignored
    sd["predictor.cif_output.bias"] = torch.zeros(1)
    sd["ctc.ctc_lo.weight"] = torch.zeros(2, 3)
    sd.update(extra or {})
    for k in drop or []:
        del sd[k]
    torch.save(sd, folder / "model.pt")
    conf = {k: fx.config[k] for k in ("encoder", "encoder_conf", "input_size", "frontend", "frontend_conf")}
    conf["model"] = "ParaformerStreaming"
    (folder / "config.yaml").write_text(yaml.safe_dump(conf))
    write_am_mvn(folder / "am.mvn", fx.inputs()["cmvn"])
    codebook = np.random.default_rng(0).standard_normal((1024, 64)).astype(np.float32)
    np.save(root / "linguistic_tokenizer.npy", codebook)
    return root, fx, codebook


def test_converter_folder_round_trip(tmp_path):
    root, fx, codebook = _fake_tokenizer_root(tmp_path)
    ckpt = convert_paraformer.load_step_audio_tokenizer(root)
    assert ckpt.config == convert_paraformer.config_from_funasr(fx.config)
    assert ckpt.ignored == ["ctc.ctc_lo.weight", "decoder.decoders.0.self_attn.linear_q.weight",
                            "predictor.cif_output.bias"]
    np.testing.assert_allclose(ckpt.cmvn, fx.inputs()["cmvn"], rtol=1e-7)
    np.testing.assert_array_equal(ckpt.codebook, codebook)
    # export gives back the original tensors bit for bit
    exported = convert_paraformer.export_state_dict(ckpt.params)
    weights = fx.weights()
    assert sorted(exported) == sorted(weights)
    for k, v in weights.items():
        np.testing.assert_array_equal(exported[k], v, err_msg=k)
    # and the converted model reproduces the fixture, and its codes
    inputs = fx.inputs()
    enc, _ = encode_stream(ckpt.params, ckpt.config, inputs["feats"], inputs["chunk_lens"])
    np.testing.assert_allclose(enc, fx.outputs()["enc_out"], atol=2e-4, rtol=1e-4)
    codes = quantize_vq02(enc, ckpt.codebook)
    assert codes.dtype == np.int64 and codes.shape == (enc.shape[1],) and codes.max() < 1024


def test_converter_missing_tensor_named(tmp_path):
    name = "encoder.encoders.1.self_attn.fsmn_block.weight"
    root, _, _ = _fake_tokenizer_root(tmp_path, drop=[name])
    with pytest.raises(ConversionError, match="missing.*encoders.1.self_attn.fsmn_block.weight.*64, 1, 11"):
        convert_paraformer.load_step_audio_tokenizer(root)


def test_converter_wrong_shape_and_extra_tensor(tmp_path):
    import torch  # noqa: PLC0415  (torch is optional: the convert extra)
    root, _, _ = _fake_tokenizer_root(tmp_path, extra={"encoder.encoders.0.norm1.weight": torch.zeros(63)})
    with pytest.raises(ConversionError, match=r"encoder.encoders.0.norm1.weight.*\[63\].*\[64\]"):
        convert_paraformer.load_step_audio_tokenizer(root)
    root2, _, _ = _fake_tokenizer_root(tmp_path / "b", extra={"encoder.embed.pe": torch.zeros(3)})
    with pytest.raises(ConversionError, match="unexpected.*encoder.embed.pe"):
        convert_paraformer.load_step_audio_tokenizer(root2)


def test_converter_bad_files(tmp_path):
    root, _, _ = _fake_tokenizer_root(tmp_path)
    folder = root / convert_paraformer.PARAFORMER_SUBDIR
    np.save(root / "linguistic_tokenizer.npy", np.zeros((1024, 63), np.float32))
    with pytest.raises(ConversionError, match=r"\[1024, 63\]"):
        convert_paraformer.load_step_audio_tokenizer(root)
    (folder / "am.mvn").write_text("<Nnet>\n<Rescale> 560 560\n</Nnet>\n")
    with pytest.raises(ConversionError, match="AddShift"):
        convert_paraformer.load_paraformer_dir(folder)
    (folder / "model.pt").write_bytes(b"not a checkpoint")
    write_am_mvn(folder / "am.mvn", np.ones((2, 560), np.float32))
    with pytest.raises(ConversionError, match="not a readable torch checkpoint"):
        convert_paraformer.load_paraformer_dir(folder)
    (folder / "config.yaml").unlink()
    with pytest.raises(ConfigError, match="no config.yaml"):
        convert_paraformer.load_paraformer_dir(folder)
    with pytest.raises(ConversionError, match="not a folder"):
        convert_paraformer.load_paraformer_dir(tmp_path / "nowhere")


def test_config_from_funasr():
    conf = json.loads((ENCODER_FIXTURE / "manifest.json").read_text())["config"]
    cfg = convert_paraformer.config_from_funasr(conf)
    assert (cfg.output_size, cfg.linear_units, cfg.num_blocks, cfg.chunk_size, cfg.look_back) == (64, 96, 3, (0, 4, 5), 4)
    real = convert_paraformer.config_from_funasr({"encoder_conf": conf["real_model_encoder_conf"],
                                                  "frontend_conf": conf["frontend_conf"]})
    assert real == ParaformerEncoderConfig()
    with pytest.raises(ConfigError, match="SANMEncoderChunkOpt"):
        convert_paraformer.config_from_funasr({"encoder": "ConformerEncoder", "encoder_conf": {}})
    with pytest.raises(ConfigError, match="input_layer"):
        convert_paraformer.config_from_funasr({"encoder_conf": {"input_layer": "conv2d"}})


# ------------------------------------------------------------------ k-means


def test_nearest_centroid_exact_points_and_ties():
    codebook = np.array([[0.0, 0.0], [3.0, 4.0], [3.0, 4.0], [-1.0, 0.0]], np.float32)
    x = np.array([[3.0, 4.0], [0.1, 0.0], [-0.6, 0.0]], np.float32)
    idx, dists = nearest_centroid(x, codebook)
    assert np.asarray(idx).tolist() == [1, 0, 3]  # first of two equal centroids wins, like torch argmin
    np.testing.assert_allclose(np.asarray(dists)[1], [0.1, np.hypot(2.9, 4), np.hypot(2.9, 4), 1.1], rtol=1e-4)
    with pytest.raises(ValueError, match="cannot quantize"):
        quantize_vq02(np.zeros((5, 3)), codebook)
    assert quantize_vq02(np.zeros((0, 2)), codebook).shape == (0,)


def test_waveform_to_encoder_output():
    """The fixture's waveform through our online front end and encoder gives the reference enc_out."""
    frontend = pytest.importorskip("editx_jax.audio.features")
    fx = Fixture.load(ENCODER_FIXTURE)
    inputs = fx.inputs()
    feats, lens = frontend.wav_frontend_online(inputs["waveform"], inputs["cmvn"])
    assert list(lens) == inputs["chunk_lens"].tolist()
    cfg = convert_paraformer.config_from_funasr(fx.config)
    params, _ = convert_paraformer.convert_state_dict(fx.weights(), cfg)
    enc, _ = encode_stream(params, cfg, np.asarray(feats)[None], lens)
    np.testing.assert_allclose(enc, fx.outputs()["enc_out"], atol=2e-4, rtol=1e-4)
