"""CAM++ speaker embedding of the prompt (architecture.md §3.3.3-3.3.4, §5 item 4).

Front end (`campplus_fbank`): 16 kHz wave -> Kaldi fbank with the *Povey* window (80 bins, 25/10 ms,
snip edges, DC removal, pre-emphasis 0.97, 512-point power spectrum, Kaldi mel 20-8000 Hz, log with a
float32-eps floor), the samples **not** scaled by 32768, then the mean over time subtracted (CMN).
The fbank is the tokenizer's (`editx_jax.audio.features.kaldi_fbank`) set by `fbank_config`.

Network (`CAMPPlus`, 3D-Speaker's CAM++ in inference form), on feats [B, T, F]:

* FCM head, 2-D over (freq, time) in NHWC [B, F, T, C]: conv3x3 + ReLU, two stages of two residual
  blocks (the first of each with stride 2 in frequency and a 1x1 shortcut), a conv3x3 with stride 2 in
  frequency + ReLU, flattened to [B, T, m_channels·F/8] (channel-major, like torch's reshape).
* TDNN conv k5, stride 2 in time (halves T) + ReLU.
* Three CAM dense blocks: each layer is BN-ReLU-conv1x1-ReLU then a CAM layer (a local dilated conv
  gated by sigmoid(conv1x1(ReLU(conv1x1(mean_T(x) + segment_mean_100(x)))))), its output concatenated
  onto the input; each block is followed by a transit layer BN-ReLU-conv1x1 halving the channels.
* BN-ReLU (`frame_features`), statistics pooling (mean and unbiased std over time) and a dense
  conv1x1 + BN(affine=False) -> embedding.

Every BatchNorm is in inference form: a BN that follows a conv is folded into that conv's kernel and
bias; a BN that precedes a ReLU (after a concatenation) is a per-channel `scale`, `bias`. The
converters (`editx_jax.convert.campplus`) do the folding, from a torch state_dict or the partly
BN-folded `campplus.onnx`.

Batches hold equal-length utterances: the time means have no mask (the official pipeline runs one
utterance at a time).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from editx_jax.audio.features import FbankConfig, FrontendError, kaldi_fbank
from editx_jax.audio.io import resample
from editx_jax.config.decoder import CAMPPlusConfig

_HIGHEST = jax.lax.Precision.HIGHEST
SAMPLE_RATE = 16000


class SpeakerEmbeddingError(ValueError):
    """Bad input to the CAM++ front end or network (too short, wrong shape); the message says what."""


# --------------------------------------------------------------------------------- fbank front end


def fbank_config(n_mels: int = 80) -> FbankConfig:
    """The CAM++ fbank as a Kaldi fbank setting: Povey window, samples not scaled by 32768, no LFR
    (`torchaudio.compliance.kaldi.fbank(wave, num_mel_bins=n_mels, dither=0, sample_frequency=16000)`)."""
    return FbankConfig(sample_rate=SAMPLE_RATE, n_mels=n_mels, window="povey", upscale_samples=False,
                       lfr_m=1, lfr_n=1)


def campplus_fbank(wave16k, n_mels: int = 80) -> jax.Array:
    """The CAM++ input: fbank minus its mean over time (per utterance), [..., N] -> [..., T, n_mels],
    T = 1 + (N - 400)//160."""
    try:
        fbank = kaldi_fbank(wave16k, fbank_config(n_mels))
    except FrontendError as e:
        raise SpeakerEmbeddingError(f"CAM++ {e}") from None
    return fbank - jnp.mean(fbank, axis=-2, keepdims=True)


# ------------------------------------------------------------------------------------------ layers


class Affine(nn.Module):
    """An inference-form BatchNorm that is not next to a conv: x * scale + bias per channel."""

    features: int

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (self.features,))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        return x * scale + bias


def _conv(features, kernel, *, name, strides=1, padding=0, dilation=1, bias=True):
    """A conv whose padding is given per spatial axis as in torch (symmetric)."""
    kernel = tuple(kernel) if isinstance(kernel, (tuple, list)) else (kernel,)
    ndim = len(kernel)
    strides = tuple(strides) if isinstance(strides, (tuple, list)) else (strides,) * ndim
    padding = tuple(padding) if isinstance(padding, (tuple, list)) else (padding,) * ndim
    return nn.Conv(features, kernel, strides=strides, padding=[(p, p) for p in padding],
                   kernel_dilation=dilation, use_bias=bias, precision=_HIGHEST, name=name)


class ResBlock(nn.Module):
    """FCM BasicResBlock (NHWC over [freq, time]); conv+BN pairs folded."""

    channels: int
    stride: int  # in frequency

    @nn.compact
    def __call__(self, x):
        y = nn.relu(_conv(self.channels, (3, 3), strides=(self.stride, 1), padding=1, name="conv1")(x))
        y = _conv(self.channels, (3, 3), padding=1, name="conv2")(y)
        if self.stride != 1 or x.shape[-1] != self.channels:
            x = _conv(self.channels, (1, 1), strides=(self.stride, 1), name="shortcut")(x)
        return nn.relu(y + x)


class ResStage(nn.Module):
    """Two residual blocks, the first with stride 2 in frequency (children `0`, `1`)."""

    channels: int

    @nn.compact
    def __call__(self, x):
        x = ResBlock(self.channels, 2, name="0")(x)
        return ResBlock(self.channels, 1, name="1")(x)


class FCMHead(nn.Module):
    """[B, T, F] -> [B, T, m_channels·F/8]."""

    config: CAMPPlusConfig

    @nn.compact
    def __call__(self, feats):
        m = self.config.m_channels
        x = jnp.swapaxes(feats, 1, 2)[..., None]  # [B, F, T, 1]
        x = nn.relu(_conv(m, (3, 3), padding=1, name="conv1")(x))
        x = ResStage(m, name="layer1")(x)
        x = ResStage(m, name="layer2")(x)
        x = nn.relu(_conv(m, (3, 3), strides=(2, 1), padding=1, name="conv2")(x))  # [B, F/8, T, m]
        b, f, t, c = x.shape
        return jnp.transpose(x, (0, 2, 3, 1)).reshape(b, t, c * f)  # torch's (C, F) flattening


def segment_mean(x, seg_len: int):
    """Mean of each `seg_len`-frame segment (the last one partial: divided by its true length, like
    avg_pool1d with ceil_mode), repeated back over its frames. x [B, T, C]."""
    t = x.shape[1]
    n_seg = -(-t // seg_len)
    padded = jnp.pad(x, ((0, 0), (0, n_seg * seg_len - t), (0, 0)))
    sums = padded.reshape(x.shape[0], n_seg, seg_len, x.shape[2]).sum(axis=2)
    counts = np.minimum(seg_len, t - seg_len * np.arange(n_seg)).astype(np.float32)
    means = sums / counts[None, :, None]
    return jnp.repeat(means, seg_len, axis=1)[:, :t]


class CAMLayer(nn.Module):
    features: int
    kernel_size: int
    dilation: int
    seg_len: int

    @nn.compact
    def __call__(self, x):
        pad = (self.kernel_size - 1) // 2 * self.dilation
        local = _conv(self.features, self.kernel_size, padding=pad, dilation=self.dilation, bias=False,
                      name="linear_local")(x)
        context = jnp.mean(x, axis=1, keepdims=True) + segment_mean(x, self.seg_len)
        context = nn.relu(_conv(x.shape[-1] // 2, 1, name="linear1")(context))
        gate = nn.sigmoid(_conv(self.features, 1, name="linear2")(context))
        return local * gate


class DenseLayer(nn.Module):
    """One CAM dense TDNN layer: BN-ReLU-conv1x1 (+ folded BN)-ReLU-CAM."""

    config: CAMPPlusConfig
    dilation: int

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        y = nn.relu(Affine(x.shape[-1], name="nonlinear1")(x))
        y = nn.relu(_conv(cfg.bn_channels, 1, name="linear1")(y))
        return CAMLayer(cfg.growth_rate, cfg.kernel_size, self.dilation, cfg.seg_len, name="cam_layer")(y)


class TransitLayer(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x):
        y = nn.relu(Affine(x.shape[-1], name="nonlinear")(x))
        return _conv(self.features, 1, bias=False, name="linear")(y)


def stats_pool(x):
    """[B, T, C] -> [B, 2C]: mean and unbiased standard deviation over time."""
    mean = jnp.mean(x, axis=1)
    var = jnp.sum(jnp.square(x - mean[:, None]), axis=1) / (x.shape[1] - 1)
    return jnp.concatenate([mean, jnp.sqrt(var)], axis=-1)


class DenseBlock(nn.Module):
    """`num_layers` CAM dense layers (children `tdnnd1`...), each output concatenated onto its input."""

    config: CAMPPlusConfig
    num_layers: int
    dilation: int

    @nn.compact
    def __call__(self, x):
        for i in range(1, self.num_layers + 1):
            x = jnp.concatenate([x, DenseLayer(self.config, self.dilation, name=f"tdnnd{i}")(x)], axis=-1)
        return x


class XVector(nn.Module):
    """[B, T, m_channels·F/8] head output -> [B, E]; sows the pre-pooling frames."""

    config: CAMPPlusConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        x = nn.relu(_conv(cfg.init_channels, 5, strides=2, padding=2, name="tdnn")(x))
        for b, ((_, out), n, d) in enumerate(zip(cfg.block_channels(), cfg.num_layers, cfg.dilations), 1):
            x = DenseBlock(cfg, n, d, name=f"block{b}")(x)
            x = TransitLayer(out, name=f"transit{b}")(x)
        x = nn.relu(Affine(x.shape[-1], name="out_nonlinear")(x))
        self.sow("intermediates", "frame_features", x)
        pooled = stats_pool(x)[:, None, :]  # [B, 1, 2C]: the dense layer is a conv1x1 in torch
        return _conv(cfg.embedding_size, 1, name="dense")(pooled)[:, 0]


class CAMPPlus(nn.Module):
    """feats [B, T, feat_dim] (mean-normalised fbank) -> embeddings [B, embedding_size].

    Params mirror the torch module names: `head/layer1/0/conv1`, `xvector/block2/tdnnd7/cam_layer/linear1`.
    The frames before pooling ([B, ceil(T/2), C]) are sown as `intermediates/xvector/frame_features`.
    """

    config: CAMPPlusConfig

    @nn.compact
    def __call__(self, feats):
        cfg = self.config
        if feats.ndim != 3 or feats.shape[-1] != cfg.feat_dim or feats.shape[1] < 3:
            # < 3 frames leaves one frame after the stride-2 TDNN: the unbiased std is undefined
            raise SpeakerEmbeddingError(f"CAM++ expects feats [B, T >= 3, {cfg.feat_dim}], got shape "
                                        f"{tuple(feats.shape)}")
        return XVector(cfg, name="xvector")(FCMHead(cfg, name="head")(feats))


@functools.lru_cache(maxsize=8)
def abstract_params(config: CAMPPlusConfig) -> dict:
    """Shapes and dtypes of the params tree, without allocating it (for the converters)."""
    feats = jax.ShapeDtypeStruct((1, 8, config.feat_dim), jnp.float32)
    return jax.eval_shape(lambda k, f: CAMPPlus(config).init(k, f)["params"], jax.random.PRNGKey(0), feats)


@functools.partial(jax.jit, static_argnames=("config",))
def _embed(params, feats, config):
    emb, state = CAMPPlus(config).apply({"params": params}, feats, mutable=["intermediates"])
    return emb, state["intermediates"]["xvector"]["frame_features"][0]


def embed_feats(params, feats, config: CAMPPlusConfig = CAMPPlusConfig(), return_frames: bool = False):
    """CAM++ on mean-normalised fbank feats [B, T, F] -> [B, E] (and frame features [B, T', C])."""
    feats = jnp.asarray(feats, jnp.float32)
    if feats.ndim != 3 or feats.shape[-1] != config.feat_dim or feats.shape[1] < 3:
        raise SpeakerEmbeddingError(f"CAM++ expects feats [B, T >= 3, {config.feat_dim}], got shape "
                                    f"{tuple(feats.shape)}")
    emb, frames = _embed(params, feats, config)
    return (emb, frames) if return_frames else emb


def speaker_embedding(params, wave, sr: int, config: CAMPPlusConfig = CAMPPlusConfig()) -> jax.Array:
    """The prompt's x-vector as `extract_spk_embedding` computes it: resample to 16 kHz (torchaudio's
    sinc resampler), CAM++ fbank with CMN, CAM++. wave [N] -> [E]; [B, N] (equal lengths) -> [B, E]."""

    wave = np.asarray(wave, np.float32)
    if wave.ndim not in (1, 2) or wave.shape[-1] == 0:
        raise SpeakerEmbeddingError(f"speaker_embedding expects a wave [N] or [B, N], got shape {wave.shape}")
    if not np.all(np.isfinite(wave)):
        raise SpeakerEmbeddingError("speaker_embedding: the wave has NaN or Inf samples")
    wave16k = resample(wave, int(sr), SAMPLE_RATE)
    feats = campplus_fbank(wave16k, config.feat_dim)
    emb = embed_feats(params, feats[None] if wave.ndim == 1 else feats, config)
    return emb[0] if wave.ndim == 1 else emb
