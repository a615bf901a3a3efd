"""End to end on tiny random weights (configs/tiny.yaml): wav in, wav out, through the CLI too."""

import dataclasses
import hashlib
import math
import subprocess
import sys

import jax
import numpy as np
import pytest
import soundfile as sf

from conftest import AUDIO, ROOT
from test_text import ref_clone, ref_edit  # tts.py's assembly written out from the strings (architecture.md §1.8)

from editx_jax import sharding
from editx_jax.config import MeshConfig, load_config
from editx_jax.pipeline import EditX, EditXError, Request, pcm16_round_trip

sys.path.insert(0, str(ROOT))
import infer  # noqa: E402  (infer.py at the repository root)

CLIP = str(AUDIO / "speed_prompt.wav")  # 24 kHz
CLIP16 = str(AUDIO / "espeak_en_16k_a.wav")


@pytest.fixture(scope="module")
def model():
    cfg = load_config(ROOT / "configs/tiny.yaml", ["generation.max_new_tokens=24", "generation.min_prompt_bucket=256"])
    return EditX.random(cfg, seed=0)


def expected_samples(n_tokens: int) -> int:
    return 2880 * math.ceil(n_tokens / 5)  # 5 tokens = 3 flow frames = 6 mel frames = 2880 samples


def test_edit_rate_and_duration_follow_the_tokens(model):
    wave, sr = model.edit(CLIP, "the weather is nice today", "emotion", "happy", seed=1)
    assert sr == 24000 and wave.dtype == np.float32 and np.all(np.isfinite(wave))
    n = model.last_info["generated_tokens"][0]
    assert len(wave) == expected_samples(n) and n > 0


def test_seeds(model):
    a, _ = model.edit(CLIP16, "hello", "style", "whisper", seed=3)
    b, _ = model.edit(CLIP16, "hello", "style", "whisper", seed=3)
    c, _ = model.edit(CLIP16, "hello", "style", "whisper", seed=4)
    np.testing.assert_array_equal(a, b)
    assert a.shape != c.shape or not np.array_equal(a, c)


def test_batch_gives_each_request_as_alone(model):
    requests = [Request(CLIP, "the weather is nice today", "speed", "faster", seed=5),
                Request(CLIP16, "hello there", "paralinguistic", new_text="hello [Laughter] there", seed=6),
                Request(CLIP16, "hello there", "clone", new_text="a new sentence to say", seed=7)]
    batch = model.edit_batch(requests)
    for req, (wave, sr) in zip(requests, batch):
        alone, _ = model.run([req])[0]
        assert sr == 24000
        np.testing.assert_allclose(wave, alone, atol=2e-5)


def test_iterative_edit_and_kept_prompt_features(model, monkeypatch):
    calls = []
    real = model.decoder.prompt_features
    monkeypatch.setattr(model.decoder, "prompt_features", lambda *a: calls.append(1) or real(*a))
    wave, _ = model.edit(CLIP, "the weather is nice today", "emotion", "sad", n_iter=2, seed=2)
    assert model.last_info["rounds"] == 2 and len(wave) == expected_samples(model.last_info["generated_tokens"][0])
    assert len(calls) == 2  # the speaker prompt follows each round's input, as upstream does
    keep = dataclasses.replace(model.config, editx=dataclasses.replace(model.config.editx, keep_prompt_features=True))
    monkeypatch.setattr(model, "config", keep)
    calls.clear()
    model.edit(CLIP, "the weather is nice today", "emotion", "sad", n_iter=2, seed=2)
    assert len(calls) == 1  # round 1's speaker prompt is kept


def test_clone(model):
    wave, sr = model.clone(CLIP, "the weather is nice today", "speak this in my voice", seed=1)
    assert sr == 24000 and len(wave) == expected_samples(model.last_info["generated_tokens"][0])


@pytest.mark.parametrize("kwargs, needle", [
    (dict(edit_type="emotion", edit_info="ecstatic"), "happy"),  # the error lists the valid values
    (dict(edit_type="teleport", edit_info=None), "emotion"),
    (dict(edit_type="paralinguistic", edit_info=None), "new"),
])
def test_bad_edits(model, kwargs, needle):
    with pytest.raises(EditXError, match=needle):
        model.edit(CLIP, "text", **kwargs)


def test_bad_audio_and_limits(model, tmp_path):
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(EditXError):
        model.edit(str(empty), "t", "emotion", "happy")
    with pytest.raises(EditXError, match="limit"):
        model.edit(np.zeros(24000 * 61, np.float32), "t", "emotion", "happy", sample_rate=24000)
    with pytest.raises(EditXError, match="transcript"):
        model.clone(CLIP, "", "target")


def test_model_folder_round_trip(model, tmp_path):
    folder = model.save(tmp_path / "model")
    again = EditX.from_pretrained(folder)
    a, _ = model.edit(CLIP16, "hello", "emotion", "angry", seed=9)
    b, _ = again.edit(CLIP16, "hello", "emotion", "angry", seed=9)
    np.testing.assert_array_equal(a, b)
    (folder / "tokenizer.model").unlink()
    with pytest.raises(EditXError, match="tokenizer.model"):
        EditX.from_pretrained(folder)


def test_model_folder_with_dtype_and_mesh(model, tmp_path):
    """from_pretrained honours LLM overrides and places the params over a mesh (restored straight to
    the devices); the sharded edit equals the one-device edit."""
    folder = model.save(tmp_path / "model")
    f32 = EditX.from_pretrained(folder, llm_overrides={"param_dtype": "float32", "dtype": "float32"})
    leaf = f32.llm_params["layers"]["mlp"]["up_proj"]["kernel"]
    assert f32.config.llm.param_dtype == "float32" and leaf.dtype == np.float32 and isinstance(leaf, jax.Array)
    if jax.device_count() >= 2:
        mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=1, tensor=2), jax.devices()[:2])
        sharded = EditX.from_pretrained(folder, mesh=mesh)
        assert sharding.split_factor(sharded.llm_params["layers"]["mlp"]["up_proj"]["kernel"]) == 2
        a, _ = model.edit(CLIP16, "hello", "emotion", "angry", seed=9)
        b, _ = sharded.edit(CLIP16, "hello", "emotion", "angry", seed=9)
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_cli_bad_dtype_and_mesh_fail_before_loading(tmp_path):
    for flag in (["--dtype", "float16"], ["--mesh", "data=3"], ["--mesh", "rows=2"]):
        bad = run_cli("edit", "--model", str(tmp_path / "absent"), "--audio", CLIP16, "--audio-text", "hi",
                      "--edit-type", "emotion", "--edit-info", "happy", "--out", str(tmp_path / "o.wav"), *flag)
        assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and flag[0] in bad.stderr, bad.stderr
        assert "model folder" not in bad.stderr  # refused before looking for the model


def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "infer.py"), *args], capture_output=True, text=True, cwd=ROOT)


@pytest.mark.slow
def test_cli_edit_and_errors(tmp_path):
    out = tmp_path / "out.wav"
    tiny = ["--random-tiny", "--set", "generation.max_new_tokens=16"]
    proc = run_cli("edit", *tiny, "--audio", CLIP16, "--audio-text", "hello", "--edit-type", "emotion",
                   "--edit-info", "happy", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "tokenize" in proc.stdout and "generate" in proc.stdout and "decode" in proc.stdout
    info = sf.info(str(out))
    assert info.samplerate == 24000 and info.frames % 2880 == 0
    bad = run_cli("edit", *tiny, "--audio", CLIP16, "--audio-text", "hi", "--edit-type", "emotion",
                  "--edit-info", "ecstatic", "--out", str(tmp_path / "bad.wav"))
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
    assert not (tmp_path / "bad.wav").exists()
    listing = run_cli("--list-edits")
    assert listing.returncode == 0 and "whisper" in listing.stdout and "[Laughter]" in listing.stdout


# ---------------------------------------------------------------- the official glue (architecture.md §1.8-1.10)


class Spy:
    """Records what the pipeline hands the tokenizer, the LLM and the decoder, round by round."""

    def __init__(self, model, monkeypatch, generated=None):
        self.tokenized, self.prompts, self.decoded, self.outputs = [], [], [], []
        tokenize, generate, token2wav = model.audio_tokenizer.tokenize, model._generate, model.decoder.token2wav

        def spy_tokenize(waves, rates):
            self.tokenized.append([np.array(w) for w in waves])
            out = tokenize(waves, rates)
            self.audio_ids = [t.ids for t in out]
            return out

        def spy_generate(prompt_ids, row_keys, progress=None):
            self.prompts.append([list(p) for p in prompt_ids])
            return generate(prompt_ids, row_keys) if generated is None else [list(generated) for _ in prompt_ids]

        def spy_token2wav(gen_ids, *args, **kwargs):
            self.decoded.append([np.array(g) for g in gen_ids])
            out = token2wav(gen_ids, *args, **kwargs)
            self.outputs.append([out.item(i) for i in range(len(gen_ids))])
            return out

        monkeypatch.setattr(model.audio_tokenizer, "tokenize", spy_tokenize)
        monkeypatch.setattr(model, "_generate", spy_generate)
        monkeypatch.setattr(model.decoder, "token2wav", spy_token2wav)


def test_paralinguistic_round_two_takes_the_tagged_text(model, monkeypatch):
    spy = Spy(model, monkeypatch)
    tagged = "hello [Laughter] there"
    model.edit(CLIP16, "hello there", "paralinguistic", new_text=tagged, n_iter=2, seed=3)
    assert len(spy.prompts) == 2
    round2_audio = spy.audio_ids[0]  # the ids of the last tokenize call: round 1's output
    want = ref_edit(model.text_tokenizer, "paralinguistic", None, tagged, round2_audio, tagged)
    assert spy.prompts[1][0] == want
    # round 1 still describes the source audio with its own transcript
    assert "The text corresponding to the audio is: hello there\n" in model.text_tokenizer.decode(spy.prompts[0][0])
    # other edits keep the transcript in every round
    model.edit(CLIP16, "hello there", "emotion", "sad", n_iter=2, seed=3)
    assert spy.prompts[-1][0] == ref_edit(model.text_tokenizer, "emotion", "sad", "hello there", spy.audio_ids[0])


def test_clone_name_hashes_every_channel_as_read(model, monkeypatch, tmp_path):
    rng = np.random.default_rng(0)
    mono, _ = sf.read(CLIP16, dtype="float32")
    stereo = np.stack([mono, 0.5 * mono + 0.01 * rng.standard_normal(mono.size).astype(np.float32)], axis=1)
    path = tmp_path / "stereo.wav"
    sf.write(str(path), stereo, 16000, subtype="PCM_16")
    # torchaudio.load: int16 / 32768, [channels, frames], flattened channel by channel
    pcm, _ = sf.read(str(path), dtype="int16", always_2d=True)
    flat = (pcm.T.astype(np.float32) / 32768).reshape(-1)
    name = "clone_" + hashlib.sha256("hello there".encode() + np.r_[flat[:1000], flat[-1000:]].tobytes()).hexdigest()[:16]
    mix = pcm.T.astype(np.float32).mean(axis=0) / 32768
    mono_name = "clone_" + hashlib.sha256(b"hello there" + np.r_[mix[:1000], mix[-1000:]].tobytes()).hexdigest()[:16]
    assert name != mono_name

    spy = Spy(model, monkeypatch)
    model.clone(str(path), "hello there", "a new sentence", seed=1)
    assert spy.prompts[0][0] == ref_clone(model.text_tokenizer, "hello there", spy.audio_ids[0], "a new sentence", name)


def test_stray_ids_left_to_the_decoder_rule(model, monkeypatch):
    """A text id in a vq06 slot reaches the decoder as it is (its clamp reads row 0 there, as the official
    flow does); only an id past the audio range is replaced, by a text id."""
    generated = [65536 + 3, 65536 + 4, 1234, 66560 + 9, 70656 + 40, 65536 + 1, 65536 + 2, 66560, 66561, 66562]
    spy = Spy(model, monkeypatch, generated=generated)
    model.edit(CLIP16, "hello", "emotion", "happy", seed=1)
    sent = spy.decoded[0][0]
    assert sent[2] == 1234 and sent[4] < 65536
    np.testing.assert_array_equal(np.delete(sent, 4), np.delete(generated, 4))
    info = model.last_info
    assert (info["stray_text_ids"], info["stray_past_audio_ids"], info["stray_ids"]) == (1, 1, 2)
    # the decoder's pairs for that slot: column 1 clamped to row 0, not vq06 code 0 (row 1025)
    gen_pairs = model.decoder.prepare([sent], [65536] * 5, np.zeros((6, 80), np.float32), np.ones(192, np.float32))[0]
    assert gen_pairs[0][0].tolist() == [3, 0] and gen_pairs[0][1].tolist() == [4, 1025 + 9]
    assert gen_pairs[0][2].tolist() == [1024, 0]  # the id past the range reads row 0 like a text id


def test_pcm16_round_trip_equals_a_wav_write_and_read(tmp_path):
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.uniform(-1.3, 1.3, 50000), rng.normal(0, 1e-4, 5000),
                        (rng.integers(-32768, 32768, 5000) + 0.5) / 32768,
                        [1.0, -1.0, 0.99999, -1.00002, 3.0, -3.0, 0.0, -1e-12]]).astype(np.float32)
    path = tmp_path / "round.wav"
    sf.write(str(path), x, 24000)  # tts_infer.py save_audio: soundfile's default WAV subtype, PCM_16
    assert sf.info(str(path)).subtype == "PCM_16"
    back, _ = sf.read(str(path), dtype="float32")
    got = pcm16_round_trip(x)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, back)


def test_rounds_see_the_16_bit_wav(model, monkeypatch, tmp_path):
    spy = Spy(model, monkeypatch)
    model.edit(CLIP16, "hello", "emotion", "sad", n_iter=2, seed=4)
    path = tmp_path / "round1.wav"
    sf.write(str(path), spy.outputs[0][0], 24000)
    back, _ = sf.read(str(path), dtype="float32")
    np.testing.assert_array_equal(spy.tokenized[1][0], back)
    assert not np.array_equal(back, spy.outputs[0][0])
    floats = dataclasses.replace(model.config, editx=dataclasses.replace(model.config.editx, float_between_rounds=True))
    monkeypatch.setattr(model, "config", floats)
    model.edit(CLIP16, "hello", "emotion", "sad", n_iter=2, seed=4)
    np.testing.assert_array_equal(spy.tokenized[-1][0], spy.outputs[-2][0])


def test_refusals_stay_one_line(model):
    for kwargs, needle in [(dict(edit_type="speed", edit_info="remove"), "unknown speed value 'remove'"),
                           (dict(edit_type="style", edit_info="happy"), "unknown style value 'happy'"),
                           (dict(edit_type="emotion", edit_info="whisper"), "unknown emotion value 'whisper'")]:
        with pytest.raises(EditXError, match=needle) as e:
            model.edit(CLIP16, "text", **kwargs)
        assert "\n" not in str(e.value)


def test_bfloat16_weights_held_as_bits_save_unchanged(tmp_path):
    """A bfloat16 model generates from its kernels' bits, one tree per layer (models/llm.py
    `split_layers`); users see, save and reload the bfloat16 weights bit for bit."""
    cfg = load_config(ROOT / "configs/tiny.yaml", ["generation.max_new_tokens=8", "llm.param_dtype=bfloat16",
                                                   "llm.dtype=bfloat16"])
    model = EditX.random(cfg, seed=1)
    assert model._llm_weights["layers"][0]["mlp"]["up_proj"]["kernel_t"].dtype == np.uint16
    kernel = model.llm_params["layers"]["mlp"]["up_proj"]["kernel"]
    assert kernel.dtype == jax.numpy.bfloat16
    again = EditX.from_pretrained(model.save(tmp_path / "model"))
    for a, b in zip(jax.tree_util.tree_leaves(model.llm_params), jax.tree_util.tree_leaves(again.llm_params)):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
    a, _ = model.edit(CLIP16, "hello", "emotion", "angry", seed=9)
    b, _ = again.edit(CLIP16, "hello", "emotion", "angry", seed=9)
    np.testing.assert_array_equal(a, b)


def test_explicit_new_tokens_over_max_length_refused_default_capped(model):
    """prompt + an explicitly asked max_new_tokens > max_length: one EditXError line after tokenizing
    (and infer.py's early bound never exceeds the real count); the default (max_new_tokens =
    max_length) is capped to the room instead."""
    n_ids = int(model.audio_tokenizer.tokenize([CLIP16])[0].ids.size)
    wave, sr = sf.read(CLIP16, dtype="float32")
    assert 0 < infer.audio_ids_lower_bound(wave, sr) <= n_ids
    lengths, real = [], model._generate
    model._generate = lambda ids, keys, progress=None: lengths.append(len(ids[0])) or real(ids, keys)
    saved = model.config
    try:
        model.edit(CLIP16, "hello", "emotion", "angry")
        assert lengths[0] > n_ids
        gen = dataclasses.replace(saved.generation, max_length=lengths[0] + 60, max_new_tokens=61)
        model.config = dataclasses.replace(saved, generation=gen)
        with pytest.raises(EditXError, match="max_new_tokens 61 more exceeds max_length"):
            model.edit(CLIP16, "hello", "emotion", "angry")
        gen = dataclasses.replace(gen, max_new_tokens=gen.max_length)
        model.config = dataclasses.replace(saved, generation=gen)
        model.edit(CLIP16, "hello", "emotion", "angry")
        assert 0 < model.last_info["generated_tokens"][0] <= 60
    finally:
        model.config = saved
        del model._generate
