"""Exports back to the released formats: BigVGAN to its state dict, and `convert.py export-decoder`
(flow.pt + the vocoder) read back by our own converters."""

import pathlib
import sys

import jax
import numpy as np
import pytest

from editx_jax.config import load_config
from editx_jax.convert import bigvgan as convert_bigvgan
from editx_jax.convert import hift as convert_hift
from editx_jax.convert.flow import convert_flow
from editx_jax.decoder import bigvgan, campplus, flow, hift
from editx_jax.decoder.token2wav import Decoder
from editx_jax.random_init import random_params

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import convert as convert_cli  # noqa: E402  (tools/convert.py, the CLI under test)
SMALL_BIGVGAN = bigvgan.BigVGANConfig(upsample_initial_channel=32, upsample_rates=(8, 6, 10),
                                      upsample_kernel_sizes=(16, 12, 20))


def _assert_trees(got, want, exact):
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        if exact:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        else:  # weight norm: g = ||w||, then g * w / ||w|| in float32
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("weight_norm", ["none", "old", "parametrizations"])
def test_bigvgan_state_dict_round_trip(weight_norm):
    params = random_params(bigvgan.abstract_params(SMALL_BIGVGAN), 3)
    sd = convert_bigvgan.to_state_dict(params, SMALL_BIGVGAN, weight_norm=weight_norm)
    filters = [k for k in sd if k.endswith(convert_bigvgan.FILTER_SUFFIXES)]
    alphas = [k for k in sd if k.endswith(".act.alpha")]
    assert len(filters) == 2 * len(alphas) > 0 and all(sd[k].shape == (1, 1, 12) for k in filters)
    if weight_norm == "old":
        assert "conv_pre.weight_g" in sd and "ups.0.0.weight_v" in sd and "conv_pre.weight" not in sd
    back = convert_bigvgan.from_state_dict(sd, SMALL_BIGVGAN)  # also checks every filter buffer
    _assert_trees(back, params, exact=weight_norm == "none")


def test_export_decoder_cli_round_trip(tmp_path):
    torch = pytest.importorskip("torch")
    cfg = load_config(ROOT / "configs/tiny.yaml")
    decoder = Decoder(random_params(flow.abstract_params(cfg.flow), 1), cfg.flow,
                      random_params(hift.abstract_params(cfg.hift), 2, kernel_scale=0.3), cfg.hift,
                      random_params(campplus.abstract_params(cfg.campplus), 3), cfg.campplus, cfg.token2wav)
    decoder.save(tmp_path / "ckpt")
    assert convert_cli.main(["export-decoder", str(tmp_path / "ckpt"), str(tmp_path / "out"), "--quiet"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["flow.pt", "hift.pt"]
    flow_sd = torch.load(tmp_path / "out" / "flow.pt", weights_only=True)
    _assert_trees(convert_flow(flow_sd, cfg.flow), decoder.flow_params, exact=True)
    hift_sd = torch.load(tmp_path / "out" / "hift.pt", weights_only=True)
    assert any(".parametrizations.weight.original0" in k for k in hift_sd)  # as the released hift.pt
    _assert_trees(convert_hift.from_state_dict(hift_sd, cfg.hift), decoder.vocoder_params, exact=False)
