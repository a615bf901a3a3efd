"""EditX: a wav and an instruction in, an edited wav out (architecture.md §0.1, §1.8-1.10).

    model = EditX.from_pretrained("editx-model/")        # written by tools/convert.py editx
    wave, sr = model.edit("in.wav", "the transcript", "emotion", "happy")
    wave, sr = model.clone("prompt.wav", "prompt transcript", "text to speak")

The path follows the official `tts.py`: load, mono, 0.6 peak cap; the audio tokenizer (16 kHz,
0.999 normalisation, trim, vq02 + vq06, 2:3 interleave) gives the LLM's audio ids; the decoder's
prompt features (24 kHz mel, CAM++ x-vector) come from the untrimmed capped audio; the prompt is
assembled exactly as `tts.py` does; the LLM samples until <|EOT|> and the final token is dropped;
token2wav turns the ids into 24 kHz speech with the source (edit) or the prompt (clone) as the
speaker prompt.

Iterative edits (`n_iter`) follow `tts_infer.py`: each round's output is written as a 16-bit wav and
read back before the next round tokenizes it (`pcm16_round_trip`; `editx.float_between_rounds` keeps
float instead), and from round 2 on a paralinguistic edit takes its tagged new text as the transcript
of the audio it edits again. The clone speaker name hashes the prompt as read, all channels.

Ids the LLM writes outside the audio range (`editx_jax/vocab.py`): text ids go to the decoder as they
are, whose clamp rule reads them as the official decoder does; ids past the audio range (70656...)
would crash the official decoder and become a text id. Both kinds are counted in `last_info`
(`stray_text_ids`, `stray_past_audio_ids`, and their sum `stray_ids`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import time
from typing import Any, Sequence

import jax
import numpy as np
import soundfile as sf

from editx_jax import sharding, vocab
from editx_jax.audio.io import AudioError, Clip, prepare_clip
from editx_jax.compile_cache import compile_seconds, enable_compile_cache
from editx_jax.checkpoint import PARTS, load_llm, load_llm_config, save_llm, write_settings
from editx_jax.config import Config, from_dict
from editx_jax.config.editx import EditXConfig  # noqa: F401  (re-exported from its old home)
from editx_jax.decoder import campplus, flow, vocoders
from editx_jax.decoder.token2wav import Decoder
from editx_jax.generate.decode import PromptTooLongError, check_room, generate
from editx_jax.models.llm import param_logical_axes, split_layers, stack_layers
from editx_jax.models.quantize import random_quantized_params
from editx_jax.random_init import random_params
from editx_jax.text import prompts
from editx_jax.text.tiny import train_layout_model
from editx_jax.text.tokenizer import TextTokenizer
from editx_jax.tokenizer.audio_tokenizer import AudioTokenizer

OUTPUT_SAMPLE_RATE = 24000


class EditXError(ValueError):
    """A request EditX cannot serve (bad audio, unknown edit, missing model part); one line."""


@dataclasses.dataclass
class Request:
    """One edit (or clone, with edit_type="clone": `audio` is the voice prompt, `audio_text` its
    transcript, `new_text` the text to speak)."""

    audio: Any  # a path, or a wave [N] / [C, N] with `sample_rate`
    audio_text: str | None
    edit_type: str
    edit_info: str | None = None
    new_text: str | None = None
    sample_rate: int | None = None
    language: str | None = None
    seed: int | None = None  # the LLM's sampling seed for this request (default: the run's seed)


class EditX:
    def __init__(self, config: Config, llm_params, text_tokenizer, audio_tokenizer, decoder, mesh=None):
        """mesh: generate and run token2wav sharded over it by the rules table (the LLM params
        should already be placed by `param_logical_axes`; the decoder's are placed here)."""
        self.config = config
        self.mesh = mesh
        enable_compile_cache()  # the first edit of the next process loads what this one compiles
        if mesh is not None:
            decoder.shard(mesh)
        # On the device once: numpy leaves would be copied again on every jitted call (7 GB each at
        # the released size); the host copies are dropped when the caller lets them go. Held in
        # the inference form (one tree per layer, `split_layers`, done in place in the given tree
        # one leaf at a time), which generation reads without slicing the layer stacks.
        self._llm_weights = jax.device_put(split_layers(llm_params))
        self.text_tokenizer = text_tokenizer
        self.audio_tokenizer = audio_tokenizer
        self.decoder = decoder
        self.last_info: dict = {}

    @property
    def llm_params(self) -> dict:
        """The LLM's params in the stored form (layers stacked: a copy of the layer weights, which
        the model holds one tree per layer for generation)."""
        return stack_layers(self._llm_weights)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_pretrained(cls, folder, llm_overrides: dict | None = None, mesh=None,
                        **generation_overrides) -> "EditX":
        """Load a folder written by `save` / `tools/convert.py editx`: llm/, audio_tokenizer/,
        decoder/ (each a checkpoint folder with its own config), tokenizer.model, and config.json
        with the pipeline sections (generation, editx).

        llm_overrides: LLM config fields, e.g. {"dtype": "float32", "param_dtype": "float32"} (a
        different param_dtype is cast while restoring). mesh: place the LLM's params by the rules
        table over this mesh, and generate and decode sharded. The params are restored straight onto the
        device(s), with no second host copy."""
        folder = pathlib.Path(folder)
        if not folder.is_dir():
            raise EditXError(f"model folder not found: {folder}")
        for part in PARTS:
            if not (folder / part).exists():
                raise EditXError(f"model folder {folder} is missing {part} (convert with tools/convert.py editx)")
        settings = json.loads((folder / "config.json").read_text())
        settings.setdefault("generation", {}).update(generation_overrides)
        # Folders written before the tokenizer's own settings decided inner BOS carry editx.inner_bos;
        # a value that the tokenizer settings contradict must not be dropped silently.
        old_inner_bos = settings.get("editx", {}).pop("inner_bos", None)
        text_tokenizer = TextTokenizer.from_pretrained(folder / "tokenizer.model")
        if old_inner_bos is not None and bool(old_inner_bos) != text_tokenizer.settings.add_bos_token:
            raise EditXError(f"{folder}/config.json sets editx.inner_bos={old_inner_bos}, which is now "
                             f"add_bos_token in tokenizer_config.json; set it there and remove editx.inner_bos")
        llm_config, _ = load_llm_config(folder / "llm", **(llm_overrides or {}))
        shardings = jax.sharding.SingleDeviceSharding(jax.devices()[0]) if mesh is None else \
            sharding.logical_to_sharding(param_logical_axes(llm_config), mesh)
        llm_config, llm_params = load_llm(folder / "llm", shardings, **(llm_overrides or {}))
        llm_params = split_layers(llm_params)  # before the other parts load: its copies' peak stays low
        audio_tokenizer = AudioTokenizer.from_pretrained(folder / "audio_tokenizer")
        decoder = Decoder.from_pretrained(folder / "decoder")
        config = from_dict(Config, settings)
        vocoder = {decoder.vocoder.name: decoder.vocoder_config}  # the vocoder's config section bears its name
        config = dataclasses.replace(config, llm=llm_config, tokenizer=audio_tokenizer.config,
                                     flow=decoder.flow_config, token2wav=decoder.config,
                                     campplus=decoder.campplus_config or config.campplus, **vocoder)
        return cls(config, llm_params, text_tokenizer, audio_tokenizer, decoder, mesh)

    @classmethod
    def random(cls, config: Config, seed: int = 0, mesh=None) -> "EditX":
        """Random weights at the sizes of `config` (e.g. configs/tiny.yaml), with a small trained
        text tokenizer of the released id layout. Produces noise: for demos and tests only.
        mesh: as in `from_pretrained`."""
        vocoder = vocoders.get(config.token2wav.vocoder)
        voc_config = getattr(config, vocoder.name)  # the vocoder's config section bears its name
        # int8 (llm.quantize): each random float leaf quantized as it is drawn, never the whole float tree
        llm_params, _ = random_quantized_params(config.llm, seed, config.llm.quantize, config.llm.quantize_embeddings)
        if mesh is not None:
            llm_params = sharding.place(llm_params, sharding.logical_to_sharding(param_logical_axes(config.llm), mesh))
        llm_params = split_layers(llm_params)  # before the other parts exist: its copies' peak stays low
        decoder = Decoder(random_params(flow.abstract_params(config.flow), seed + 1), config.flow,
                          # small vocoder kernels keep a random vocoder (HiFT) out of its chaotic regime
                          random_params(vocoder.module.abstract_params(voc_config), seed + 2, kernel_scale=0.3),
                          voc_config,
                          random_params(campplus.abstract_params(config.campplus), seed + 3), config.campplus,
                          config.token2wav)
        return cls(config, llm_params, TextTokenizer(train_layout_model()),
                   AudioTokenizer.random(config.tokenizer, seed=seed + 4), decoder, mesh)

    def save(self, folder) -> pathlib.Path:
        """Write the model folder `from_pretrained` reads."""
        folder = pathlib.Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_llm(folder / "llm", stack_layers(self._llm_weights, host=True),
                 self.config.llm)
        self.audio_tokenizer.save(folder / "audio_tokenizer")
        self.decoder.save(folder / "decoder")
        self.text_tokenizer.save(folder)
        write_settings(folder, self.config)
        return folder

    # ------------------------------------------------------------------ the public API

    def clone(self, prompt_audio, prompt_text: str, target_text: str, *, sample_rate: int | None = None,
              language: str | None = None, seed: int = 0) -> tuple[np.ndarray, int]:
        """Speak `target_text` in the voice of `prompt_audio` (whose transcript is `prompt_text`)."""
        req = Request(prompt_audio, prompt_text, "clone", new_text=target_text, sample_rate=sample_rate,
                      language=language)
        return self.run([req], seed=seed)[0]

    def edit(self, audio, audio_text: str | None, edit_type: str, edit_info: str | None = None,
             new_text: str | None = None, n_iter: int = 1, *, sample_rate: int | None = None,
             seed: int = 0) -> tuple[np.ndarray, int]:
        """Edit `audio` (its transcript `audio_text`) `n_iter` times; see `Request` for the fields."""
        req = Request(audio, audio_text, edit_type, edit_info, new_text, sample_rate)
        return self.run([req], n_iter=n_iter, seed=seed)[0]

    def edit_batch(self, requests: Sequence[Request], n_iter: int = 1, seed: int = 0) -> list[tuple[np.ndarray, int]]:
        """Several edits (and/or clones) in one jitted generation and one batched decode."""
        return self.run(list(requests), n_iter=n_iter, seed=seed)

    # ------------------------------------------------------------------ the work

    def run(self, requests: list[Request], n_iter: int = 1, seed: int = 0, progress=None,
            token_progress=None) -> list:
        """Every request for `n_iter` rounds; `progress(rounds done, n_iter)` after each round and
        `token_progress(steps done, max steps)` during each round's generation (`generate`'s progress)."""
        if not requests:
            raise EditXError("no requests")
        if n_iter < 1:
            raise EditXError(f"n_iter must be >= 1, got {n_iter}")
        for r in requests:
            validate_request(r)
            if r.edit_type == "clone" and n_iter != 1:
                raise EditXError("clone runs once; n_iter is for edits")
        timings = {"tokenize": 0.0, "generate": 0.0, "decode": 0.0}
        compiled_before = compile_seconds()
        key = jax.random.key(seed)
        clips = [self._load(r) for r in requests]  # each round's input: mono, capped (audio.io.prepare_clip)
        raw = [c.raw for c in clips]  # as read: the clone speaker id hashes these samples
        waves = [(c.wave, c.sr) for c in clips]  # what the tokenizer reads (it prepares each clip itself)
        first_prompt = None
        stray_text = stray_past = 0
        for round_ in range(n_iter):
            key, k_flow, k_voc = jax.random.split(key, 3)
            # one sampling key per request, from its own seed: a batch samples each request as alone
            row_keys = jax.numpy.stack([jax.random.fold_in(jax.random.key(seed if r.seed is None else r.seed), round_)
                                        for r in requests])
            t = time.perf_counter()
            tokens = self.audio_tokenizer.tokenize([w for w, _ in waves], [sr for _, sr in waves])
            prompt_ids = []
            for r, tok, raw_wave in zip(requests, tokens, raw):
                audio_ids = tok.ids
                if r.edit_type == "clone":
                    speaker = prompts.clone_speaker_id(r.audio_text, raw_wave)
                    prompt_ids.append(prompts.build_clone_ids(self.text_tokenizer, r.audio_text, audio_ids,
                                                              r.new_text, speaker=speaker, language=r.language))
                else:
                    new_text = r.new_text if r.edit_type == "paralinguistic" else None
                    prompt_ids.append(prompts.build_edit_ids(self.text_tokenizer, r.edit_type, r.edit_info,
                                                             round_transcript(r, round_), audio_ids,
                                                             new_text=new_text))
            if first_prompt is not None and self.config.editx.keep_prompt_features:
                speaker_prompts = first_prompt  # round 1's speaker prompt: no timbre drift across rounds
            else:
                speaker_prompts = [(tok.ids, *self.decoder.prompt_features(c)) for tok, c in zip(tokens, clips)]
                first_prompt = first_prompt or speaker_prompts
            timings["tokenize"] += time.perf_counter() - t

            t = time.perf_counter()
            gen = self._generate(prompt_ids, row_keys, progress=token_progress)
            timings["generate"] += time.perf_counter() - t

            t = time.perf_counter()
            gen_ids = []
            for g in gen:
                ids, n_text, n_past = vocab.for_decoder(g)
                stray_text, stray_past = stray_text + n_text, stray_past + n_past
                gen_ids.append(ids)
            out = self.decoder.token2wav(gen_ids, [p[0] for p in speaker_prompts], [p[1] for p in speaker_prompts],
                                         [p[2] for p in speaker_prompts], key=k_flow, vocoder_key=k_voc)
            waves = [(out.item(i), OUTPUT_SAMPLE_RATE) for i in range(len(requests))]
            if round_ + 1 < n_iter:
                if not self.config.editx.float_between_rounds:
                    # tts_infer.py saves each round as a 16-bit wav and the next round reads that file
                    waves = [(pcm16_round_trip(w), sr) for w, sr in waves]
                # the next round's speaker prompt: this output as a new clip (capped again, as tts.py does)
                clips = [prepare_clip(w, sr, name=f"round {round_ + 1} output {i}", max_seconds=None)
                         for i, (w, sr) in enumerate(waves)]
            timings["decode"] += time.perf_counter() - t
            if progress is not None:
                progress(round_ + 1, n_iter)
        # XLA compilation inside the stages above (a cache hit counts its load): 0 once all is warm
        self.last_info = {"timings": timings, "compile_seconds": compile_seconds() - compiled_before,
                          "stray_ids": stray_text + stray_past, "stray_text_ids": stray_text,
                          "stray_past_audio_ids": stray_past, "generated_tokens": [len(g) for g in gen_ids],
                          "rounds": n_iter}
        return [(w.astype(np.float32), sr) for w, sr in waves]

    def _generate(self, prompt_ids: list[list[int]], row_keys, progress=None) -> list[list[int]]:
        try:
            check_room([len(p) for p in prompt_ids], self.config.llm, self.config.generation)
        except PromptTooLongError as e:
            raise EditXError(str(e)) from None
        return generate(self._llm_weights, self.config.llm, self.config.generation, prompt_ids,
                        row_keys=row_keys, mesh=self.mesh, progress=progress).tokens

    def _load(self, r: Request) -> Clip:
        """The request's clip: mono with the 0.6 peak cap of `preprocess_prompt_wav`, and the samples as
        read (float32 [C, N] from a file, as torchaudio.load gives them); the length limit."""
        try:
            return prepare_clip(r.audio, r.sample_rate, max_seconds=self.config.editx.max_audio_seconds)
        except AudioError as e:
            raise EditXError(str(e)) from None


def round_transcript(r: Request, round_: int) -> str | None:
    """The transcript of the audio a round edits. `tts_infer.py` hands each round's target text on as
    the next round's transcript: for a paralinguistic edit that is the tagged new text, for the other
    edits the transcript itself."""
    return r.new_text if round_ > 0 and r.edit_type == "paralinguistic" else r.audio_text


def pcm16_round_trip(wave) -> np.ndarray:
    """`wave` as it reads back from a 16-bit wav written by soundfile (libsndfile), which is how
    `tts_infer.py` saves a round: float -> int32 by rounding x * 2^31 (clipped), the top 16 bits kept
    (an arithmetic shift, i.e. floor), read back as int16 / 32768 like torchaudio.load."""
    scaled = np.rint(np.asarray(wave, np.float32).astype(np.float64) * 2.0 ** 31)
    pcm = np.right_shift(np.clip(scaled, -2.0 ** 31, 2.0 ** 31 - 1).astype(np.int64), 16)
    return (pcm.astype(np.float32) / np.float32(32768)).astype(np.float32)


def validate_request(r: Request) -> None:
    """Check the edit type, value and texts before any model work (EditXError, one line)."""
    if r.edit_type == "clone":
        if not (r.audio_text or "").strip():
            raise EditXError("clone needs the prompt audio's transcript (prompt text)")
        if not (r.new_text or "").strip():
            raise EditXError("clone needs the text to speak")
        return
    try:
        prompts.edit_instruction(r.edit_type, r.edit_info, r.audio_text, r.new_text)
    except prompts.EditError as e:
        raise EditXError(str(e)) from None


def write_wav(path, wave: np.ndarray, sample_rate: int = OUTPUT_SAMPLE_RATE) -> pathlib.Path:
    """Write a float wav atomically: a temporary sibling, then a rename (never a half-written file)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    sf.write(str(tmp), np.asarray(wave, np.float32), int(sample_rate), format="WAV", subtype="FLOAT")
    os.replace(tmp, path)
    return path
