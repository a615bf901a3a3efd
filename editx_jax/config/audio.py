"""The audio tokenizer's sections (architecture.md §2): the two front ends (Kaldi fbank for vq02,
whisper log-mel for vq06), the two encoders, and the pipeline settings around them."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from editx_jax.config.base import ConfigError, check_matmul_precision
from editx_jax.vocab import VQ02_CODES, VQ06_CODES

TOKENIZER_SAMPLE_RATE = 16000  # both tokenizer streams read 16 kHz audio
FBANK_WINDOWS = ("hamming", "povey")  # Kaldi window types; audio/features.py: WINDOWS holds the functions


def conv_out_len(length, stride: int):
    """Output length of a k=3, pad=1 convolution: floor((L + 2 - 3) / s) + 1, with 0 -> 0."""
    return (length - 1) // stride + 1


@dataclasses.dataclass(frozen=True)
class FbankConfig:
    """The vq02 front end: Kaldi fbank + LFR (+ CMVN, passed separately as an array).

    Defaults are the released model's (`WavFrontendOnline` of the Paraformer config). `dither` is the
    Kaldi dither amount; the official run uses funasr's default 1.0 (unseeded noise); 0 keeps the
    features deterministic and is what every parity check uses. The CAM++ front end is the same
    fbank with `window="povey"`, raw samples (`upscale_samples=False`) and no LFR (lfr_m = lfr_n = 1).
    """

    sample_rate: int = 16000
    n_mels: int = 80
    frame_length_ms: float = 25.0
    frame_shift_ms: float = 10.0
    window: str = "hamming"
    preemphasis: float = 0.97
    low_freq: float = 20.0
    high_freq: float = 0.0  # <= 0 means an offset from the Nyquist frequency (Kaldi convention)
    dither: float = 0.0
    lfr_m: int = 7
    lfr_n: int = 6
    upscale_samples: bool = True  # funasr's `upsacle_samples`: waveform * 32768 before fbank
    chunk_samples: int = 3840  # streaming piece: chunk_size[1] * 960 with chunk_size [0, 4, 5]

    def __post_init__(self):
        def check(ok, field, msg):
            if not ok:
                raise ConfigError(f"fbank.{field}: {msg}")
        check(self.sample_rate > 0, "sample_rate", f"must be positive, got {self.sample_rate}")
        check(self.n_mels > 0, "n_mels", f"must be positive, got {self.n_mels}")
        check(self.frame_length_ms > 0, "frame_length_ms", "must be positive")
        check(0 < self.frame_shift_ms <= self.frame_length_ms, "frame_shift_ms",
              "must be positive and at most frame_length_ms")
        check(self.window in FBANK_WINDOWS, "window",
              f"must be one of {', '.join(FBANK_WINDOWS)}, got {self.window!r}")
        check(0.0 <= self.preemphasis <= 1.0, "preemphasis", "must be in [0, 1]")
        check(self.dither >= 0.0, "dither", f"must be >= 0, got {self.dither}")
        check(self.lfr_m >= 1, "lfr_m", f"must be >= 1, got {self.lfr_m}")
        check(self.lfr_n >= 1, "lfr_n", f"must be >= 1, got {self.lfr_n}")
        check(self.chunk_samples >= self.frame_length, "chunk_samples",
              f"must hold at least one frame ({self.frame_length} samples)")
        nyquist = self.sample_rate / 2
        high = self.high_freq if self.high_freq > 0 else nyquist + self.high_freq
        check(0.0 <= self.low_freq < high <= nyquist, "low_freq",
              f"need 0 <= low_freq < high_freq <= Nyquist, got {self.low_freq}..{high}")

    @property
    def frame_length(self) -> int:  # samples
        return int(self.frame_length_ms * self.sample_rate / 1000)

    @property
    def frame_shift(self) -> int:  # samples
        return int(self.frame_shift_ms * self.sample_rate / 1000)

    @property
    def n_fft(self) -> int:  # Kaldi round_to_power_of_two
        return 1 << (self.frame_length - 1).bit_length()

    @property
    def feat_dim(self) -> int:
        return self.n_mels * self.lfr_m


@dataclasses.dataclass(frozen=True)
class WhisperMelConfig:
    """The vq06 front end: whisper's log-mel spectrogram."""

    sample_rate: int = 16000
    n_fft: int = 400
    hop_length: int = 160
    n_mels: int = 128
    padding: int = 0  # zeros appended before the STFT (whisper's `padding` argument)

    def __post_init__(self):
        for name in ("sample_rate", "n_fft", "hop_length", "n_mels"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"whisper_mel.{name}: must be positive, got {getattr(self, name)}")
        if self.padding < 0:
            raise ConfigError(f"whisper_mel.padding: must be >= 0, got {self.padding}")


@dataclasses.dataclass(frozen=True)
class ParaformerEncoderConfig:
    """SANMEncoderChunkOpt sizes and the streaming driver settings. Defaults are the released model."""

    input_size: int = 560  # n_mels * lfr_m
    output_size: int = 512
    attention_heads: int = 4
    linear_units: int = 2048
    num_blocks: int = 50  # 1 `encoders0` layer (input_size -> output_size) + num_blocks-1 `encoders`
    kernel_size: int = 11  # FSMN depthwise conv
    sanm_shift: int = 0  # FunASR spells it `sanm_shfit`
    normalize_before: bool = True
    layer_norm_eps: float = 1e-12
    chunk_size: tuple[int, int, int] = (0, 4, 5)  # (left overlap, stride, right overlap) in LFR frames
    look_back: int = 4  # encoder_chunk_look_back: cached chunks of k/v
    matmul_precision: str = "highest"  # the reference runs fp32 matmuls; codes must match exactly

    def __post_init__(self):
        object.__setattr__(self, "chunk_size", tuple(int(c) for c in self.chunk_size))
        for name in ("input_size", "output_size", "attention_heads", "linear_units", "num_blocks",
                     "kernel_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"paraformer.{name}: must be positive, got {getattr(self, name)}")
        if self.output_size % self.attention_heads:
            raise ConfigError(f"paraformer.attention_heads: {self.attention_heads} heads do not divide "
                              f"output_size {self.output_size}")
        if self.input_size % 2:
            raise ConfigError(f"paraformer.input_size: the sinusoidal positions need an even size, "
                              f"got {self.input_size}")
        if not 0 <= self.sanm_shift < self.kernel_size - (self.kernel_size - 1) // 2:
            raise ConfigError(f"paraformer.sanm_shift: must be in [0, {self.kernel_size - (self.kernel_size - 1) // 2}),"
                              f" got {self.sanm_shift}")
        if self.layer_norm_eps <= 0:
            raise ConfigError("paraformer.layer_norm_eps: must be positive")
        if len(self.chunk_size) != 3 or self.chunk_size[0] < 0 or self.chunk_size[1] <= 0 or self.chunk_size[2] <= 0:
            # chunk_size[2] = 0 would make the official cache update `k[:, :, :-0]` empty: not a mode we copy
            raise ConfigError(f"paraformer.chunk_size: expected (left >= 0, stride > 0, right > 0), "
                              f"got {self.chunk_size}")
        if self.look_back <= 0:
            raise ConfigError(f"paraformer.look_back: only a positive encoder look-back is supported, "
                              f"got {self.look_back}")
        check_matmul_precision(self.matmul_precision, "paraformer.matmul_precision")

    @property
    def head_dim(self) -> int:
        return self.output_size // self.attention_heads

    @property
    def overlap_frames(self) -> int:
        """Embedded input frames carried from one call's window to the next (5 when released)."""
        return self.chunk_size[0] + self.chunk_size[2]

    @property
    def cache_frames(self) -> int:
        """K/V frames kept after the second call on: look_back * stride (16 when released)."""
        return self.look_back * self.chunk_size[1]

    @property
    def input_scale(self) -> float:
        return math.sqrt(self.output_size)  # sqrt(output_size), not sqrt(input_size)

    @property
    def fsmn_padding(self) -> tuple[int, int]:
        left = (self.kernel_size - 1) // 2 + self.sanm_shift
        return left, self.kernel_size - 1 - left


@dataclasses.dataclass(frozen=True)
class S3TokenizerConfig:
    """S3 tokenizer v1 (25 Hz). Defaults are the released `speech_tokenizer_v1.onnx` sizes."""

    n_mels: int = 128
    n_audio_ctx: int = 1500  # rows of the position table: the most frames after the conv stem
    n_audio_state: int = 1280
    n_audio_head: int = 20
    n_audio_layer: int = 6
    codebook_size: int = 4096
    conv1_stride: int = 2  # 2 = the 25 Hz v1 that Step-Audio ships; 1 = S3Tokenizer's 50 Hz v1
    ln_eps: float = 1e-5
    # Official chunking of long audio (get_vq06_code): 30 s pieces at 16 kHz, tails < 480 samples dropped.
    chunk_samples: int = 480_000
    min_chunk_samples: int = 480
    hop_length: int = 160  # log-mel hop: frames per piece = samples // hop_length
    # "highest" keeps float32 matmuls exact on GPUs/TPUs (no TF32/bf16 passes); codes must not flip.
    matmul_precision: str = "highest"

    def __post_init__(self):
        for name in ("n_mels", "n_audio_ctx", "n_audio_state", "n_audio_head", "n_audio_layer",
                     "codebook_size", "chunk_samples", "min_chunk_samples", "hop_length"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value <= 0:
                raise ConfigError(f"s3tokenizer.{name}: must be a positive integer, got {value!r}")
        if self.n_audio_state % self.n_audio_head:
            raise ConfigError(f"s3tokenizer.n_audio_head: {self.n_audio_head} heads do not divide "
                              f"n_audio_state {self.n_audio_state}")
        if self.n_audio_state % 2:
            raise ConfigError(f"s3tokenizer.n_audio_state: the sin|cos position table needs an even "
                              f"width, got {self.n_audio_state}")
        if self.conv1_stride not in (1, 2):
            raise ConfigError(f"s3tokenizer.conv1_stride: must be 1 or 2, got {self.conv1_stride}")
        if not self.ln_eps > 0:
            raise ConfigError(f"s3tokenizer.ln_eps: must be positive, got {self.ln_eps}")
        if self.min_chunk_samples > self.chunk_samples:
            raise ConfigError(f"s3tokenizer.min_chunk_samples: {self.min_chunk_samples} exceeds "
                              f"chunk_samples {self.chunk_samples}")
        check_matmul_precision(self.matmul_precision, "s3tokenizer.matmul_precision")

    @property
    def head_dim(self) -> int:
        return self.n_audio_state // self.n_audio_head

    @property
    def precision(self) -> str:
        """The matmul precision by name, which jax's matmuls and convolutions take as it is."""
        return self.matmul_precision

    def token_lengths(self, mel_len):
        """Frames after the conv stem: (T-1)//s1 + 1, then (T1-1)//2 + 1 (0 stays 0)."""
        return conv_out_len(conv_out_len(mel_len, self.conv1_stride), 2)


@dataclasses.dataclass(frozen=True)
class AudioTokenizerConfig:
    """Both encoders' sizes, the vq02 front end, and the pipeline settings. Defaults: the release."""

    paraformer: ParaformerEncoderConfig = dataclasses.field(default_factory=ParaformerEncoderConfig)
    fbank: FbankConfig = dataclasses.field(default_factory=FbankConfig)
    s3: S3TokenizerConfig = dataclasses.field(default_factory=S3TokenizerConfig)
    vq02_codes: int = VQ02_CODES  # rows of linguistic_tokenizer.npy
    sample_rate: int = TOKENIZER_SAMPLE_RATE
    peak_cap: float = 0.6  # §0.1 step 1 (undone by the 0.999 normalisation up to rounding); 0: off
    energy_peak: float = 0.999
    trim: bool = True
    vq02_block_calls: int = 1024  # streaming calls (0.24 s each) per vq02 encoder pass on long audio
    vq06_batch: int = 8  # 30 s pieces per vq06 encoder pass

    def __post_init__(self):
        def check(ok, field, msg):
            if not ok:
                raise ConfigError(f"audio_tokenizer.{field}: {msg}")
        check(self.fbank.feat_dim == self.paraformer.input_size, "paraformer.input_size",
              f"{self.paraformer.input_size} != fbank n_mels * lfr_m = {self.fbank.feat_dim}")
        check(self.fbank.sample_rate == self.sample_rate, "fbank.sample_rate",
              f"{self.fbank.sample_rate} != sample_rate {self.sample_rate}")
        check(0 < self.vq02_codes <= VQ02_CODES, "vq02_codes", f"must be in [1, {VQ02_CODES}], "
              f"got {self.vq02_codes}")
        check(self.s3.codebook_size <= VQ06_CODES, "s3.codebook_size",
              f"must be at most {VQ06_CODES} (the LLM's vq06 id range), got {self.s3.codebook_size}")
        check(self.sample_rate > 0, "sample_rate", f"must be positive, got {self.sample_rate}")
        check(0 <= self.peak_cap, "peak_cap", f"must be >= 0 (0 disables it), got {self.peak_cap}")
        check(0 < self.energy_peak <= 1, "energy_peak", f"must be in (0, 1], got {self.energy_peak}")
        check(self.vq02_block_calls >= 8, "vq02_block_calls", f"must be >= 8, got {self.vq02_block_calls}")
        check(self.vq06_batch >= 1, "vq06_batch", f"must be >= 1, got {self.vq06_batch}")

    @property
    def whisper_mel(self) -> WhisperMelConfig:
        return WhisperMelConfig(sample_rate=self.sample_rate, n_mels=self.s3.n_mels, hop_length=self.s3.hop_length)

    @classmethod
    def tiny(cls, **overrides) -> "AudioTokenizerConfig":
        """Small encoders with the real front ends and code ranges (tests, demos, --random-tiny)."""
        para = ParaformerEncoderConfig(output_size=64, attention_heads=4, linear_units=128, num_blocks=4)
        s3cfg = S3TokenizerConfig(n_audio_state=64, n_audio_head=4, n_audio_layer=2)
        return cls(paraformer=para, s3=s3cfg, **overrides)
