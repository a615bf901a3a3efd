"""train.py: --init-from a converted checkpoint folder, --export to released safetensors, bad input."""

import json
import pathlib
import sys

import jax
import numpy as np
from _sft_corpus import TINY_LLM, make_records, write_jsonl

from editx_jax import checkpoint
from editx_jax.config import load_config
from editx_jax.models import llm

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
import prepare_data  # noqa: E402  (tools/prepare_data.py, importable once tools/ is on the path)
import pytest  # noqa: E402
import train  # noqa: E402
from safetensors import safe_open  # noqa: E402

from editx_jax.train import loop, runs


def _args(tmp_path, out, *extra, data=None):
    data = data or write_jsonl(tmp_path / "train.jsonl", make_records(16, 0))
    sets = TINY_LLM + [f"data.train={data}", f"train.output_dir={out}", "train.steps=2", "train.batch_size=8",
                       "train.progress=false", "data.max_length=256", "mesh.fsdp=-1", "data.prefetch=0",
                       "optimizer.learning_rate=1.0e-7", *extra]
    return ["--config", str(ROOT / "configs/sft_tiny.yaml")] + [f"--set={s}" for s in sets]


def test_init_from_checkpoint_and_export(tmp_path):
    """Also trains from prepared ArrayRecord shards (tools/prepare_data.py shards)."""
    full = load_config(ROOT / "configs/sft_tiny.yaml", TINY_LLM + ["data.max_length=256"])
    prepare_data.write_shards(write_jsonl(tmp_path / "d.jsonl", make_records(16, 0)), tmp_path / "shards" / "t",
                              full, num_shards=2)
    shards = str(tmp_path / "shards" / "t-*.array_record")
    cfg = full.llm
    params = jax.device_get(llm.init_params(cfg, jax.random.key(7)))
    checkpoint.save_llm(tmp_path / "init", params, cfg)
    out = tmp_path / "run"
    assert train.main(_args(tmp_path, out, "data.text_tokenizer=''", data=shards) + ["--init-from", str(tmp_path / "init"),
                                              "--export", str(tmp_path / "hf")]) == 0
    with safe_open(str(tmp_path / "hf" / "model-00001.safetensors"), "pt") as f:
        got = f.get_tensor("model.embed_tokens.weight").float().numpy()
    hf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf["hidden_size"] == cfg.hidden_size and hf["torch_dtype"] == "bfloat16"
    # lr 1e-7 for 2 steps: the exported weights are the init-from weights (to bf16 precision)
    want = params["embed"]["embedding"]
    np.testing.assert_allclose(got, want, atol=1e-2 * np.abs(want).max())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == [2]
    assert list((out / "tensorboard").glob("events.out.tfevents.*")), "no TensorBoard event file"


def test_bad_mesh_and_bad_init_from_are_clear_errors(tmp_path, capsys):
    assert train.main(_args(tmp_path, tmp_path / "a", "mesh.data=3")) == 1
    assert "mesh" in capsys.readouterr().err
    other = load_config(ROOT / "configs/sft_tiny.yaml", TINY_LLM + ["llm.num_layers=3"]).llm
    checkpoint.save_llm(tmp_path / "other", jax.device_get(llm.init_params(other, jax.random.key(0))), other)
    assert train.main(_args(tmp_path, tmp_path / "b") + ["--init-from", str(tmp_path / "other")]) == 1
    assert "num_layers" in capsys.readouterr().err
    assert not (tmp_path / "b" / "checkpoints").exists() or not any((tmp_path / "b" / "checkpoints").iterdir())


def test_batches_with_ids_outside_the_vocabulary_are_refused():
    ok = {"tokens": np.array([[[5, 511]]]), "targets": np.array([[[511, 3]]])}
    runs.sft.check_ids(ok, 512)
    with pytest.raises(loop.RunError, match="outside the vocabulary"):
        runs.sft.check_ids({**ok, "targets": np.array([[[600, 3]]])}, 512)
