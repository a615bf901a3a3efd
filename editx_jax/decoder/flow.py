"""The flow model `CausalMaskedDiffWithXvec.inference` and its ODE (architecture.md §3.3.2, §3.4, §3.6).

    token pairs (prompt, then target) -> DualCodebookEmbedding -> UpsampleConformerEncoderV2 (x2 in time)
      -> encoder_proj (-> 80) = mu
    speaker x-vector (192) -> L2 normalise -> spk_embed_affine_layer (-> 80) = spks
    prompt mel, nearest-stretched to 2 x prompt pair frames, zero after it = cond
    mel = Euler ODE from noise with the DiT velocity, classifier-free guidance; keep the target part.

Everything is channels-last: mels are (B, frames, 80). The ODE is plain `jnp` (`cosine_t_span`,
`cfg_velocity`, `solve_euler`), jitted over its steps with `lax.fori_loop`.

Randomness: the start noise is an explicit input. Pass `noise` (B, >= frames, 80) to replay a
reference draw, or a PRNG `key` (default key 0): `noise_from_key` draws each frame from its own
fold of the key, so a frame's noise does not depend on the total length, like the reference's fixed
noise buffer whose prefix is reused by every call.

Params tree: `input_embedding/...`, `encoder/...`, `encoder_proj/{kernel,bias}`,
`spk_embed_affine_layer/{kernel,bias}`, `estimator/...` (the DiT; `decoder.estimator.*` in flow.pt).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from editx_jax.config.decoder import FlowConfig
from editx_jax.decoder.dit import DiT, estimator
from editx_jax.decoder.embedding import DualCodebookEmbedding
from editx_jax.decoder.upsample_encoder import UpsampleConformerEncoderV2


class FlowInputError(ValueError):
    """The flow model was given inputs of the wrong shape, dtype or length."""


# ------------------------------------------------------------------------------------------ ODE


def cosine_t_span(n_timesteps: int) -> jax.Array:
    """(n+1,) float32 times 1 - cos(linspace(0, 1, n+1) * pi/2): dense near t = 0, in [0, 1]."""
    lin = jnp.linspace(0.0, 1.0, n_timesteps + 1, dtype=jnp.float32)
    return 1.0 - jnp.cos(lin * 0.5 * jnp.pi)


def cfg_velocity(estimator, x, mask, mu, t, spks, cond, cfg_rate: float):
    """Classifier-free guided velocity (1 + r) v(x | mu, spks, cond) - r v(x | 0, 0, 0).

    Both branches run as one batch [conditional; unconditional] with the same x, mask and t.
    `estimator(x, mask, mu, t, spks, cond)` takes t of shape (batch,).
    """
    b = x.shape[0]
    double = lambda a: jnp.concatenate([a, a], axis=0)  # noqa: E731
    with_zeros = lambda a: jnp.concatenate([a, jnp.zeros_like(a)], axis=0)  # noqa: E731
    v = estimator(double(x), double(mask), with_zeros(mu), jnp.full((2 * b,), t, jnp.float32),
                  with_zeros(spks), with_zeros(cond))
    v_cond, v_uncond = v[:b], v[b:]
    return (1.0 + cfg_rate) * v_cond - cfg_rate * v_uncond


def solve_euler(velocity, x0, t_span):
    """Euler steps x += dt * velocity(x, t) over `t_span`; returns x at t_span[-1].

    As the reference: t is accumulated (t += dt) and the next dt is t_span[k+1] - t, so the times
    the velocity sees carry the same float32 rounding. The last evaluation is at t_span[-2].
    """
    n = t_span.shape[0] - 1

    def step(k, carry):
        x, t, dt = carry
        x = x + dt * velocity(x, t)
        t = t + dt
        dt = t_span[jnp.minimum(k + 2, n)] - t
        return x, t, dt

    x, _, _ = jax.lax.fori_loop(0, n, step, (x0, t_span[0], t_span[1] - t_span[0]))
    return x


def noise_from_key(key, batch: int, frames: int, channels: int, offset=0) -> jax.Array:
    """(batch, frames, channels) standard normal noise of frames offset ... offset + frames - 1; frame
    j comes from fold_in(key, j), so the noise of a frame is the same whatever the total length."""
    per_frame = jax.vmap(lambda j: jax.random.normal(jax.random.fold_in(key, j), (batch, channels)))
    return jnp.swapaxes(per_frame(offset + jnp.arange(frames)), 0, 1)


def stretch_prompt_mel(prompt_feat, frames: int) -> np.ndarray:
    """Nearest-neighbour resize (B, T_in, C) -> (B, frames, C) along time, as `F.interpolate(mode='nearest')`:
    source frame floor(j * scale) with scale = T_in / frames in float32 (architecture.md §3.3.2)."""
    prompt_feat = np.asarray(prompt_feat, np.float32)
    t_in = prompt_feat.shape[1]
    if t_in == frames:
        return prompt_feat
    scale = np.float32(t_in) / np.float32(frames)
    src = np.floor(np.arange(frames, dtype=np.float32) * scale).astype(np.int64)
    return prompt_feat[:, np.minimum(src, t_in - 1)]


# ------------------------------------------------------------------------------------------ model


class FlowModel(nn.Module):
    """The flow's layers. `encode` gives (mu, spks); `estimate` is the DiT velocity; `__call__` is for init."""

    config: FlowConfig = FlowConfig()

    def setup(self):
        cfg = self.config
        self.input_embedding = DualCodebookEmbedding(cfg.embedding)
        self.encoder = UpsampleConformerEncoderV2(cfg.encoder)
        self.encoder_proj = nn.Dense(cfg.output_size)
        self.spk_embed_affine_layer = nn.Dense(cfg.output_size)
        self.estimator = DiT(cfg.estimator)

    def encode(self, pairs, embedding):
        """pairs (B, L, 2) int, x-vectors (B, 192) -> mu (B, 2L, 80), spks (B, 80)."""
        # F.normalize: x / max(||x||_2, 1e-12)
        norm = jnp.sqrt(jnp.sum(jnp.square(embedding), axis=1, keepdims=True))
        spks = self.spk_embed_affine_layer(embedding / jnp.maximum(norm, 1e-12))
        h, _ = self.encoder(self.input_embedding(pairs))  # all frames valid: the mask is all ones
        return self.encoder_proj(h), spks

    def estimate(self, x, mask, mu, t, spks, cond):
        return self.estimator(x, mask, mu, t, spks, cond)

    def __call__(self, pairs, embedding):
        mu, spks = self.encode(pairs, embedding)
        mask = jnp.ones(mu.shape[:2], bool)
        return self.estimate(mu, mask, mu, jnp.zeros(mu.shape[:1]), spks, mu)


def abstract_params(config: FlowConfig = FlowConfig()) -> dict:
    """The params tree as ShapeDtypeStructs (no memory), for the converter."""
    pairs = jnp.zeros((1, 2, 2), jnp.int32)
    emb = jnp.zeros((1, config.spk_embed_dim), jnp.float32)
    return jax.eval_shape(lambda: FlowModel(config).init(jax.random.key(0), pairs, emb))["params"]


def init_params(config: FlowConfig = FlowConfig(), key=None) -> dict:
    """Random params (tests, benchmarks)."""
    key = jax.random.key(0) if key is None else key
    pairs = jnp.zeros((1, 2, 2), jnp.int32)
    emb = jnp.zeros((1, config.spk_embed_dim), jnp.float32)
    return jax.jit(lambda k: FlowModel(config).init(k, pairs, emb)["params"])(key)


@functools.partial(jax.jit, static_argnames=("config", "n_timesteps"))
def _inference(params, pairs, embedding, cond, noise, config: FlowConfig, n_timesteps: int):
    model = FlowModel(config)
    variables = {"params": params}
    mu, spks = model.apply(variables, pairs, embedding, method=FlowModel.encode)
    frames = mu.shape[1]
    mask = jnp.ones((mu.shape[0], frames), bool)
    z = noise[:, :frames].astype(jnp.float32) * config.temperature
    est = estimator(params["estimator"], config.estimator)  # blocks sliced once, outside the loop

    def velocity(x, t):
        return cfg_velocity(est, x, mask, mu, t, spks, cond, config.inference_cfg_rate)

    return solve_euler(velocity, z, cosine_t_span(n_timesteps))


def inference(params, token, prompt_token, prompt_feat, embedding, config: FlowConfig = FlowConfig(),
              noise=None, key=None, n_timesteps: int | None = None) -> jax.Array:
    """`CausalMaskedDiffWithXvec.inference`: the mel of the target tokens, (B, 2 * L_target, 80).

    token (B, Lg, 2) and prompt_token (B, Lp, 2): dual-codebook pairs (`embedding.reshape_tokens`);
    prompt_feat (B, T_mel, 80): the prompt's 24 kHz mel, stretched here (nearest) to 2 * Lp frames;
    embedding (B, 192): the CAM++ x-vector. All rows of a batch share the lengths.
    noise (B, >= 2 * (Lp + Lg), 80) replays a given start noise; otherwise it is drawn from `key`
    (default key 0) with `noise_from_key`. n_timesteps defaults to config.n_timesteps.
    """
    cfg = config
    token, prompt_token = np.asarray(token), np.asarray(prompt_token)
    for name, pairs in (("token", token), ("prompt_token", prompt_token)):
        if pairs.ndim != 3 or pairs.shape[-1] != 2 or pairs.dtype.kind not in "iu":
            raise FlowInputError(f"{name} must be integer pairs (batch, frames, 2), got {pairs.dtype} "
                                 f"shape {list(pairs.shape)}")
    b, lg, lp = token.shape[0], token.shape[1], prompt_token.shape[1]
    if lg == 0:
        raise FlowInputError("token must hold at least one pair frame")
    prompt_feat = np.asarray(prompt_feat, np.float32)
    embedding = np.asarray(embedding, np.float32)
    if prompt_feat.ndim != 3 or prompt_feat.shape[0] != b or prompt_feat.shape[2] != cfg.output_size:
        raise FlowInputError(f"prompt_feat must be ({b}, frames, {cfg.output_size}), got {list(prompt_feat.shape)}")
    if lp and prompt_feat.shape[1] == 0:
        raise FlowInputError("prompt_feat has no frames but prompt_token has pairs")
    if embedding.shape != (b, cfg.spk_embed_dim) or prompt_token.shape[0] != b:
        raise FlowInputError(f"embedding must be ({b}, {cfg.spk_embed_dim}) and prompt_token batch {b}, got "
                             f"{list(embedding.shape)} / {prompt_token.shape[0]}")
    frames_p, frames = 2 * lp, 2 * (lp + lg)
    cond = np.zeros((b, frames, cfg.output_size), np.float32)
    if lp:
        cond[:, :frames_p] = stretch_prompt_mel(prompt_feat, frames_p)
    if noise is None:
        noise = noise_from_key(jax.random.key(0) if key is None else key, b, frames, cfg.output_size)
    elif noise.ndim != 3 or noise.shape[0] != b or noise.shape[1] < frames or noise.shape[2] != cfg.output_size:
        raise FlowInputError(f"noise must be ({b}, >= {frames}, {cfg.output_size}), got {list(noise.shape)}")
    pairs = np.concatenate([prompt_token, token], axis=1).astype(np.int32)
    mel = _inference(params, pairs, embedding, cond, jnp.asarray(noise)[:, :frames], cfg,
                     int(n_timesteps or cfg.n_timesteps))
    return mel[:, frames_p:]
