import pytest

from editx_jax.config import Config, ConfigError, LLMConfig, MeshConfig, load_config
from editx_jax.convert.llm import llm_config_from_hf, llm_config_to_hf
from conftest import ROOT


def test_released_preset_has_the_released_sizes():
    cfg = load_config(ROOT / "configs/step_audio_editx.yaml")
    llm = cfg.llm
    assert (llm.hidden_size, llm.num_layers, llm.num_heads, llm.num_groups) == (3072, 32, 48, 4)
    assert (llm.intermediate_size, llm.vocab_size, llm.rms_norm_eps, llm.head_dim) == (8192, 74752, 1e-5, 64)
    assert abs(llm.num_params - 3.53e9) < 0.01e9
    gen = cfg.generation
    assert (gen.temperature, gen.top_k, gen.repetition_window, gen.max_length, gen.drop_last) == (0.7, 50, 10, 8192, True)


def test_every_preset_loads():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        assert isinstance(load_config(path), Config)


def test_overrides_apply_and_parse_types():
    cfg = load_config(ROOT / "configs/tiny.yaml", ["llm.num_layers=3", "generation.temperature=1", "mesh.tensor=2"])
    assert cfg.llm.num_layers == 3 and cfg.generation.temperature == 1.0 and cfg.mesh.tensor == 2


@pytest.mark.parametrize("override, needle", [
    (["llm.hidden_sise=8"], "llm.hidden_sise"),
    (["nonsense.x=1"], "nonsense"),
    (["llm.num_heads=5"], "llm.num_heads"),
    (["llm.num_groups=4"], "llm.num_groups"),
    (["llm.dtype=float8"], "llm.dtype"),
    (["llm.num_layers=two"], "llm.num_layers"),
    (["generation.top_p=0"], "generation.top_p"),
    (["llm.num_layers"], "KEY=VALUE"),
])
def test_bad_configs_name_the_field(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(ROOT / "configs/tiny.yaml", override)


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config(ROOT / "configs/nope.yaml")


def test_mesh_resolution():
    assert MeshConfig(data=2, fsdp=-1, tensor=2).resolve(8) == (2, 2, 2)
    assert MeshConfig().resolve(8) == (1, 8, 1)
    with pytest.raises(ConfigError):
        MeshConfig(data=3, fsdp=-1).resolve(8)
    with pytest.raises(ConfigError):
        MeshConfig(data=-1, fsdp=-1)


def test_hf_config_round_trip():
    cfg = LLMConfig(hidden_size=128, num_heads=4, num_groups=2, num_layers=2, intermediate_size=320, vocab_size=600)
    assert llm_config_from_hf(llm_config_to_hf(cfg)) == cfg
    with pytest.raises(ConfigError, match="tie_word_embeddings"):
        llm_config_from_hf({**llm_config_to_hf(cfg), "tie_word_embeddings": True})
    with pytest.raises(ConfigError, match="hidden_size"):
        llm_config_from_hf({k: v for k, v in llm_config_to_hf(cfg).items() if k != "hidden_size"})
