"""Parity runners for the `dit_estimator` and `flow_inference` fixtures (architecture.md §3.4-3.6).

Fixture arrays are channels-first like the reference ((B, 80, T)); our modules are channels-last, so
the runners transpose on the way in and out. The gate runs them with float32 matmuls
(parity.RUNNER_MATMUL_PRECISION).
"""

from __future__ import annotations

import jax
import numpy as np

from editx_jax.convert.flow import convert_dit, convert_flow, dit_config_from_reference, flow_config_from_reference
from editx_jax.decoder.dit import apply
from editx_jax.decoder.flow import cosine_t_span, inference


def _frames_last(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.swapaxes(a, 1, 2))  # (B, C, T) <-> (B, T, C)


def run_dit(fx) -> dict[str, np.ndarray]:
    """out_k = DiT(x, mask, mu, t_k, spks, cond) for every t_k in the inputs, as (B, 80, T)."""
    config = dit_config_from_reference(fx.config)
    params = convert_dit(fx.weights(), config)
    inputs = fx.inputs()
    x, mu, cond = (_frames_last(inputs[k]) for k in ("x", "mu", "cond"))
    mask = inputs["mask"][:, 0, :] > 0  # (B, 1, T) float -> (B, T) bool
    run = jax.jit(lambda p, t: apply(p, config, x, mask, mu, t, inputs["spks"], cond))
    outputs = {}
    for name in sorted(k for k in inputs if k.startswith("t_")):
        outputs["out_" + name[2:]] = _frames_last(np.asarray(run(params, inputs[name])))
    return outputs


def run_flow_inference(fx) -> dict[str, np.ndarray]:
    """feat (1, 80, 2 * token frames) of CausalMaskedDiffWithXvec.inference, and the solver's t_span."""
    config = flow_config_from_reference(fx.config)
    params = convert_flow(fx.weights(), config)
    inputs = fx.inputs()
    n_timesteps = int(fx.call_arg("n_timesteps"))  # an argument of the reference call, not of the config
    lp, lg = int(inputs["prompt_token_len"][0]), int(inputs["token_len"][0])
    feat = inference(params, inputs["token"][:, :lg], inputs["prompt_token"][:, :lp],
                     inputs["prompt_feat"][:, :int(inputs["prompt_feat_len"][0])], inputs["embedding"],
                     config, noise=_frames_last(inputs["rand_noise"]), n_timesteps=n_timesteps)
    return {"feat": _frames_last(np.asarray(feat)), "t_span": np.asarray(cosine_t_span(n_timesteps))}
