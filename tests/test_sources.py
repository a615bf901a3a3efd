"""The converters' torch checkpoint reader (`TorchSource`) and the weight-norm view over any source."""

import numpy as np
import pytest

from editx_jax.convert.keymap import ConversionError, DictSource
from editx_jax.convert.sources import (TorchSource, WeightNormSource, checkpoint_source, fold_weight_norm,
                                       write_safetensors)

torch = pytest.importorskip("torch")


def _state():
    g = torch.Generator().manual_seed(0)
    return {"encoder.w": torch.randn(3, 4, generator=g), "encoder.b": torch.randn(3, generator=g),
            "decoder.w": torch.randn(2, 2, generator=g)}


@pytest.mark.parametrize("wrap", [None, "state_dict", "model", "generator"])
def test_reads_plain_and_wrapped_pickles(tmp_path, wrap):
    state = _state()
    path = tmp_path / "model.pt"
    torch.save(state if wrap is None else {wrap: state, "epoch": 3}, path)
    source = TorchSource(path)
    assert source.names() == list(state)
    assert source.shape("encoder.w") == (3, 4) and source.dtype("encoder.w") == "float32"
    np.testing.assert_array_equal(source.get("encoder.w"), state["encoder.w"].numpy())


def test_legacy_pickle_select_and_ignored(tmp_path):
    """The pre-zip format cannot be memory-mapped: it is read whole instead. `select` keeps a subset;
    the rest, and entries that are not tensors, are listed in `.ignored`."""
    path = tmp_path / "old.pt"
    torch.save({**_state(), "step": 7}, path, _use_new_zipfile_serialization=False)
    source = TorchSource(path, select=lambda n: n.startswith("encoder."))
    assert source.names() == ["encoder.w", "encoder.b"]
    assert source.ignored == ["decoder.w", "step"]


def test_dtypes_and_in_memory_state_dicts():
    source = TorchSource({"a": torch.ones(2, dtype=torch.bfloat16), "n": torch.zeros(2, dtype=torch.int64),
                          "x": np.full((2,), 0.5, np.float16)})
    assert (source.dtype("a"), source.dtype("n"), source.dtype("x")) == ("bfloat16", "int64", "float16")
    got = source.get("a")
    assert got.dtype == np.float32 and got.tolist() == [1.0, 1.0]  # widened exactly
    assert source.get("x").dtype == np.float32
    with pytest.raises(ConversionError, match="'n' has dtype int64; expected a float tensor"):
        source.get("n")


def test_bad_checkpoints(tmp_path):
    with pytest.raises(ConversionError, match="checkpoint not found"):
        TorchSource(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a pickle at all")
    with pytest.raises(ConversionError, match="junk.pt: not a readable torch checkpoint") as e:
        TorchSource(junk)
    assert "\n" not in str(e.value)
    listed = tmp_path / "list.pt"
    torch.save([torch.ones(1)], listed)
    with pytest.raises(ConversionError, match="holds a list, not a state_dict"):
        TorchSource(listed)
    with pytest.raises(ConversionError, match="expected a checkpoint path or a state_dict"):
        TorchSource([1, 2, 3])


def test_checkpoint_source_by_suffix(tmp_path):
    state = {k: v.numpy() for k, v in _state().items()}
    write_safetensors(tmp_path / "m.safetensors", lambda: iter(state.items()))
    torch.save(_state(), tmp_path / "m.pt")
    for name in ("m.safetensors", "m.pt"):
        source = checkpoint_source(tmp_path / name)
        assert sorted(source.names()) == sorted(state), name
        np.testing.assert_array_equal(source.get("decoder.w"), state["decoder.w"])


def test_weight_norm_view_over_a_torch_source(tmp_path):
    g, v = np.array([[[2.0]], [[0.5]]], np.float32), np.arange(1, 7, dtype=np.float32).reshape(2, 1, 3)
    path = tmp_path / "wn.pt"
    torch.save({"m.parametrizations.weight.original0": torch.from_numpy(g),
                "m.parametrizations.weight.original1": torch.from_numpy(v), "m.bias": torch.zeros(2)}, path)
    source = WeightNormSource(TorchSource(path))
    assert sorted(source.names()) == ["m.bias", "m.weight"] and source.shape("m.weight") == (2, 1, 3)
    np.testing.assert_allclose(source.get("m.weight"), fold_weight_norm(g, v), rtol=1e-7)
    np.testing.assert_allclose(np.linalg.norm(source.get("m.weight").reshape(2, -1), axis=1), [2.0, 0.5], rtol=1e-6)
    with pytest.raises(ConversionError, match="no weight-norm partner"):
        WeightNormSource(DictSource({"m.weight_g": g}))
