"""HiFT, the shipped vocoder: 80-bin 24 kHz mel (B, 80, T) -> waveform (B, 480*T) (architecture.md §3.7.1).

Three parts, all in one Linen module `HiFTGenerator` (params named after the torch modules):

1. `f0_predictor` (ConvRNNF0Predictor): 5 x [Conv1d k3 + ELU], Linear -> |.| = f0 in Hz per mel frame.
2. The neural source filter (`m_source`, SineGen2 + SourceModuleHnNSF2): f0 is held for 480 samples,
   9 harmonics are integrated into phases at frame rate and interpolated back to samples, unvoiced
   samples get noise, and Linear(9 -> 1) + tanh mixes them into one excitation `source` (B, 480*T).
   Its random draws (initial phases `phase_rand`, `sine_noise`) are explicit inputs (`NSFNoise`), drawn
   from a PRNG key by default. The reference also draws a third tensor (the source module's noise
   branch) that nothing reads, so it is not an input here.
3. `decode`: conv_pre, three stages of [leaky_relu(0.1), ConvTranspose1d, + source branch from the
   source's STFT, mean of 3 Snake resblocks], leaky_relu(0.01), conv_post -> log-magnitude and phase of a
   16-point STFT, inverted with a periodic-Hann iSTFT (hop 4) and clamped to +-0.99.

Lengths (Appendix A): T mel frames -> 8T -> 40T -> 120T (+1 after the reflection pad) -> 480T samples.
Data inside is NWC (batch, time, channels); the public function `hift_inference` takes the mel
channels-first like the flow emits it.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from editx_jax.config.decoder import HiFTConfig
from editx_jax.layers.activations import Snake
from editx_jax.layers.conv import PRECISIONS, Conv1d, ConvTranspose1d, reflect_pad_time


class HiFTInputError(ValueError):
    """HiFT was given a mel or noise of the wrong shape."""


class NSFNoise(NamedTuple):
    """The NSF's random draws. phase_rand: U[0,1) (B, n_sines); sine_noise: N(0,1) (B, 480*T, n_sines)."""

    phase_rand: jax.Array
    sine_noise: jax.Array


def draw_nsf_noise(key: jax.Array, batch: int, frames: int, config: HiFTConfig) -> NSFNoise:
    k_phase, k_noise = jax.random.split(key)
    return NSFNoise(jax.random.uniform(k_phase, (batch, config.n_sines), jnp.float32),
                    jax.random.normal(k_noise, (batch, frames * config.hop, config.n_sines), jnp.float32))


# ------------------------------------------------------------------------------------ NSF maths


def _linear_resample_plan(in_len: int, out_len: int, scale: float):
    """Indices and weights of torch F.interpolate(mode='linear', align_corners=False, scale_factor=s).

    torch maps output sample j to src = max(r*(j + 0.5) - 0.5, 0) with r = float32(1/s) and blends
    x[floor(src)] and its right neighbour (clamped to the last sample). Computed in numpy float32 at
    trace time, in torch's operation order, so the weights match bit for bit.
    """
    r = np.float32(1.0 / scale)
    src = np.maximum(r * (np.arange(out_len, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5),
                     np.float32(0))
    i0 = np.floor(src).astype(np.int32)
    lam1 = np.clip(src - i0.astype(np.float32), 0, 1).astype(np.float32)
    i1 = np.minimum(i0 + 1, in_len - 1)
    return i0, i1, np.float32(1) - lam1, lam1


def _linear_resample(x: jax.Array, out_len: int, scale: float) -> jax.Array:
    """torch linear interpolation along axis 1 of (B, L, C)."""
    i0, i1, w0, w1 = _linear_resample_plan(x.shape[1], out_len, scale)
    return x[:, i0] * w0[:, None] + x[:, i1] * w1[:, None]


def _accurate_cumsum(x: jax.Array, axis: int = 1) -> jax.Array:
    """Cumulative sum carried in a float32 (sum, error) pair and rounded once per output.

    torch's CPU cumsum accumulates float32 in double; the NSF multiplies this sum by 2*pi*480, so a
    plain float32 running sum would put several ulps of phase error on every later sample.
    """
    xs = jnp.moveaxis(x, axis, 0)

    def step(carry, v):
        s, e = carry
        t = s + v
        bv = t - s  # two-sum: the exact rounding error of s + v is (s - (t - bv)) + (v - bv)
        err = (s - (t - bv)) + (v - bv)
        e = e + err
        return (t, e), t + e

    zero = jnp.zeros_like(xs[0])
    _, out = jax.lax.scan(step, (zero, zero), xs)
    return jnp.moveaxis(out, 0, axis)


def sine_excitation(f0: jax.Array, noise: NSFNoise, config: HiFTConfig) -> jax.Array:
    """SineGen2: frame-rate f0 (B, T) -> harmonic excitation (B, 480*T, n_sines), voiced/unvoiced mixed."""
    cfg = config
    b, t = f0.shape
    hop = cfg.hop
    f0_up = jnp.repeat(f0, hop, axis=1)[..., None]  # nearest upsampling: each frame held for `hop` samples
    harmonics = jnp.arange(1, cfg.n_sines + 1, dtype=jnp.float32)
    rad = jnp.mod(f0_up * harmonics / jnp.float32(cfg.sampling_rate), 1.0)  # cycles per sample
    # A random start phase for the overtones, added at sample 0. The decimation below never reads
    # sample 0, so in this reference it has no effect; kept for fidelity.
    phase_rand = noise.phase_rand.astype(jnp.float32).at[:, 0].set(0.0)
    rad = rad.at[:, 0, :].add(phase_rand)
    # integrate at frame rate: decimate by hop, sum, scale back to samples, interpolate up again
    rad_frames = _linear_resample(rad, t, 1.0 / hop)
    phase = _accurate_cumsum(rad_frames, axis=1) * 2 * jnp.float32(math.pi)
    phase = _linear_resample(phase * jnp.float32(hop), t * hop, float(hop))
    sines = jnp.sin(phase) * jnp.float32(cfg.nsf_alpha)
    uv = (f0_up > cfg.nsf_voiced_threshold).astype(jnp.float32)
    noise_amp = uv * jnp.float32(cfg.nsf_sigma) + (1 - uv) * jnp.float32(cfg.nsf_alpha) / 3
    return sines * uv + noise_amp * noise.sine_noise.astype(jnp.float32)


# --------------------------------------------------------------------------------- STFT / iSTFT


def hann_periodic(n: int) -> np.ndarray:
    """scipy get_window('hann', n, fftbins=True), float64."""
    return 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / n)


@functools.lru_cache(maxsize=None)
def _dft_mats(n_fft: int):
    """Forward (window folded in) and inverse real-DFT matrices, float64 -> float32."""
    n = np.arange(n_fft)[:, None]
    k = np.arange(n_fft // 2 + 1)[None, :]
    ang = 2 * np.pi * n * k / n_fft
    win = hann_periodic(n_fft)[:, None]
    fwd_re, fwd_im = win * np.cos(ang), -win * np.sin(ang)  # (n_fft, bins)
    # c2r: bins 1..N/2-1 count twice (Hermitian partners); imag parts of DC and Nyquist are ignored
    weight = np.full(n_fft // 2 + 1, 2.0)
    weight[0] = weight[-1] = 1.0
    inv_re = (weight[:, None] * np.cos(ang.T)) / n_fft  # (bins, n_fft)
    inv_im = -(weight[:, None] * np.sin(ang.T)) / n_fft
    return tuple(m.astype(np.float32) for m in (fwd_re, fwd_im, inv_re, inv_im))


def stft(x: jax.Array, n_fft: int, hop: int, precision: str = "highest"):
    """torch.stft(center=True, reflect, periodic Hann, win = n_fft) of (B, L) -> real, imag (B, L//hop+1, bins)."""
    pad = n_fft // 2
    xp = jnp.pad(x, ((0, 0), (pad, pad)), mode="reflect")
    n_frames = 1 + (xp.shape[1] - n_fft) // hop
    idx = hop * np.arange(n_frames)[:, None] + np.arange(n_fft)[None, :]
    frames = xp[:, idx]  # (B, F, n_fft)
    fwd_re, fwd_im, _, _ = _dft_mats(n_fft)
    p = PRECISIONS[precision]
    return jnp.matmul(frames, fwd_re, precision=p), jnp.matmul(frames, fwd_im, precision=p)


def istft(real: jax.Array, imag: jax.Array, n_fft: int, hop: int, precision: str = "highest") -> jax.Array:
    """torch.istft(center=True, periodic Hann, win = n_fft) of (B, F, bins) -> (B, hop*(F-1)).

    Inverse real DFT per frame, window, overlap-add, divide by the overlap-added squared window, then
    drop n_fft/2 samples at each end.
    """
    _, _, inv_re, inv_im = _dft_mats(n_fft)
    p = PRECISIONS[precision]
    win = hann_periodic(n_fft).astype(np.float32)
    frames = (jnp.matmul(real, inv_re, precision=p) + jnp.matmul(imag, inv_im, precision=p)) * win
    b, f, _ = frames.shape
    parts = n_fft // hop
    # overlap-add: frame j covers hop-blocks j .. j+parts-1; shift each block slice and sum
    out = sum(jnp.pad(frames[:, :, c * hop:(c + 1) * hop], ((0, 0), (c, parts - 1 - c), (0, 0)))
              for c in range(parts))
    out = out.reshape(b, (f + parts - 1) * hop)
    envelope = np.zeros((f + parts - 1) * hop)
    for j in range(f):
        envelope[j * hop:j * hop + n_fft] += hann_periodic(n_fft) ** 2
    start, stop = n_fft // 2, out.shape[1] - n_fft // 2
    envelope = envelope[start:stop]
    if envelope.min() < 1e-11:
        raise HiFTInputError("istft: the window overlap-add is zero somewhere (NOLA fails)")
    return out[:, start:stop] / envelope.astype(np.float32)


# ---------------------------------------------------------------------------------------- modules


class ResBlock(nn.Module):
    """HiFT ResBlock: per dilation d, x += conv2(snake2(conv1_d(snake1(x))))."""

    channels: int
    kernel_size: int
    dilations: tuple[int, ...]
    precision: str = "highest"

    @nn.compact
    def __call__(self, x):
        k = self.kernel_size
        for j, d in enumerate(self.dilations):
            h = Snake(name=f"activations1_{j}")(x)
            h = Conv1d(self.channels, k, padding=d * (k - 1) // 2, dilation=d, precision=self.precision,
                       name=f"convs1_{j}")(h)
            h = Snake(name=f"activations2_{j}")(h)
            h = Conv1d(self.channels, k, padding=(k - 1) // 2, precision=self.precision, name=f"convs2_{j}")(h)
            x = x + h
        return x


class F0Predictor(nn.Module):
    """ConvRNNF0Predictor: (B, T, n_mels) -> f0 (B, T) in Hz."""

    config: HiFTConfig

    @nn.compact
    def __call__(self, mel):
        cfg = self.config
        h = mel
        for i in range(cfg.f0_num_convs):
            h = Conv1d(cfg.f0_cond_channels, 3, padding=1, precision=cfg.matmul_precision, name=f"condnet_{i}")(h)
            h = jax.nn.elu(h)
        f0 = nn.Dense(1, precision=PRECISIONS[cfg.matmul_precision], name="classifier")(h)
        return jnp.abs(f0[..., 0])


class SourceModule(nn.Module):
    """SourceModuleHnNSF2: tanh(Linear(n_sines -> 1)(sine excitation)) -> (B, L)."""

    config: HiFTConfig

    @nn.compact
    def __call__(self, f0, noise: NSFNoise):
        sines = sine_excitation(f0, noise, self.config)
        merged = nn.Dense(1, precision=PRECISIONS[self.config.matmul_precision], name="l_linear")(sines)
        return jnp.tanh(merged[..., 0])


class HiFTGenerator(nn.Module):
    """The HiFT vocoder on NWC mel (B, T, n_mels); see the module docstring."""

    config: HiFTConfig

    def setup(self):
        cfg = self.config
        prec = cfg.matmul_precision
        self.f0_predictor = F0Predictor(cfg)
        self.m_source = SourceModule(cfg)
        self.conv_pre = Conv1d(cfg.base_channels, 7, padding=3, precision=prec)
        ups, downs, source_blocks, blocks = [], [], [], []
        for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes)):
            ch = cfg.stage_channels(i)
            ups.append(ConvTranspose1d(ch, k, stride=u, padding=(k - u) // 2, precision=prec))
            r = cfg.source_down_rates[i]
            downs.append(Conv1d(ch, 1, precision=prec) if r == 1 else
                         Conv1d(ch, 2 * r, stride=r, padding=r // 2, precision=prec))
            source_blocks.append(ResBlock(ch, cfg.source_resblock_kernel_sizes[i],
                                          cfg.source_resblock_dilation_sizes[i], prec))
            for kk, dd in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes):
                blocks.append(ResBlock(ch, kk, dd, prec))
        self.ups, self.source_downs, self.source_resblocks, self.resblocks = ups, downs, source_blocks, blocks
        self.conv_post = Conv1d(cfg.istft_n_fft + 2, 7, padding=3, precision=prec)

    def predict_f0(self, mel):
        return self.f0_predictor(mel)

    def source(self, f0, noise: NSFNoise):
        return self.m_source(f0, noise)

    def decode(self, mel, source):
        """mel (B, T, n_mels) and source (B, hop*T) -> waveform (B, hop*T)."""
        cfg = self.config
        real, imag = stft(source, cfg.istft_n_fft, cfg.istft_hop_len, cfg.matmul_precision)
        s_stft = jnp.concatenate([real, imag], axis=-1)  # (B, F, n_fft + 2)
        x = self.conv_pre(mel)
        n_stages, n_kernels = len(cfg.upsample_rates), len(cfg.resblock_kernel_sizes)
        for i in range(n_stages):
            x = jax.nn.leaky_relu(x, cfg.lrelu_slope)
            x = self.ups[i](x)
            if i == n_stages - 1:
                x = reflect_pad_time(x, 1, 0)  # 120T -> 120T + 1 = the STFT frame count
            x = x + self.source_resblocks[i](self.source_downs[i](s_stft))
            x = sum(self.resblocks[i * n_kernels + j](x) for j in range(n_kernels)) / n_kernels
        x = jax.nn.leaky_relu(x, 0.01)  # torch's default slope here, not lrelu_slope
        x = self.conv_post(x)
        magnitude = jnp.minimum(jnp.exp(x[..., :cfg.n_bins]), 1e2)
        phase = jnp.sin(x[..., cfg.n_bins:])
        wave = istft(magnitude * jnp.cos(phase), magnitude * jnp.sin(phase), cfg.istft_n_fft,
                     cfg.istft_hop_len, cfg.matmul_precision)
        return jnp.clip(wave, -cfg.audio_limit, cfg.audio_limit)

    def __call__(self, mel, noise: NSFNoise):
        """mel (B, T, n_mels) -> (speech (B, hop*T), source (B, hop*T), f0 (B, T))."""
        f0 = self.predict_f0(mel)
        source = self.source(f0, noise)
        return self.decode(mel, source), source, f0


# ------------------------------------------------------------------------------------ functions


class HiFTOutput(NamedTuple):
    speech: jax.Array  # (B, hop*T), 24 kHz
    source: jax.Array  # (B, hop*T), the NSF excitation
    f0: jax.Array  # (B, T), Hz


@functools.partial(jax.jit, static_argnames=("config", "frames"))
def init_params(key: jax.Array, config: HiFTConfig = HiFTConfig(), frames: int = 4) -> dict:
    """Random params (for tests and training from scratch); real ones come from the converter."""
    mel = jnp.zeros((1, frames, config.in_channels), jnp.float32)
    noise = NSFNoise(jnp.zeros((1, config.n_sines)), jnp.zeros((1, frames * config.hop, config.n_sines)))
    return HiFTGenerator(config).init(key, mel, noise)["params"]


@functools.lru_cache(maxsize=8)
def abstract_params(config: HiFTConfig = HiFTConfig()) -> dict:
    """Shapes and dtypes of the params tree, without allocating it (for the converter; cached, since
    tracing the unrolled blocks takes seconds). Treat the result as read-only."""
    return jax.eval_shape(functools.partial(init_params, config=config), jax.random.PRNGKey(0))


def _check_mel(mel, config: HiFTConfig):
    if mel.ndim != 3 or mel.shape[1] != config.in_channels or mel.shape[2] < 1:
        raise HiFTInputError(f"mel must be (batch, {config.in_channels}, frames) with frames >= 1, "
                             f"got shape {tuple(mel.shape)}")


@functools.partial(jax.jit, static_argnames=("config",))
def _inference(params, mel_bct, noise, config):
    mel = jnp.swapaxes(mel_bct.astype(jnp.float32), 1, 2)
    return HiFTGenerator(config).apply({"params": params}, mel, noise)


def hift_inference(params: dict, mel, config: HiFTConfig = HiFTConfig(), *, key: jax.Array | None = None,
                   noise: NSFNoise | None = None) -> HiFTOutput:
    """HiFTGenerator.inference: mel (B, n_mels, T) channels-first -> speech, source, f0.

    The NSF draws come from `noise` (for parity with a recorded reference) or else from `key`.
    """
    mel = jnp.asarray(mel)
    _check_mel(mel, config)
    b, _, t = mel.shape
    if noise is None:
        if key is None:
            raise HiFTInputError("hift_inference needs key= (a PRNG key) or noise= (explicit NSF draws)")
        noise = draw_nsf_noise(key, b, t, config)
    noise = NSFNoise(jnp.asarray(noise.phase_rand, jnp.float32), jnp.asarray(noise.sine_noise, jnp.float32))
    if noise.phase_rand.shape != (b, config.n_sines) or noise.sine_noise.shape != (b, t * config.hop, config.n_sines):
        raise HiFTInputError(f"noise must be phase_rand {(b, config.n_sines)} and sine_noise "
                             f"{(b, t * config.hop, config.n_sines)}, got {noise.phase_rand.shape} and "
                             f"{noise.sine_noise.shape}")
    return HiFTOutput(*_inference(params, mel, noise, config))


@functools.partial(jax.jit, static_argnames=("config",))
def _decode(params, mel_bct, source, config):
    mel = jnp.swapaxes(mel_bct.astype(jnp.float32), 1, 2)
    return HiFTGenerator(config).apply({"params": params}, mel, source, method=HiFTGenerator.decode)


def hift_decode(params: dict, mel, source, config: HiFTConfig = HiFTConfig()) -> jax.Array:
    """The decoder alone: mel (B, n_mels, T) and a given source (B, hop*T) -> speech (B, hop*T)."""
    mel, source = jnp.asarray(mel), jnp.asarray(source, jnp.float32)
    _check_mel(mel, config)
    if source.shape != (mel.shape[0], mel.shape[2] * config.hop):
        raise HiFTInputError(f"source must be {(mel.shape[0], mel.shape[2] * config.hop)}, got {source.shape}")
    return _decode(params, mel, source, config)


@functools.partial(jax.jit, static_argnames=("config",))
def hift_source(params: dict, mel_bct, noise: NSFNoise, config: HiFTConfig) -> jax.Array:
    """The NSF half alone: mel (B, n_mels, T) and its draws -> the excitation (B, hop*T) that
    `hift_decode` reads (streaming overwrites its start with the previous chunk's, as the reference does)."""
    def run(m, mel, noise):
        return m.source(m.predict_f0(mel), noise)
    return HiFTGenerator(config).apply({"params": params}, jnp.swapaxes(mel_bct, 1, 2), noise, method=run)
