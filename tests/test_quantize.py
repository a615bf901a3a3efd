"""int8 weight-only LLM (models/quantize.py): round-trip bound, greedy agreement with float, sharded
equals one device, and the converter's --quantize."""

import dataclasses
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FIXTURES, ROOT
from safetensors.numpy import load_file

from editx_jax import checkpoint, sharding
from editx_jax.config import GenerationConfig, LLMConfig, MeshConfig, load_config
from editx_jax.generate.decode import generate
from editx_jax.layers.linear import Projection
from editx_jax.models import llm
from editx_jax.models import quantize as qz
from editx_jax.pipeline import EditX
from editx_jax.random_init import random_params
from editx_jax.tree import flatten
from test_convert_llm import write_release

GREEDY = GenerationConfig(greedy=True, max_new_tokens=32, max_length=512, repetition_window=0, drop_last=False,
                          min_prompt_bucket=16)


def test_round_trip_error_is_half_a_step_per_output_channel():
    w = np.random.default_rng(0).standard_normal((3, 64, 4, 8)).astype(np.float32)
    w[:, :, 0, 0] *= 100  # one loud channel must not coarsen the others
    q, s = qz.quantize_array(w, (1,))
    assert q.dtype == np.int8 and s.shape == (3, 1, 4, 8) and np.abs(q).max() == qz.QMAX
    err = np.abs(qz.dequantize_array(q, s) - w)
    assert np.all(err <= s / 2 * (1 + 1e-6))
    assert err[:, :, 1:].max() < 0.02 * np.abs(w[:, :, 1:]).max()
    z, zs = qz.quantize_array(np.zeros((4, 2)), (0,))  # an all-zero channel: scale 1, not 0/0
    assert np.all(z == 0) and np.all(zs == 1)


def fixture_model():
    fx = FIXTURES / "step1_llm_decode"
    manifest = json.loads((fx / "manifest.json").read_text())
    return fx, manifest


def test_convert_quantize_writes_a_loadable_folder_greedy_agrees(tmp_path):
    """tools/convert.py llm --quantize int8 on the fixture release: int8 leaves at most ~1/4 of the
    float32 bytes, loaded by the same path; along a float greedy run the int8 model's top-1 agrees
    at most steps (measured 0.954 over 65 steps) and its logits are within 3 % of their peak."""
    fx, manifest = fixture_model()
    state = load_file(str(fx / manifest["weights"]))
    src = write_release(tmp_path / "src", state, manifest["config"])
    for extra, dst in (([], "f32"), (["--quantize", "int8"], "int8")):
        proc = subprocess.run([sys.executable, str(ROOT / "tools/convert.py"), "llm", str(src), str(tmp_path / dst),
                               "--dtype", "float32", "--quiet", *extra], capture_output=True, text=True, check=False)
        assert proc.returncode == 0, proc.stderr
    cfg, floats = checkpoint.load_llm(tmp_path / "f32")
    qcfg, ints = checkpoint.load_llm(tmp_path / "int8")
    assert qcfg.quantize == "int8" and ints["layers"]["mlp"]["up_proj"]["kernel"].dtype == np.int8
    assert ints["embed"]["embedding"].dtype == np.int8 and ints["lm_head"]["kernel_scale"].shape == (1, cfg.vocab_size)
    nbytes = lambda t: sum(x.nbytes for x in jax.tree_util.tree_leaves(t))  # noqa: E731
    assert nbytes(ints) < 0.27 * nbytes(floats)
    prompt = list(map(int, np.random.RandomState(0).randint(4, cfg.vocab_size, 9)))
    seq = prompt + generate(floats, cfg, GREEDY, [prompt]).tokens[0]
    # Top-1 agreement along the float greedy run (both models see the same context at every step).
    a = np.asarray(llm.forward(floats, cfg, np.asarray([seq])))[0, len(prompt) - 1:]
    b = np.asarray(llm.forward(ints, qcfg, np.asarray([seq])))[0, len(prompt) - 1:]
    assert len(a) == GREEDY.max_new_tokens + 1
    assert np.mean(a.argmax(-1) == b.argmax(-1)) >= 0.9  # measured 0.954 over 65 steps
    assert np.abs(a - b).max() <= 0.03 * np.abs(a).max()  # measured 0.022


def test_convert_refuses_an_unknown_quantize_before_writing(tmp_path):
    fx, manifest = fixture_model()
    src = write_release(tmp_path / "src", load_file(str(fx / manifest["weights"])), manifest["config"])
    proc = subprocess.run([sys.executable, str(ROOT / "tools/convert.py"), "llm", str(src), str(tmp_path / "out"),
                           "--quantize", "int4"], capture_output=True, text=True, check=False)
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert proc.returncode == 1 and len(lines) == 1 and "--quantize must be one of int8, got 'int4'" in lines[0]
    assert not (tmp_path / "out").exists()


TINY = LLMConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_heads=8, num_groups=8, num_layers=2)


@pytest.mark.parametrize("shape", [(1, 1, 8), (2, 1, 4)])
def test_sharded_int8_equals_one_device(shape):
    """int8 kernels and their scales placed by the rules table (a scale follows its output channel's
    axis); the same greedy ids as one device."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices")
    params, qcfg = qz.quantize_params(jax.tree_util.tree_map(np.asarray, llm.init_params(TINY, jax.random.key(1))), TINY)
    mesh = sharding.make_mesh(MeshConfig(*shape))
    placed = sharding.shard_tree(params, sharding.logical_to_sharding(llm.param_logical_axes(qcfg), mesh))
    scale = placed["layers"]["mlp"]["up_proj"]["kernel_scale"]
    assert tuple(scale.sharding.spec) == (None, None, "tensor") and sharding.split_factor(scale) == shape[2]
    rng = np.random.RandomState(2)
    prompts = [list(map(int, rng.randint(4, 256, n))) for n in (7, 3, 12, 5, 9, 4, 11, 6)]
    gen = GenerationConfig(greedy=True, max_new_tokens=5, max_length=64, repetition_window=0, min_prompt_bucket=16)
    want = generate(params, qcfg, gen, prompts).tokens
    assert generate(placed, qcfg, gen, prompts, mesh=mesh).tokens == want


@pytest.mark.parametrize("param_dtype", ["bfloat16", "float32"])
def test_random_int8_is_quantized_as_drawn_with_the_same_numbers(param_dtype):
    """random_quantized_params (each leaf quantized as it is drawn, a stacked kernel slice by slice:
    EditX.random's int8 path) gives bit for bit what quantizing the whole random float tree gives."""
    cfg = dataclasses.replace(TINY, num_layers=3, num_groups=2, param_dtype=param_dtype)
    for embeddings in (True, False):
        want, _ = qz.quantize_params(random_params(llm.abstract_params(cfg), 7), cfg, "int8", embeddings)
        got, qcfg = qz.random_quantized_params(cfg, 7, "int8", embeddings)
        assert qcfg.quantize == "int8" and qcfg.quantize_embeddings == embeddings
        want, got = jax.tree_util.tree_leaves_with_path(want), jax.tree_util.tree_leaves_with_path(got)
        assert [p for p, _ in got] == [p for p, _ in want]
        for (path, a), (_, b) in zip(want, got):
            assert isinstance(b, jax.Array) and b.dtype == a.dtype and np.array_equal(np.asarray(a), np.asarray(b)), path
        kinds = {jax.tree_util.keystr(p): x.dtype for p, x in got}
        assert kinds["['layers']['mlp']['up_proj']['kernel']"] == np.int8
        assert kinds["['embed']['embedding']"] == (np.int8 if embeddings else np.dtype(param_dtype))


def test_int8_model_folder_restores_int8_leaves_only(tmp_path, monkeypatch):
    """An int8 EditX folder loads its int8 kernels as int8: every leaf restored is asked for in its
    stored int8/float32-scale dtype (never a float kernel to quantize afterwards)."""
    cfg = load_config(ROOT / "configs/tiny.yaml", ["generation.max_new_tokens=4", "llm.quantize=int8"])
    folder = EditX.random(cfg, seed=3).save(tmp_path / "m")
    asked = {}
    restore = checkpoint._restore_in_batches

    def spy(path, target):
        if path.parent.name == "llm":
            asked.update({k: x.dtype for k, x in flatten(target).items()})
        return restore(path, target)

    monkeypatch.setattr(checkpoint, "_restore_in_batches", spy)
    model = EditX.from_pretrained(folder)
    kernels = [k for k in asked if k.endswith(("kernel", "embedding"))]
    assert kernels and all(asked[k] == np.int8 for k in kernels)
    weights = flatten(model.llm_params)  # the stored form (the model holds one tree per layer)
    assert all(weights[k].dtype == np.int8 for k in kernels)
    assert {weights[k].dtype for k in weights if k.endswith("_scale")} == {np.dtype(np.float32)}


def test_int8_projection_on_cpu_widens_to_float32_with_the_same_numbers():
    """On CPU the int8 kernel is widened straight to float32 (XLA:CPU's int8 -> bfloat16 convert is
    a slow scalar routine): bit for bit the bfloat16 contraction it replaces."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 5, 64)), jnp.bfloat16)
    proj = Projection((4, 8), ("embed", "heads", "kv"), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, quantized=True)
    q, s = qz.quantize_array(rng.standard_normal((64, 4, 8)), (0,))
    got = proj.apply({"params": {"kernel": q, "kernel_scale": s}}, x)
    y = jax.lax.dot_general(x, jnp.asarray(q).astype(jnp.bfloat16), (((2,), (0,)), ((), ())),
                            preferred_element_type=jnp.float32)
    want = (y * s.reshape(4, 8)).astype(jnp.bfloat16)
    assert got.dtype == jnp.bfloat16 and np.array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
