"""token2wav sharded by the rules table on 8 fake CPU devices: the same speech as one device."""

import dataclasses
import json

import flax.linen as nn
import jax
import numpy as np
import pytest
from conftest import FIXTURES, ROOT

from editx_jax import sharding
from editx_jax.config import MeshConfig, load_config
from editx_jax.decoder import flow, hift
from editx_jax.decoder.token2wav import Decoder, flow_jit, vocoder_jit
from editx_jax.parity import compare
from editx_jax.pipeline import EditX
from editx_jax.random_init import random_params

TINY = load_config(ROOT / "configs" / "tiny.yaml")
# tiny.yaml's decoder with one resblock per HiFT stage: the unrolled vocoder compiles in a few seconds
FLOW = dataclasses.replace(TINY.flow, estimator=dataclasses.replace(TINY.flow.estimator, depth=1))
HIFT = dataclasses.replace(TINY.hift, resblock_kernel_sizes=(3,), resblock_dilation_sizes=((1,),),
                           source_resblock_dilation_sizes=((1,),) * 3)
# The tolerance of the token2wav fixture (flow + vocoder end to end against the reference).
MANIFEST = json.loads((FIXTURES / "token2wav" / "manifest.json").read_text())
ATOL, RTOL = float(MANIFEST["atol"]), float(MANIFEST["rtol"])
BATCH_SPEC = nn.logical_to_mesh_axes(("activation_batch",), list(sharding.LLM_RULES))[0]  # ('data', 'fsdp')


def tiny_decoder() -> Decoder:
    # small vocoder kernels keep a random HiFT out of its chaotic regime (as EditX.random does)
    return Decoder(random_params(flow.abstract_params(FLOW), 1), FLOW,
                   random_params(hift.abstract_params(HIFT), 2, kernel_scale=0.3), HIFT)


def batch():
    """Six items with prompts of different lengths (the flow masks each item's padding) and
    generations of 11-15 ids, all 9 pair frames: one vocoder group of six rows (one compile)."""
    rng = np.random.default_rng(0)
    def ids(n):
        return [65536 + (int(rng.integers(0, 1024)) if i % 5 < 2 else 1024 + int(rng.integers(0, 4096))) for i in range(n)]
    gen = [ids(n) for n in (11, 15, 13, 12, 14, 11)]
    prompts = [ids(n) for n in (20, 12, 17, 25, 8, 14)]
    mels = [rng.normal(-5, 2, (2 * 3 * -(-len(p) // 5), 80)).astype(np.float32) for p in prompts]
    return gen, prompts, mels, rng.normal(size=(6, 192)).astype(np.float32)


@pytest.fixture(scope="module")
def one_device():
    return tiny_decoder().token2wav(*batch())


@pytest.mark.parametrize("shape", [(1, 1, 8), (2, 1, 4), (8, 1, 1)])
def test_sharded_token2wav_equals_one_device(shape, one_device):
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices")
    mesh = sharding.make_mesh(MeshConfig(*shape))
    dec = tiny_decoder().shard(mesh)
    got = dec.token2wav(*batch())
    ok, _, _, detail = compare({"speech": one_device.speech, "mel": one_device.mel},
                               {"speech": got.speech, "mel": got.mel}, ATOL, RTOL)
    assert ok, detail
    np.testing.assert_array_equal(got.lengths, one_device.lengths)

    # params whole on every device of the mesh
    for leaf in jax.tree_util.tree_leaves((dec.flow_params, dec.vocoder_params)):
        assert leaf.sharding.mesh == mesh and sharding.split_factor(leaf) == 1 and leaf.sharding.is_fully_replicated
    # the jitted flow and vocoder give rows split over data x fsdp, as the rules table says (traced only)
    rows, n = shape[0] * shape[1], 8
    spec = jax.ShapeDtypeStruct
    x = flow_jit(FLOW, 10, mesh).eval_shape(dec.flow_params, spec((n, 16, 2), np.int32), spec((n,), np.int32),
                                            spec((n, 192), np.float32), spec((n, 32, 80), np.float32),
                                            spec((1, 32, 80), np.float32))
    draws = jax.eval_shape(lambda k: dec.vocoder.nsf.draw(k, n, 20, HIFT), jax.random.key(0))
    speech = vocoder_jit(dec.vocoder, HIFT, mesh).eval_shape(dec.vocoder_params, spec((n, 80, 20), np.float32), draws)
    for out in (x, speech):
        assert out.sharding.spec[0] == BATCH_SPEC and out.sharding.num_devices == 8
        assert out.sharding.shard_shape(out.shape)[0] == n // rows


def test_editx_shards_its_decoder():
    """The real path: EditX (infer.py --mesh / the config's mesh:) hands its mesh to the decoder."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices")
    mesh = sharding.make_mesh(MeshConfig(4, 1, 2))
    model = EditX.random(TINY, mesh=mesh)
    assert model.mesh is mesh and model.decoder.mesh is mesh
    assert model.decoder.flow_params["encoder_proj"]["kernel"].sharding.is_fully_replicated
    q = model._llm_weights["layers"][0]["attn"]["q_proj"]["kernel"]  # the inference form: one tree per layer
    assert sharding.split_factor(q) == 2
