"""The LLM converter, the checkpoint folder and the export back to PyTorch names."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
from conftest import FIXTURES, ROOT
from safetensors.numpy import load_file, save_file

from editx_jax import checkpoint
from editx_jax.config import ConfigError, LLMConfig, load_config
from editx_jax.convert import keymap
from editx_jax.convert.llm import (RULES, check_plan, convert_llm, export_llm, llm_config_from_hf, llm_config_to_hf,
                                   source_shapes)
from editx_jax.convert.sources import SafetensorsSource
from editx_jax.models import llm
from editx_jax.tree import flatten

BF16 = np.dtype(ml_dtypes.bfloat16)
TINY = LLMConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_heads=4, num_groups=2,
                 num_layers=2, max_seq_len=512)


def released_names_and_shapes(vocab, hidden, kv, inter, layers):
    """architecture.md §1.5, written out independently of RULES: name -> torch shape."""
    out = {"model.embed_tokens.weight": (vocab, hidden)}
    for n in range(layers):
        p = f"model.layers.{n}."
        out.update({
            p + "input_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (hidden, hidden),
            p + "self_attn.k_proj.weight": (kv, hidden),
            p + "self_attn.v_proj.weight": (kv, hidden),
            p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "mlp.gate_proj.weight": (inter, hidden),
            p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
        })
    out["model.norm.weight"] = (hidden,)
    out["lm_head.weight"] = (vocab, hidden)
    return out


def tiny_shapes(cfg=TINY):
    return released_names_and_shapes(cfg.vocab_size, cfg.hidden_size, cfg.num_groups * cfg.head_dim,
                                     cfg.intermediate_size, cfg.num_layers)


def random_state(cfg=TINY, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    return {n: (rng.standard_normal(s) * (1.0 if len(s) == 1 else 0.1) + (1.0 if len(s) == 1 else 0.0))
            .astype(np.float32).astype(dtype) for n, s in tiny_shapes(cfg).items()}


def hf_config(cfg=TINY, **changes):
    hf = llm_config_to_hf(cfg)
    hf.update(changes)
    return hf


def write_release(folder, state, cfg_json, index=False):
    """A released-style folder: config.json + model.safetensors, or two shards + the index file."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if cfg_json is not None:
        (folder / "config.json").write_text(json.dumps(cfg_json))
    if not index:
        save_file(state, str(folder / "model.safetensors"))
        return folder
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for file, part in shards.items():
        save_file({n: state[n] for n in part}, str(folder / file))
        weight_map.update({n: file for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


# ---------------------------------------------------------------- (a) the full-size table, abstractly


def test_rules_cover_the_released_checkpoint_exactly():
    cfg = load_config(ROOT / "configs" / "step_audio_editx.yaml").llm
    abstract = llm.abstract_params(cfg)  # jax.eval_shape: nothing is allocated
    expected = released_names_and_shapes(74752, 3072, 256, 8192, 32)
    assert len(expected) == 291

    # ours -> torch: every param slot names one released tensor, with its torch shape
    assert source_shapes(RULES, abstract) == expected

    # torch -> ours: every released name matches exactly one rule, whose target slot fits its shape
    specs = flatten(abstract)
    hits = {}
    match = keymap._Matcher(RULES)
    for name, torch_shape in expected.items():
        rule, m = match(name)
        assert rule is not None, name
        full = tuple(specs[rule.target].shape)
        slot = full[1:] if rule.stack else full
        assert keymap.expected_source_shape(rule, slot) == torch_shape, name
        key = (rule.target, int(m.group(rule.stack)) if rule.stack else 0)
        assert key not in hits, f"{name} and {hits.get(key)} fill the same slot"
        hits[key] = name
    n_slots = sum(specs[p].shape[0] if keymap._rule_for_target(RULES, p).stack else 1 for p in specs)
    assert len(hits) == n_slots == 291
    assert sum(int(np.prod(s.shape)) for s in specs.values()) == cfg.num_params

    check_plan(expected, RULES, abstract)  # the pre-flight check accepts it
    short = dict(expected)
    del short["model.layers.31.mlp.up_proj.weight"]
    with pytest.raises(keymap.ConversionError, match=r"model\.layers\.31\.mlp\.up_proj\.weight \(shape \[8192, 3072\]\)"):
        check_plan(short, RULES, abstract)


# ---------------------------------------------------------------- (b) convert a tiny random checkpoint


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("index", [False, True])
def test_convert_folder_matches_in_memory_conversion(tmp_path, dtype, index):
    state = random_state(dtype=BF16 if dtype == "bfloat16" else np.float32, seed=1)
    with_buffer = dict(state, **{"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32)})
    src = write_release(tmp_path / "src", with_buffer, hf_config(), index=index)
    summary = convert_llm(src, tmp_path / "ckpt", dtype=dtype, progress=False)
    assert summary["tensors"] == 21 and summary["ignored"] == ["model.layers.0.self_attn.rotary_emb.inv_freq"]

    cfg, params = checkpoint.load_llm(tmp_path / "ckpt")
    assert cfg == TINY.__class__(**{**TINY.__dict__, "param_dtype": dtype, "dtype": dtype})
    ref = keymap.convert(keymap.DictSource(state), RULES, llm.abstract_params(cfg))
    for path, leaf in flatten(ref).items():
        got = flatten(params)[path]
        assert got.dtype == np.dtype(BF16 if dtype == "bfloat16" else np.float32), path
        assert got.tobytes() == leaf.tobytes(), path

    tokens = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 7))
    np.testing.assert_array_equal(np.asarray(llm.forward(params, cfg, tokens)),
                                  np.asarray(llm.forward(ref, cfg, tokens)))


# ---------------------------------------------------------------- (c) torch -> ours -> torch bit-exact


def _fixture_release(tmp_path, dtype):
    fx = FIXTURES / "step1_llm"
    manifest = json.loads((fx / "manifest.json").read_text())
    state = load_file(str(fx / manifest["weights"]))
    if dtype == "bfloat16":
        state = {k: v.astype(BF16) for k, v in state.items()}
    return write_release(tmp_path / "src", state, manifest["config"]), state, manifest["config"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_is_bit_exact(tmp_path, dtype):
    src, state, hf = _fixture_release(tmp_path, dtype)
    convert_llm(src, tmp_path / "ckpt", dtype=dtype, progress=False)
    summary = export_llm(tmp_path / "ckpt", None, tmp_path / "out")
    assert summary["tensors"] == len(state) == 21

    out = load_file(str(tmp_path / "out" / "model-00001.safetensors"))
    assert sorted(out) == sorted(state)
    for name, ref in state.items():
        assert out[name].dtype == ref.dtype and out[name].shape == ref.shape, name
        assert out[name].tobytes() == ref.tobytes(), name

    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(state)
    assert set(index["weight_map"].values()) == {"model-00001.safetensors"}
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in state.values())
    exported_cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert exported_cfg["torch_dtype"] == dtype
    assert llm_config_from_hf(exported_cfg) == llm_config_from_hf(hf)

    # the names and dtypes load as a PyTorch state dict
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file as torch_load  # noqa: PLC0415  (needs torch, which is optional)
    sd = torch_load(str(tmp_path / "out" / "model-00001.safetensors"))
    assert set(sd) == set(state)
    assert {t.dtype for t in sd.values()} == {torch.bfloat16 if dtype == "bfloat16" else torch.float32}


def test_export_from_params_with_cast(tmp_path):
    state = random_state()
    cfg = TINY
    params = keymap.convert(keymap.DictSource(state), RULES, llm.abstract_params(cfg))
    export_llm(params, cfg, tmp_path / "out", dtype="bfloat16")
    out = load_file(str(tmp_path / "out" / "model-00001.safetensors"))
    for name, ref in state.items():
        assert out[name].dtype == BF16
        np.testing.assert_array_equal(out[name], ref.astype(BF16), err_msg=name)


# ---------------------------------------------------------------- (d) bad input


def _bad(tmp_path, state=None, cfg_json="default", index=False):
    state = random_state() if state is None else state
    return write_release(tmp_path / "src", state, hf_config() if cfg_json == "default" else cfg_json, index)


def _raises_one_line(exc, pattern, src, dst):
    with pytest.raises(exc, match=pattern) as info:
        convert_llm(src, dst, dtype="float32", progress=False)
    assert "\n" not in str(info.value)
    assert not pathlib.Path(dst).exists(), "a failed conversion must not leave a folder"
    return info.value


def test_missing_tensor(tmp_path):
    state = random_state()
    del state["model.layers.1.mlp.down_proj.weight"]
    _raises_one_line(keymap.ConversionError, r"missing tensor\(s\): model\.layers\.1\.mlp\.down_proj\.weight "
                     r"\(shape \[64, 96\]\)", _bad(tmp_path, state), tmp_path / "ckpt")


def test_extra_tensor(tmp_path):
    state = dict(random_state(), **{"model.layers.0.self_attn.q_norm.weight": np.ones(16, np.float32)})
    _raises_one_line(keymap.ConversionError, r"unexpected tensor\(s\).*model\.layers\.0\.self_attn\.q_norm\.weight",
                     _bad(tmp_path, state), tmp_path / "ckpt")


def test_extra_layer(tmp_path):
    state = dict(random_state(), **{"model.layers.2.input_layernorm.weight": np.ones(64, np.float32)})
    _raises_one_line(keymap.ConversionError, r"model\.layers\.2\.input_layernorm\.weight.*out of range",
                     _bad(tmp_path, state), tmp_path / "ckpt")


def test_wrong_shape(tmp_path):
    state = random_state()
    state["model.layers.0.self_attn.k_proj.weight"] = np.zeros((64, 64), np.float32)
    _raises_one_line(keymap.ConversionError, r"model\.layers\.0\.self_attn\.k_proj\.weight.*shape \[64, 64\]; "
                     r"expected \[32, 64\]", _bad(tmp_path, state), tmp_path / "ckpt")


def test_wrong_dtype(tmp_path):
    state = random_state()
    state["model.norm.weight"] = np.ones(64, np.int32)
    _raises_one_line(keymap.ConversionError, r"'model\.norm\.weight' has dtype int32",
                     _bad(tmp_path, state), tmp_path / "ckpt")


def test_missing_config(tmp_path):
    _raises_one_line(ConfigError, "no config.json", _bad(tmp_path, cfg_json=None), tmp_path / "ckpt")


def test_heads_not_dividing_hidden(tmp_path):
    _raises_one_line(ConfigError, r"llm\.num_heads: 5 heads do not divide hidden_size 64",
                     _bad(tmp_path, cfg_json=hf_config(num_attention_heads=5)), tmp_path / "ckpt")


def test_groups_not_dividing_heads(tmp_path):
    _raises_one_line(ConfigError, r"llm\.num_groups: 3 groups do not divide num_heads 4",
                     _bad(tmp_path, cfg_json=hf_config(num_attention_groups=3)), tmp_path / "ckpt")


def test_missing_shard(tmp_path):
    src = _bad(tmp_path, index=True)
    (src / "model-00002-of-00002.safetensors").unlink()
    _raises_one_line(FileNotFoundError, r"shard model-00002-of-00002\.safetensors .* is missing", src, tmp_path / "ckpt")


def test_no_weights_and_no_folder(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(hf_config()))
    _raises_one_line(FileNotFoundError, r"no model\*\.safetensors files", src, tmp_path / "ckpt")
    _raises_one_line(FileNotFoundError, "model folder not found", tmp_path / "nothing", tmp_path / "ckpt")


def _cli(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, str(ROOT / "tools" / "convert.py"), *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=120)


def test_cli_errors_are_one_line(tmp_path):
    state = random_state()
    del state["lm_head.weight"]
    src = _bad(tmp_path, state)
    r = _cli("llm", src, tmp_path / "ckpt", "--quiet")
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("error: ") and "lm_head.weight (shape [320, 64])" in r.stderr

    r = _cli("export-llm", tmp_path / "no_such_ckpt", tmp_path / "out")
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "checkpoint folder not found" in r.stderr


def test_cli_converts_and_exports(tmp_path):
    src = _bad(tmp_path)
    r = _cli("llm", src, tmp_path / "ckpt", "--dtype", "float32", "--quiet")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["tensors"] == 21
    r = _cli("export-llm", tmp_path / "ckpt", tmp_path / "out", "--quiet")
    assert r.returncode == 0, r.stderr
    out = load_file(str(tmp_path / "out" / "model-00001.safetensors"))
    state = random_state()
    assert all(out[k].tobytes() == v.tobytes() for k, v in state.items())


# ---------------------------------------------------------------- (e) the checkpoint folder


def _tree():
    return {"a": {"kernel": np.arange(12, dtype=np.float32).reshape(3, 4)},
            "b": np.linspace(0, 1, 8, dtype=np.float32).astype(BF16)}


def test_checkpoint_round_trip_and_shardings(tmp_path):
    folder = checkpoint.save_params(tmp_path / "ck", _tree(), {"x": 1}, {"component": "test"})
    assert checkpoint.read_config(folder) == {"x": 1}
    assert checkpoint.read_meta(folder)["component"] == "test"
    got = checkpoint.load_params(folder)
    for path, ref in flatten(_tree()).items():
        leaf = flatten(got)[path]
        assert isinstance(leaf, np.ndarray) and leaf.dtype == ref.dtype and leaf.tobytes() == ref.tobytes()

    mesh = jax.make_mesh((len(jax.devices()),), ("fsdp",))
    shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
    repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    got = checkpoint.load_params(folder, shardings={"a": {"kernel": repl}, "b": shard})
    assert got["b"].sharding == shard and got["a"]["kernel"].sharding == repl
    np.testing.assert_array_equal(np.asarray(got["b"]), _tree()["b"])


def test_checkpoint_restores_leaf_batches_and_casts(tmp_path, monkeypatch):
    folder = checkpoint.save_params(tmp_path / "ck", _tree(), {}, {})
    monkeypatch.setattr(checkpoint, "RESTORE_BATCH_BYTES", 1)  # one leaf per restore call
    as_f32 = {"a": {"kernel": jax.ShapeDtypeStruct((3, 4), np.float32)}, "b": jax.ShapeDtypeStruct((8,), np.float32)}
    got = checkpoint.load_params(folder, as_f32)
    assert got["b"].dtype == np.float32
    np.testing.assert_array_equal(got["b"], _tree()["b"].astype(np.float32))
    np.testing.assert_array_equal(got["a"]["kernel"], _tree()["a"]["kernel"])
    mesh = jax.make_mesh((len(jax.devices()),), ("fsdp",))
    shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
    got = checkpoint.load_params(folder, shardings={"a": {"kernel": jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec())}, "b": shard})
    assert got["b"].sharding == shard
    np.testing.assert_array_equal(np.asarray(got["b"]), _tree()["b"])


def test_checkpoint_load_errors(tmp_path):
    folder = checkpoint.save_params(tmp_path / "ck", _tree(), {}, {})
    sds = jax.ShapeDtypeStruct
    with pytest.raises(checkpoint.CheckpointError, match=r"param a/kernel has shape \[3, 4\], the model expects \[4, 4\]"):
        checkpoint.load_params(folder, {"a": {"kernel": sds((4, 4), np.float32)}, "b": sds((8,), BF16)})
    with pytest.raises(checkpoint.CheckpointError, match=r"missing param\(s\) c"):
        checkpoint.load_params(folder, {**_tree(), "c": sds((1,), np.float32)})
    with pytest.raises(checkpoint.CheckpointError, match=r"unexpected param\(s\) b"):
        checkpoint.load_params(folder, {"a": _tree()["a"]})
    with pytest.raises(FileNotFoundError, match="checkpoint folder not found"):
        checkpoint.load_params(tmp_path / "nope")
    (tmp_path / "half").mkdir()
    with pytest.raises(checkpoint.CheckpointError, match="not a complete editx-jax checkpoint"):
        checkpoint.load_llm(tmp_path / "half")
    (folder / "config.json").unlink()
    with pytest.raises(ConfigError, match="no config.json"):
        checkpoint.load_llm(folder)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(checkpoint.CheckpointError, match="refusing to overwrite"):
        checkpoint.save_params(tmp_path / "other", _tree(), {}, {})


def test_a_failed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    folder = checkpoint.save_params(tmp_path / "ck", _tree(), {"v": 1}, {})
    new = jax.tree_util.tree_map(lambda a: a + 1, _tree())
    real = checkpoint._write_json

    def dies_on_meta(path, data):
        if path.name == checkpoint.META_NAME:
            raise KeyboardInterrupt  # killed after the params were written, before the folder is complete
        real(path, data)

    monkeypatch.setattr(checkpoint, "_write_json", dies_on_meta)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_params(folder, new, {"v": 2}, {})
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"], "no temporary sibling may be left"
    assert checkpoint.read_config(folder) == {"v": 1}
    np.testing.assert_array_equal(checkpoint.load_params(folder)["a"]["kernel"], _tree()["a"]["kernel"])

    checkpoint.save_params(folder, new, {"v": 2}, {})  # a complete save replaces it
    assert checkpoint.read_config(folder) == {"v": 2}
    np.testing.assert_array_equal(checkpoint.load_params(folder)["a"]["kernel"], new["a"]["kernel"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_source_rejects_ambiguous_shards(tmp_path):
    state = random_state()
    src = write_release(tmp_path / "src", state, hf_config(), index=True)
    index_path = src / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    moved = sorted(state)[0]  # listed in the wrong shard
    index["weight_map"][moved] = "model-00002-of-00002.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(keymap.ConversionError, match=rf"{moved!r} is listed .* does not hold it"):
        SafetensorsSource(src)

    index_path.unlink()  # without an index, a name stored in two files is an error
    save_file({moved: state[moved]}, str(src / "model-00002-of-00002.safetensors"))
    with pytest.raises(keymap.ConversionError, match=rf"{moved!r} is stored twice"):
        SafetensorsSource(src)
