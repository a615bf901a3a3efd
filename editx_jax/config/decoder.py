"""The decoder's sections (architecture.md §3): the flow model (embedding, upsampling encoder, DiT
estimator), the two vocoders (HiFT, BigVGAN), CAM++, the 24 kHz prompt mel, and the token2wav
settings around them."""

from __future__ import annotations

import dataclasses

import numpy as np

from editx_jax.config.base import DTYPES, MATMUL_PRECISIONS, ConfigError, as_tuples, check_matmul_precision

VOCODERS = ("hift", "bigvgan")
BIGVGAN_CONTEXT = 3  # mel frames reflect-padded on each side before BigVGAN (its conv_pre has no padding)
CONV_PRE_KERNEL = 7  # BigVGAN's conv_pre kernel


# ---------------------------------------------------------------------------------------- flow


@dataclasses.dataclass(frozen=True)
class DualCodebookConfig:
    """The flow model's input embedding; defaults are the released sizes (cosyvoice.yaml)."""

    vocab_size: int = 5121  # 1024 vq02 + 1 pad + 4096 vq06
    input_size: int = 512  # output width; the table is input_size // 2 wide

    def __post_init__(self):
        for name in ("vocab_size", "input_size"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value <= 0:
                raise ConfigError(f"dual_codebook.{name}: must be a positive integer, got {value!r}")
        if self.input_size % 2:
            raise ConfigError(f"dual_codebook.input_size: must be even (two halves), got {self.input_size}")


@dataclasses.dataclass(frozen=True)
class UpsampleEncoderConfig:
    """`UpsampleConformerEncoderV2`; defaults are the released cosyvoice.yaml values (§3.4.1)."""

    input_size: int = 512
    output_size: int = 512
    attention_heads: int = 8
    linear_units: int = 2048
    num_blocks: int = 6  # conformer layers at the token rate
    num_up_blocks: int = 4  # conformer layers at the mel rate
    pre_lookahead_len: int = 3
    up_stride: int = 2
    up_scale_factor: int = 2
    key_bias: bool = True
    layer_eps: float = 1e-12  # LayerNorms inside the conformer layers
    embed_eps: float = 1e-5  # embed / up_embed LayerNorms and after_norm
    isolate_padding: bool = True  # see the module docstring; False = the reference's ragged-batch leak
    # "highest" keeps float32 matmuls exact on GPUs/TPUs (no TF32/bf16 passes).
    matmul_precision: str = "highest"

    def __post_init__(self):
        for name in ("input_size", "output_size", "attention_heads", "linear_units", "num_blocks",
                     "num_up_blocks", "pre_lookahead_len", "up_stride", "up_scale_factor"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"upsample_encoder.{name}: must be a positive integer, got {value!r}")
        if self.input_size != self.output_size:
            # up_embed's Linear is input_size -> output_size but is fed output_size features
            raise ConfigError(f"upsample_encoder.input_size: must equal output_size ({self.output_size}) "
                              f"as in the reference, got {self.input_size}")
        if self.output_size % self.attention_heads:
            raise ConfigError(f"upsample_encoder.attention_heads: {self.attention_heads} heads do not "
                              f"divide output_size {self.output_size}")
        if self.output_size % 2:
            raise ConfigError(f"upsample_encoder.output_size: the sin/cos position table needs an even "
                              f"width, got {self.output_size}")
        if self.up_scale_factor != self.up_stride:
            raise ConfigError(f"upsample_encoder.up_scale_factor: must equal up_stride ({self.up_stride}) "
                              f"so that lengths and frames agree, got {self.up_scale_factor}")
        for name in ("layer_eps", "embed_eps"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"upsample_encoder.{name}: must be positive, got {getattr(self, name)!r}")
        check_matmul_precision(self.matmul_precision, "upsample_encoder.matmul_precision")

    @property
    def head_dim(self) -> int:
        return self.output_size // self.attention_heads

    @property
    def precision(self) -> str:
        """The matmul precision by name, which jax's matmuls and convolutions take as it is."""
        return self.matmul_precision

    def output_lengths(self, lengths):
        return lengths * self.up_stride


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    """The DiT estimator. Defaults are the released sizes (§3.5)."""

    in_channels: int = 320  # x, mu, spks, cond: 4 x 80
    out_channels: int = 80
    hidden_size: int = 512
    depth: int = 16
    num_heads: int = 8
    head_dim: int = 64
    mlp_ratio: float = 4.0
    dtype: str = "float32"  # compute dtype of the projections; norms and softmax stay float32

    def __post_init__(self):
        for name in ("in_channels", "out_channels", "hidden_size", "depth", "num_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"dit.{name}: must be a positive integer, got {value!r}")
        if self.in_channels % 4:
            raise ConfigError(f"dit.in_channels: must be 4 x the mel channels ([x, mu, spks, cond]), "
                              f"got {self.in_channels}")
        if not self.mlp_ratio > 0 or int(self.hidden_size * self.mlp_ratio) <= 0:
            raise ConfigError(f"dit.mlp_ratio: must be positive, got {self.mlp_ratio}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dit.dtype: one of {DTYPES}, got {self.dtype!r}")

    @property
    def mel_channels(self) -> int:
        return self.in_channels // 4

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def attn_inner(self) -> int:
        return self.num_heads * self.head_dim


@dataclasses.dataclass(frozen=True)
class FlowConfig:
    """`CausalMaskedDiffWithXvec` + `CausalConditionalCFM`. Defaults are the released sizes (§3.1, §3.4)."""

    input_size: int = 512
    output_size: int = 80  # mel channels
    spk_embed_dim: int = 192
    vocab_size: int = 5121
    embedding: DualCodebookConfig = DualCodebookConfig()
    encoder: UpsampleEncoderConfig = UpsampleEncoderConfig()
    estimator: DiTConfig = DiTConfig()
    inference_cfg_rate: float = 0.7
    n_timesteps: int = 10  # CosyVoice() default
    temperature: float = 1.0

    def __post_init__(self):
        for name in ("input_size", "output_size", "spk_embed_dim", "vocab_size", "n_timesteps"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"flow.{name}: must be a positive integer, got {value!r}")
        if self.embedding.input_size != self.input_size or self.embedding.vocab_size != self.vocab_size:
            raise ConfigError(f"flow.embedding: must have input_size {self.input_size} and vocab_size "
                              f"{self.vocab_size}, got {self.embedding.input_size} / {self.embedding.vocab_size}")
        if self.encoder.input_size != self.input_size:
            raise ConfigError(f"flow.encoder.input_size: must equal flow.input_size {self.input_size}, "
                              f"got {self.encoder.input_size}")
        if self.encoder.up_stride != 2:
            raise ConfigError(f"flow.encoder.up_stride: the mel runs at twice the token rate, got "
                              f"{self.encoder.up_stride}")
        if self.estimator.mel_channels != self.output_size or self.estimator.out_channels != self.output_size:
            raise ConfigError(f"flow.estimator.in_channels: must be 4 x {self.output_size} with out_channels "
                              f"{self.output_size}, got {self.estimator.in_channels} / "
                              f"{self.estimator.out_channels}")
        if not self.inference_cfg_rate >= 0:
            raise ConfigError(f"flow.inference_cfg_rate: must be >= 0, got {self.inference_cfg_rate!r}")
        if not self.temperature > 0:
            raise ConfigError(f"flow.temperature: must be positive, got {self.temperature!r}")


# ---------------------------------------------------------------------------------------- vocoders


@dataclasses.dataclass(frozen=True)
class HiFTConfig:
    """HiFTGenerator + ConvRNNF0Predictor. Defaults are the released cosyvoice.yaml `hift:` values."""

    in_channels: int = 80
    base_channels: int = 512
    nb_harmonics: int = 8  # overtones; the NSF uses nb_harmonics + 1 sines
    sampling_rate: int = 24000
    nsf_alpha: float = 0.1  # sine amplitude
    nsf_sigma: float = 0.003  # noise std on voiced samples
    nsf_voiced_threshold: float = 10.0  # Hz; f0 above it is voiced
    upsample_rates: tuple[int, ...] = (8, 5, 3)
    upsample_kernel_sizes: tuple[int, ...] = (16, 11, 7)
    istft_n_fft: int = 16
    istft_hop_len: int = 4
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    source_resblock_kernel_sizes: tuple[int, ...] = (7, 7, 11)
    source_resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    lrelu_slope: float = 0.1  # inside the stages; the one before conv_post is torch's default 0.01
    audio_limit: float = 0.99
    f0_cond_channels: int = 512
    f0_num_convs: int = 5
    matmul_precision: str = "highest"

    def __post_init__(self):
        for name in ("resblock_dilation_sizes", "source_resblock_dilation_sizes", "upsample_rates",
                     "upsample_kernel_sizes", "resblock_kernel_sizes", "source_resblock_kernel_sizes"):
            object.__setattr__(self, name, as_tuples(getattr(self, name)))
        for name in ("in_channels", "base_channels", "sampling_rate", "istft_n_fft", "istft_hop_len",
                     "f0_cond_channels", "f0_num_convs"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value <= 0:
                raise ConfigError(f"hift.{name}: must be a positive integer, got {value!r}")
        if not isinstance(self.nb_harmonics, (int, np.integer)) or self.nb_harmonics < 0:
            raise ConfigError(f"hift.nb_harmonics: must be a non-negative integer, got {self.nb_harmonics!r}")
        n = len(self.upsample_rates)
        if n == 0 or len(self.upsample_kernel_sizes) != n:
            raise ConfigError(f"hift.upsample_kernel_sizes: need one kernel per upsample rate ({n}), "
                              f"got {list(self.upsample_kernel_sizes)}")
        for u, k in zip(self.upsample_rates, self.upsample_kernel_sizes):
            if u <= 0 or k < u or (k - u) % 2:
                raise ConfigError(f"hift.upsample_kernel_sizes: kernel {k} for rate {u} must be >= the rate "
                                  f"with an even difference, so that each stage scales the length exactly")
        if self.base_channels % 2 ** n:
            raise ConfigError(f"hift.base_channels: {self.base_channels} must be divisible by 2**{n}")
        if len(self.resblock_kernel_sizes) != len(self.resblock_dilation_sizes) or not self.resblock_kernel_sizes:
            raise ConfigError("hift.resblock_dilation_sizes: need one dilation list per resblock kernel")
        if len(self.source_resblock_kernel_sizes) != n or len(self.source_resblock_dilation_sizes) != n:
            raise ConfigError(f"hift.source_resblock_kernel_sizes: need one source resblock per stage ({n})")
        for name in ("resblock_kernel_sizes", "source_resblock_kernel_sizes"):
            if any(k % 2 == 0 or k <= 0 for k in getattr(self, name)):
                raise ConfigError(f"hift.{name}: kernels must be odd and positive, got {list(getattr(self, name))}")
        if self.istft_n_fft % self.istft_hop_len or self.istft_n_fft % 2:
            raise ConfigError(f"hift.istft_hop_len: {self.istft_hop_len} must divide the even istft_n_fft "
                              f"{self.istft_n_fft}")
        if not 0 < self.audio_limit:
            raise ConfigError(f"hift.audio_limit: must be positive, got {self.audio_limit}")
        if self.matmul_precision not in MATMUL_PRECISIONS:
            raise ConfigError(f"hift.matmul_precision: one of {sorted(MATMUL_PRECISIONS)}, got {self.matmul_precision!r}")

    @property
    def hop(self) -> int:
        """Waveform samples per mel frame (480)."""
        return int(np.prod(self.upsample_rates)) * self.istft_hop_len

    @property
    def n_sines(self) -> int:
        return self.nb_harmonics + 1

    @property
    def n_bins(self) -> int:
        return self.istft_n_fft // 2 + 1

    def stage_channels(self, i: int) -> int:
        """Channels after upsampling stage i."""
        return self.base_channels // 2 ** (i + 1)

    @property
    def source_down_rates(self) -> tuple[int, ...]:
        """Per stage, the STFT-frame decimation that brings the source to that stage's rate (15, 3, 1)."""
        rates = np.cumprod((1,) + tuple(self.upsample_rates[::-1][:-1]))
        return tuple(int(r) for r in rates[::-1])


@dataclasses.dataclass(frozen=True)
class BigVGANConfig:
    """Step's BigVGAN constructor arguments; defaults are the class defaults (real sizes unknown)."""

    num_mels: int = 80
    upsample_initial_channel: int = 512
    upsample_rates: tuple[int, ...] = (5, 4, 3, 2, 2, 2)
    upsample_kernel_sizes: tuple[int, ...] = (11, 8, 7, 4, 4, 4)
    resblock: str = "1"  # "1" = AMPBlock1, "2" = AMPBlock2
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    activation: str = "snakebeta"  # or "snake"
    snake_logscale: bool = True
    use_bias_at_final: bool = False
    use_tanh_at_final: bool = False
    conv_pre_padding: int = 0  # Step's class; NVIDIA's bigvgan package uses 3
    matmul_precision: str = "highest"

    def __post_init__(self):
        for name in ("resblock_dilation_sizes", "upsample_rates", "upsample_kernel_sizes", "resblock_kernel_sizes"):
            object.__setattr__(self, name, as_tuples(getattr(self, name)))
        for name in ("num_mels", "upsample_initial_channel"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value <= 0:
                raise ConfigError(f"bigvgan.{name}: must be a positive integer, got {value!r}")
        n = len(self.upsample_rates)
        if n == 0 or len(self.upsample_kernel_sizes) != n:
            raise ConfigError(f"bigvgan.upsample_kernel_sizes: need one kernel per upsample rate ({n}), "
                              f"got {list(self.upsample_kernel_sizes)}")
        for u, k in zip(self.upsample_rates, self.upsample_kernel_sizes):
            if u <= 0 or k < u or (k - u) % 2:
                raise ConfigError(f"bigvgan.upsample_kernel_sizes: kernel {k} for rate {u} must be >= the rate "
                                  f"with an even difference, so that each stage scales the length exactly")
        if self.upsample_initial_channel // 2 ** n < 1:
            raise ConfigError(f"bigvgan.upsample_initial_channel: {self.upsample_initial_channel} is too small "
                              f"for {n} halvings")
        if self.resblock not in ("1", "2"):
            raise ConfigError(f"bigvgan.resblock: '1' (AMPBlock1) or '2' (AMPBlock2), got {self.resblock!r}")
        if not self.resblock_kernel_sizes or len(self.resblock_kernel_sizes) != len(self.resblock_dilation_sizes):
            raise ConfigError("bigvgan.resblock_dilation_sizes: need one dilation list per resblock kernel")
        if any(k % 2 == 0 or k <= 0 for k in self.resblock_kernel_sizes):
            raise ConfigError(f"bigvgan.resblock_kernel_sizes: kernels must be odd and positive, "
                              f"got {list(self.resblock_kernel_sizes)}")
        if self.activation not in ("snake", "snakebeta"):
            raise ConfigError(f"bigvgan.activation: 'snake' or 'snakebeta', got {self.activation!r}")
        if not 0 <= self.conv_pre_padding <= CONV_PRE_KERNEL // 2:
            raise ConfigError(f"bigvgan.conv_pre_padding: between 0 and 3, got {self.conv_pre_padding}")
        if self.matmul_precision not in MATMUL_PRECISIONS:
            raise ConfigError(f"bigvgan.matmul_precision: one of {sorted(MATMUL_PRECISIONS)}, got {self.matmul_precision!r}")

    @property
    def hop(self) -> int:
        return int(np.prod(self.upsample_rates))

    @property
    def frames_consumed(self) -> int:
        """Mel frames lost at conv_pre (6 in Step's class): output samples = (T - this) * hop."""
        return CONV_PRE_KERNEL - 1 - 2 * self.conv_pre_padding

    def stage_channels(self, i: int) -> int:
        return self.upsample_initial_channel // 2 ** (i + 1)


# ---------------------------------------------------------------------------------------- prompt features


@dataclasses.dataclass(frozen=True)
class CAMPPlusConfig:
    """CAM++ sizes. Defaults are the released `campplus.onnx` (3D-Speaker template, 192-d output)."""

    feat_dim: int = 80
    embedding_size: int = 192
    growth_rate: int = 32
    bn_size: int = 4
    init_channels: int = 128
    m_channels: int = 32  # FCM head width
    num_layers: tuple[int, ...] = (12, 24, 16)  # CAM dense layers per block
    kernel_size: int = 3
    dilations: tuple[int, ...] = (1, 2, 2)
    seg_len: int = 100  # CAM segment pooling length (frames after the stride-2 TDNN)

    def __post_init__(self):
        for name in ("feat_dim", "embedding_size", "growth_rate", "bn_size", "init_channels", "m_channels",
                     "kernel_size", "seg_len"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"campplus.{name}: must be positive, got {getattr(self, name)}")
        if self.feat_dim % 8:
            raise ConfigError(f"campplus.feat_dim: must be a multiple of 8 (three stride-2 stages), "
                              f"got {self.feat_dim}")
        if self.kernel_size % 2 == 0:
            raise ConfigError(f"campplus.kernel_size: must be odd ('same' padding), got {self.kernel_size}")
        if self.bn_size * self.growth_rate % 2:
            raise ConfigError("campplus.bn_size: bn_size * growth_rate must be even (CAM reduction 2)")
        if len(self.num_layers) != len(self.dilations) or not self.num_layers:
            raise ConfigError(f"campplus.dilations: need one per block ({len(self.num_layers)} blocks), "
                              f"got {len(self.dilations)}")
        if any(n <= 0 for n in self.num_layers) or any(d <= 0 for d in self.dilations):
            raise ConfigError("campplus.num_layers: layer counts and dilations must be positive")

    @property
    def bn_channels(self) -> int:
        return self.bn_size * self.growth_rate

    def block_channels(self) -> list[tuple[int, int]]:
        """(input channels, output channels after the transit layer) of each dense block."""
        out, c = [], self.init_channels
        for n in self.num_layers:
            grown = c + n * self.growth_rate
            out.append((c, grown // 2))
            c = grown // 2
        return out

    @property
    def out_channels(self) -> int:
        return self.block_channels()[-1][1]


@dataclasses.dataclass(frozen=True)
class MelConfig:
    """`mel_conf` of cosyvoice.yaml; the defaults are the released values."""

    num_mels: int = 80
    n_fft: int = 1920
    hop_size: int = 480
    win_size: int = 1920
    sampling_rate: int = 24000
    fmin: float = 0.0
    fmax: float = 8000.0
    log_floor: float = 1e-5  # ln(max(x, floor))
    magnitude_eps: float = 1e-9  # sqrt(re² + im² + eps)

    def __post_init__(self):
        for name in ("num_mels", "n_fft", "hop_size", "win_size", "sampling_rate"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"mel.{name}: must be positive, got {getattr(self, name)}")
        if self.win_size > self.n_fft:
            raise ConfigError(f"mel.win_size: {self.win_size} is larger than n_fft {self.n_fft}")
        if (self.n_fft - self.hop_size) % 2:
            raise ConfigError(f"mel.hop_size: n_fft - hop_size must be even (symmetric reflect pad), "
                              f"got {self.n_fft} - {self.hop_size}")
        if not 0 <= self.fmin < self.fmax <= self.sampling_rate / 2:
            raise ConfigError(f"mel.fmax: need 0 <= fmin < fmax <= Nyquist, got {self.fmin}..{self.fmax}")
        if self.log_floor <= 0:
            raise ConfigError(f"mel.log_floor: must be positive, got {self.log_floor}")

    @property
    def pad(self) -> int:
        return (self.n_fft - self.hop_size) // 2


# ---------------------------------------------------------------------------------------- token2wav


@dataclasses.dataclass(frozen=True)
class Token2WavConfig:
    """The `CosyVoice(...)` / `CosyVoice_stream_impl_` settings (cli/cosyvoice.py defaults)."""

    vocoder: str = "hift"  # the released cosyvoice.yaml ships HiFT
    n_timesteps: int = 10
    chunk_size_list: tuple[int, ...] = (15, 24, 48)  # streaming chunks, in pair frames (0.6, 0.96, 1.92 s)
    mel_cache_len: int = 8  # streaming vocoder overlap, mel frames
    estimator_left_context: int = 96  # streaming DiT attention keeps this many newest frames (+ the prompt)
    max_prompt_stretch: float = 4.0  # see the module docstring

    def __post_init__(self):
        object.__setattr__(self, "chunk_size_list", tuple(int(c) for c in self.chunk_size_list))
        if self.vocoder not in VOCODERS:
            raise ConfigError(f"token2wav.vocoder: one of {VOCODERS}, got {self.vocoder!r}")
        if not isinstance(self.n_timesteps, int) or self.n_timesteps <= 0:
            raise ConfigError(f"token2wav.n_timesteps: must be a positive integer, got {self.n_timesteps!r}")
        if not self.chunk_size_list or any(c <= 0 or c % 3 for c in self.chunk_size_list):
            raise ConfigError(f"token2wav.chunk_size_list: positive multiples of 3 pair frames (whole token "
                              f"groups), got {list(self.chunk_size_list)}")
        if self.mel_cache_len <= 2 * BIGVGAN_CONTEXT or self.mel_cache_len % 2:
            raise ConfigError(f"token2wav.mel_cache_len: an even number > {2 * BIGVGAN_CONTEXT}, "
                              f"got {self.mel_cache_len}")
        if min(self.chunk_size_list) * 2 < self.mel_cache_len:
            # a chunk's speech must cover the vocoder overlap (the reference fails on shorter ones)
            raise ConfigError(f"token2wav.chunk_size_list: every chunk needs >= {self.mel_cache_len} mel frames "
                              f"(mel_cache_len), i.e. >= {self.mel_cache_len // 2} pair frames, got "
                              f"{list(self.chunk_size_list)}")
        if self.estimator_left_context < 0:
            raise ConfigError(f"token2wav.estimator_left_context: must be >= 0, got {self.estimator_left_context}")
        if not self.max_prompt_stretch >= 1:
            raise ConfigError(f"token2wav.max_prompt_stretch: must be >= 1, got {self.max_prompt_stretch}")
