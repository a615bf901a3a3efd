"""token2wav: LLM audio ids + the prompt's features -> 24 kHz speech (architecture.md §0.1 step 6, §3, §5).

The official `CosyVoice_stream_impl_.token2wav_nonstream`, batched:

    LLM ids - 65536 = audio values (vq02 0..1023, vq06 1024..5119)
      -> `_reshape` into (vq02, vq06) pair frames, 3 per group of 5 (ragged tail padded; decoder/tokens.py)
      -> [prompt pairs, generated pairs] -> flow (encoder, DiT ODE, 10 Euler steps, CFG 0.7)
      -> the generated part of the mel (B, 2 Lg, 80)
      -> vocoder: HiFT (the released model) or BigVGAN (mel reflect-padded by 3 frames each side)

Stray ids. The official code does not check the ids. An id below 65536 (a text token) gives a
negative value; `_reshape` keeps it negative (a vq06 slot adds 1), and `flow.inference` clamps
every index at 0 before the embedding, so a stray text id reads row 0 (vq02 code 0) whichever slot
it sits in. We do the same (`clamp_stray=True`). An id at or above 65536 + 5120 would index past the
5121-row table, which crashes the reference: here it is an `AudioTokenError`.

Batches. Items may have different generated and prompt lengths. Each item is laid out as
[prompt | generated | padding] and masked: the encoder zeroes padded frames before its look-ahead
conv and masks padded keys, the DiT masks padded keys and its convs are causal, so an item's frames
equal its run alone (up to float summation order). The ODE noise is the same for every item, as in
the reference where one fixed noise buffer serves every call. The vocoders' convolutions look
both ways, so they run per group of equal mel length (exactly as alone).

Edge cases (tested): no generated ids -> an empty waveform for that item (the reference crashes);
1-4 ids -> padded to one group like the reference (2880 samples); no prompt ids -> no prompt
conditioning (the prompt mel is ignored; the reference crashes); a prompt mel whose length is not
within a factor `max_prompt_stretch` (4) of 2 x the prompt pair frames -> `Token2WavError` (the
reference stretches anything; a factor 4 mismatch means mel and tokens are not from the same clip);
a speaker embedding that is not 192 wide -> `Token2WavError`.

`prompt_features(clip)` gives the prompt mel (24 kHz) and the CAM++ x-vector as `tts.py` computes
them from a prepared clip (`audio.io.prepare_clip`: mono, peak capped at 0.6), both rounded to
bfloat16 and back (`tts.py` passes `.to(torch.bfloat16)` and the flow casts back to float32; §5 item 1).

Streaming (`Token2WavStream(decoder, ...)`, `editx_jax/decoder/stream.py`) reproduces `token2wav_stream`.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from editx_jax import sharding
from editx_jax.audio.io import Clip, resample
from editx_jax.checkpoint import CheckpointError, load_params, read_config, read_meta, save_params
from editx_jax.config import ConfigError, from_dict
from editx_jax.config.decoder import Token2WavConfig
from editx_jax.decoder import campplus, dit, flow, vocoders
from editx_jax.decoder.campplus import CAMPPlusConfig, speaker_embedding
from editx_jax.decoder.embedding import dual_frames
from editx_jax.decoder.flow import (FlowConfig, FlowModel, cfg_velocity, cosine_t_span, noise_from_key,
                                    solve_euler, stretch_prompt_mel)
from editx_jax.decoder.hift import NSFNoise
from editx_jax.decoder.mel import MelConfig, mel_spectrogram
from editx_jax.decoder.tokens import Token2WavError, as_batch_arrays, as_sequences, audio_values, bf16_round, reshape_batch



# ---------------------------------------------------------------------------------------- flow


def _encode(module: FlowModel, pairs, lengths, embedding):
    """(mu (B, 2L, 80), spks (B, 80), valid (B, 2L)) with per-item token lengths."""
    norm = jnp.sqrt(jnp.sum(jnp.square(embedding), axis=1, keepdims=True))
    spks = module.spk_embed_affine_layer(embedding / jnp.maximum(norm, 1e-12))  # F.normalize, eps 1e-12
    valid = jnp.arange(pairs.shape[1])[None, :] < lengths[:, None]
    x = module.input_embedding(pairs) * valid[..., None]  # `* mask` as flow.inference
    h, mel_valid = module.encoder(x, lengths)
    return module.encoder_proj(h), spks, mel_valid[:, 0, :]


def _flow(params, pairs, lengths, embedding, cond, noise, *, config: FlowConfig, n_timesteps: int):
    model = FlowModel(config)
    variables = {"params": params}
    mu, spks, valid = model.apply(variables, pairs, lengths, embedding, method=_encode)
    z = jnp.broadcast_to(noise[:, :mu.shape[1]], mu.shape).astype(jnp.float32) * config.temperature
    est = dit.estimator(params["estimator"], config.estimator)  # blocks sliced once, outside the loop

    def velocity(x, t):
        return cfg_velocity(est, x, valid, mu, t, spks, cond, config.inference_cfg_rate)

    return solve_euler(velocity, z, cosine_t_span(n_timesteps))


@functools.cache
def flow_jit(config: FlowConfig, n_timesteps: int, mesh):
    """The jitted flow `(params, pairs, lengths, embedding, cond, noise) -> x`. With a mesh, the
    shardings come from the rules table: items over data x fsdp (`activation_batch`); the params
    name no logical axes, so they stay whole on every device, like the ODE noise all items share."""
    fn = functools.partial(_flow, config=config, n_timesteps=n_timesteps)
    if mesh is None:
        return jax.jit(fn)
    rows, whole = functools.partial(sharding.batch_sharding, mesh), sharding.replicated(mesh)
    return jax.jit(fn, in_shardings=(whole, rows(3), rows(1), rows(2), rows(3), whole), out_shardings=rows(3))


def flow_batch(params, pairs, lengths, embedding, cond, noise, config: FlowConfig, n_timesteps: int, mesh=None):
    """The flow on a padded batch: pairs (B, L, 2), lengths (B,) -> x at t = 1 (B, 2L, 80), all frames.
    With `mesh`, B must be a multiple of its data x fsdp size."""
    return flow_jit(config, n_timesteps, mesh)(params, pairs, lengths, embedding, cond, noise)


@functools.cache
def vocoder_jit(vocoder: vocoders.Vocoder, config, mesh):
    """`vocoder.inference(params, mel_bct, config, draws)` jitted with the rules table's shardings:
    items over data x fsdp (mels, NSF draws, speech), params whole. Without a mesh, the vocoder's own jit."""
    fn = functools.partial(_vocoder_inference, vocoder, config)
    if mesh is None:
        return fn
    rows = functools.partial(sharding.batch_sharding, mesh)
    return jax.jit(fn, in_shardings=(sharding.replicated(mesh), rows(3), rows(1)), out_shardings=rows(2))


def _vocoder_inference(vocoder, config, params, mel_bct, draws):
    return vocoder.inference(params, mel_bct, config, draws)


def _pad_rows(tree, rows: int):
    """Repeat row 0 of every leaf up to `rows` rows: idle items that fill a batch up to the mesh's
    data x fsdp size (each item is computed on its own, so they change nothing and are dropped)."""
    def pad(a):
        a = jnp.asarray(a)
        return a if a.shape[0] == rows else jnp.concatenate([a, jnp.repeat(a[:1], rows - a.shape[0], 0)])
    return jax.tree_util.tree_map(pad, tree)


# ---------------------------------------------------------------------------------------- output


class Token2WavOutput(NamedTuple):
    speech: np.ndarray  # (B, max samples) float32 at 24 kHz, zero after each item's length
    lengths: np.ndarray  # (B,) samples per item = 480 * mel_lengths
    mel: np.ndarray  # (B, max frames, 80) the flow's mel (channels-last), zero after mel_lengths
    mel_lengths: np.ndarray  # (B,) = 2 * 3 * ceil(N / 5) per item (0 for no ids)

    def item(self, i: int) -> np.ndarray:
        return self.speech[i, :int(self.lengths[i])]


# ---------------------------------------------------------------------------------------- decoder


class Decoder:
    """The released decoder: flow + vocoder (+ CAM++ for prompt features).

    flow_params / flow_config: `editx_jax.decoder.flow` (converted `flow.pt`).
    vocoder_params / vocoder_config: one of `decoder/vocoders.py`'s vocoders (HiFT: hift.pt, BigVGAN); must
      agree with `config.vocoder`.
    campplus_params / campplus_config: optional, only `prompt_features` needs them.
    """

    def __init__(self, flow_params, flow_config: FlowConfig, vocoder_params, vocoder_config,
                 campplus_params=None, campplus_config: CAMPPlusConfig | None = None,
                 config: Token2WavConfig | None = None, mel_config: MelConfig = MelConfig()):
        vocoder = vocoders.for_config(vocoder_config)
        config = config or Token2WavConfig(vocoder=vocoder.name)
        if config.vocoder != vocoder.name:
            raise ConfigError(f"token2wav.vocoder: config says {config.vocoder!r} but the vocoder config is "
                              f"{vocoder.name!r}")
        if vocoder.mel_channels(vocoder_config) != flow_config.output_size:
            raise ConfigError("token2wav.vocoder: its mel channels differ from the flow's output_size")
        self.vocoder = vocoder
        self.flow_params, self.flow_config = flow_params, flow_config
        self.vocoder_params, self.vocoder_config = vocoder_params, vocoder_config
        self.campplus_params = campplus_params
        self.campplus_config = campplus_config or (CAMPPlusConfig() if campplus_params is not None else None)
        self.config, self.mel_config = config, mel_config
        self.mesh = None

    def shard(self, mesh) -> "Decoder":
        """Run token2wav over `mesh` (jitted with the rules table's shardings, `flow_jit` and
        `vocoder_jit`): items split over data x fsdp, the flow and vocoder params placed whole on every
        device (they carry no logical axis names; the released ones are a few hundred MB)."""
        whole = sharding.replicated(mesh)
        self.flow_params = jax.device_put(self.flow_params, whole)
        self.vocoder_params = jax.device_put(self.vocoder_params, whole)
        self.mesh = mesh
        return self

    def _rows(self, n: int) -> int:
        """Batch rows for n items: a multiple of the mesh's data x fsdp size (n without a mesh)."""
        return n if self.mesh is None else n + -n % (self.mesh.shape["data"] * self.mesh.shape["fsdp"])

    # ------------------------------------------------------------------ checkpoint folders

    def save(self, folder, meta: dict | None = None) -> pathlib.Path:
        """One checkpoint folder (editx_jax/checkpoint.py) holding flow, vocoder and CAM++."""
        params = {"flow": self.flow_params, "vocoder": self.vocoder_params}
        config = {"token2wav": dataclasses.asdict(self.config), "flow": dataclasses.asdict(self.flow_config),
                  "vocoder": dataclasses.asdict(self.vocoder_config), "mel": dataclasses.asdict(self.mel_config)}
        if self.campplus_params is not None:
            params["campplus"] = self.campplus_params
            config["campplus"] = dataclasses.asdict(self.campplus_config)
        return save_params(folder, params, config, {"component": "decoder", "dtype": "float32", **dict(meta or {})})

    @classmethod
    def from_pretrained(cls, folder) -> "Decoder":
        """Load a folder written by `save` (or `tools/convert.py decoder`)."""
        meta = read_meta(folder)
        if meta.get("component") != "decoder":
            raise CheckpointError(f"{folder} holds a {meta.get('component')!r} checkpoint, not the decoder")
        raw = _tuples(read_config(folder))
        t2w = from_dict(Token2WavConfig, raw["token2wav"], "token2wav")
        flow_cfg = from_dict(FlowConfig, raw["flow"], "flow")
        vocoder = vocoders.get(t2w.vocoder)
        voc_cfg = from_dict(vocoder.config_class, raw["vocoder"], "vocoder")
        mel_cfg = from_dict(MelConfig, raw.get("mel", {}), "mel")
        cam_cfg = from_dict(CAMPPlusConfig, raw["campplus"], "campplus") if "campplus" in raw else None
        # Checked name by name and shape by shape against the configs (as the LLM and tokenizer loads
        # are), so a misshapen tensor is one CheckpointError line, not a Flax shape error later.
        abstract = {"flow": flow.abstract_params(flow_cfg),
                    "vocoder": vocoder.module.abstract_params(voc_cfg)}
        if cam_cfg is not None:
            abstract["campplus"] = campplus.abstract_params(cam_cfg)
        params = load_params(folder, abstract)
        return cls(params["flow"], flow_cfg, params["vocoder"], voc_cfg, params.get("campplus"), cam_cfg,
                   t2w, mel_cfg)

    # ------------------------------------------------------------------ prompt features

    def prompt_features(self, clip: Clip) -> tuple[np.ndarray, np.ndarray]:
        """(prompt mel (T, 80) at 24 kHz, CAM++ x-vector (192,)), both rounded to bf16 like tts.py.

        clip: from `audio.io.prepare_clip`, so already mono with the 0.6 peak cap of
        `preprocess_prompt_wav` (not capped again here); the mel resamples it to 24 kHz, CAM++ to 16 kHz.
        """
        if self.campplus_params is None:
            raise Token2WavError("prompt_features needs CAM++ params (campplus_params)")
        wave, sr = clip.wave, int(clip.sr)
        wave24 = wave if sr == self.mel_config.sampling_rate else resample(wave, sr, self.mel_config.sampling_rate)
        mel = np.asarray(mel_spectrogram(wave24, self.mel_config))
        emb = np.asarray(speaker_embedding(self.campplus_params, wave, sr, self.campplus_config))
        return bf16_round(mel), bf16_round(emb)

    # ------------------------------------------------------------------ token2wav

    def prepare(self, gen_ids, prompt_ids, prompt_mel, spk_embedding, clamp_stray: bool = True):
        """Validate and lay out a batch: (gen pairs list, prompt pairs list, cond mels list, embeddings (B, 192))."""
        gens = [audio_values(s, clamp_stray) for s in as_sequences(gen_ids, "gen_ids")]
        b = len(gens)
        prompts = as_sequences(prompt_ids, "prompt_ids")
        if len(prompts) == 1 and b > 1:
            prompts = prompts * b
        if len(prompts) != b:
            raise Token2WavError(f"prompt_ids: {len(prompts)} sequences for {b} generated sequences")
        prompts = [audio_values(s, clamp_stray) for s in prompts]
        mels = as_batch_arrays(prompt_mel, b, 2, "prompt_mel")
        embs = as_batch_arrays(spk_embedding, b, 1, "spk_embedding")
        dim = self.flow_config.spk_embed_dim
        for i, e in enumerate(embs):
            if e.shape != (dim,) or not np.all(np.isfinite(e)):
                raise Token2WavError(f"spk_embedding[{i}] must be {dim} finite values, got shape {list(e.shape)}")
        n_mels = self.flow_config.output_size
        conds = []
        for i, (p, m) in enumerate(zip(prompts, mels)):
            frames = 2 * dual_frames(p.size)
            if m.ndim != 2 or m.shape[1] != n_mels:
                raise Token2WavError(f"prompt_mel[{i}] must be (frames, {n_mels}), got shape {list(m.shape)}")
            if frames == 0:
                conds.append(np.zeros((0, n_mels), np.float32))
                continue
            ratio = m.shape[0] / frames
            s = self.config.max_prompt_stretch
            if not 1 / s <= ratio <= s:
                raise Token2WavError(f"prompt_mel[{i}] has {m.shape[0]} frames for {p.size} prompt ids, which "
                                     f"need {frames}: more than a factor {s:g} apart (mel and tokens of different clips?)")
            conds.append(stretch_prompt_mel(m[None], frames)[0])
        gen_pairs, prompt_pairs = reshape_batch(gens), reshape_batch(prompts)  # no ids: (0, 2) pairs
        return gen_pairs, prompt_pairs, conds, np.stack(embs).astype(np.float32)

    def flow_mels(self, gen_pairs, prompt_pairs, conds, embeddings, noise=None, key=None) -> list[np.ndarray]:
        """The generated mels, one (2 Lg_i, 80) array per item (items with no pairs give (0, 80))."""
        cfg = self.flow_config
        active = [i for i, g in enumerate(gen_pairs) if len(g)]
        out = [np.zeros((0, cfg.output_size), np.float32) for _ in gen_pairs]
        if not active:
            return out
        lengths = np.array([len(prompt_pairs[i]) + len(gen_pairs[i]) for i in active], np.int32)
        width = int(lengths.max())
        pairs = np.zeros((len(active), width, 2), np.int32)
        cond = np.zeros((len(active), 2 * width, cfg.output_size), np.float32)
        for row, i in enumerate(active):
            seq = np.concatenate([prompt_pairs[i], gen_pairs[i]], axis=0)
            pairs[row, :len(seq)] = seq
            cond[row, :len(conds[i])] = conds[i]
        if noise is None:
            noise = noise_from_key(jax.random.key(0) if key is None else key, 1, 2 * width, cfg.output_size)
        noise = jnp.asarray(noise, jnp.float32)
        if noise.ndim != 3 or noise.shape[0] not in (1, len(active)) or noise.shape[1] < 2 * width \
                or noise.shape[2] != cfg.output_size:
            raise Token2WavError(f"noise must be (1, >= {2 * width}, {cfg.output_size}) (channels-last), got "
                                 f"{list(noise.shape)}")
        rows = self._rows(len(active))
        noise = noise[:, :2 * width]
        if noise.shape[0] > 1:  # one noise per item: idle rows take row 0's
            noise = _pad_rows(noise, rows)
        x = flow_batch(self.flow_params, *_pad_rows((pairs, lengths, embeddings[active], cond), rows), noise, cfg,
                       self.config.n_timesteps, self.mesh)
        x = np.asarray(x)
        for row, i in enumerate(active):
            start = 2 * len(prompt_pairs[i])
            out[i] = x[row, start:start + 2 * len(gen_pairs[i])]
        return out

    def vocode(self, mels: Sequence[np.ndarray], key=None, nsf_noise: NSFNoise | None = None) -> list[np.ndarray]:
        """Mels (T_i, 80) -> waveforms (480 T_i,), batched per group of equal length.

        HiFT's NSF draws come from `key` (default key 0; every item draws with the same key, as it
        would alone) or from `nsf_noise` for a batch of one (parity with recorded draws).
        """
        out = [np.zeros((0,), np.float32) for _ in mels]
        groups: dict[int, list[int]] = {}
        for i, m in enumerate(mels):
            if len(m):
                groups.setdefault(len(m), []).append(i)
        vocoder = self.vocoder
        if nsf_noise is not None and (len(mels) != 1 or vocoder.nsf is None):
            raise Token2WavError("nsf_noise is for a single item with an NSF vocoder (HiFT)")
        key = jax.random.key(0) if key is None else key
        for frames, items in groups.items():
            if frames <= vocoder.context:  # torch refuses a reflect pad this long too
                raise Token2WavError(f"{vocoder.title} needs more than {vocoder.context} mel frames, got {frames}")
            rows = self._rows(len(items))
            mel_bct = _pad_rows(vocoder.pad(np.stack([mels[i] for i in items]).transpose(0, 2, 1)), rows)
            draws = nsf_noise
            if vocoder.nsf is not None and draws is None:
                one = vocoder.nsf.draw(key, 1, frames, self.vocoder_config)
                draws = jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, (rows,) + a.shape[1:]), one)
            draws = _pad_rows(draws, rows)
            wave = np.asarray(vocoder_jit(vocoder, self.vocoder_config, self.mesh)(self.vocoder_params, mel_bct, draws))
            for row, i in enumerate(items):
                out[i] = wave[row]
        return out

    def token2wav(self, gen_ids, prompt_ids, prompt_mel, spk_embedding, *, noise=None, key=None,
                  vocoder_key=None, nsf_noise: NSFNoise | None = None, clamp_stray: bool = True) -> Token2WavOutput:
        """`token2wav_nonstream`, batched.

        gen_ids: LLM output ids (65536 + value, the final EOS already dropped as tts.py does): one
          sequence, a (B, N) array or a list of B sequences of any lengths.
        prompt_ids: the prompt's vq0206 ids as LLM ids (65536 + value); one for all items or one per item.
        prompt_mel: (T, 80) 24 kHz mel of the prompt (or (B, T, 80) / a list), stretched to 2 x its pairs.
        spk_embedding: (192,) CAM++ x-vector (or (B, 192) / a list).
        noise: the ODE start noise (1, >= frames, 80) channels-last (the reference's fixed buffer,
          transposed); else drawn from `key` (default key 0) with `flow.noise_from_key`.
        vocoder_key / nsf_noise: HiFT's NSF draws (see `vocode`).
        """
        gp, pp, conds, embs = self.prepare(gen_ids, prompt_ids, prompt_mel, spk_embedding, clamp_stray)
        mels = self.flow_mels(gp, pp, conds, embs, noise=noise, key=key)
        waves = self.vocode(mels, key=vocoder_key, nsf_noise=nsf_noise)
        return _pack(waves, mels, self.flow_config.output_size)


def _pack(waves, mels, n_mels) -> Token2WavOutput:
    b = len(waves)
    lengths = np.array([len(w) for w in waves], np.int64)
    mel_lengths = np.array([len(m) for m in mels], np.int64)
    speech = np.zeros((b, int(lengths.max(initial=0))), np.float32)
    mel = np.zeros((b, int(mel_lengths.max(initial=0)), n_mels), np.float32)
    for i, (w, m) in enumerate(zip(waves, mels)):
        speech[i, :len(w)] = w
        mel[i, :len(m)] = m
    return Token2WavOutput(speech, lengths, mel, mel_lengths)


def _tuples(x):
    """JSON lists -> tuples (config dataclasses are frozen and hashed as jit static args)."""
    if isinstance(x, dict):
        return {k: _tuples(v) for k, v in x.items()}
    if isinstance(x, list):
        return tuple(_tuples(v) for v in x)
    return x
