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


# ---------------------------------------------------------------- `base:` inheritance


def _write(folder, name, text):
    (folder / name).write_text(text)
    return folder / name


def test_base_deep_merges_with_the_preset_winning(tmp_path):
    (tmp_path / "sub").mkdir()
    _write(tmp_path, "root.yaml", "llm: {num_layers: 3, hidden_size: 64, num_heads: 4}\ntrain: {steps: 9}\n")
    _write(tmp_path / "sub", "mid.yaml", "base: ../root.yaml\nllm: {num_layers: 5}\ngeneration: {top_k: 7}\n")
    leaf = _write(tmp_path, "leaf.yaml", "base: sub/mid.yaml\nllm: {num_groups: 2}\ngeneration: {top_k: 3}\n")
    cfg = load_config(leaf, ["train.steps=11"])
    # a key of each file survives in the nested llm section; the nearest file (then --set) wins
    assert (cfg.llm.num_layers, cfg.llm.hidden_size, cfg.llm.num_heads, cfg.llm.num_groups) == (5, 64, 4, 2)
    assert cfg.generation.top_k == 3 and cfg.train.steps == 11
    assert load_config(tmp_path / "sub/mid.yaml").llm.num_groups == LLMConfig().num_groups


def test_base_cycles_missing_files_and_unknown_keys_are_one_line_errors(tmp_path):
    _write(tmp_path, "a.yaml", "base: b.yaml\n")
    _write(tmp_path, "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match=r"`base:` cycle a\.yaml -> b\.yaml -> a\.yaml") as err:
        load_config(tmp_path / "a.yaml")
    assert "\n" not in str(err.value)
    _write(tmp_path, "self.yaml", "base: self.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "self.yaml")
    _write(tmp_path, "orphan.yaml", "base: gone.yaml\n")
    with pytest.raises(ConfigError, match=r"not found: .*gone\.yaml \(the base of .*orphan\.yaml\)"):
        load_config(tmp_path / "orphan.yaml")
    _write(tmp_path, "typo_base.yaml", "llm: {num_layerz: 2}\n")
    _write(tmp_path, "child.yaml", "base: typo_base.yaml\n")
    with pytest.raises(ConfigError, match=r"llm\.num_layerz"):
        load_config(tmp_path / "child.yaml")
    _write(tmp_path, "listy.yaml", "base: [a.yaml]\n")
    with pytest.raises(ConfigError, match="base: expected a preset file name"):
        load_config(tmp_path / "listy.yaml")


# The tiny policy of the synthetic RL task, written out: what the four RL presets said before they
# inherited it from rl_tiny_llm.yaml.
RL_TINY_LLM = LLMConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_heads=4, num_groups=2, num_layers=2,
                        max_seq_len=256, param_dtype="float32", dtype="float32", remat_policy="none")


@pytest.mark.parametrize("algo", ["reward", "dpo", "grpo", "ppo"])
def test_tiny_rl_presets_inherit_their_explicit_llm(algo):
    cfg = load_config(ROOT / f"configs/{algo}_tiny.yaml")
    assert cfg.llm == RL_TINY_LLM and cfg.mesh == MeshConfig()
    assert cfg.train.output_dir == f"runs/{algo}_tiny"  # the preset's own keys still apply


def test_sft_presets_inherit_the_llm_of_their_model_preset():
    assert load_config(ROOT / "configs/sft_tiny.yaml").llm == load_config(ROOT / "configs/tiny.yaml").llm
    released = load_config(ROOT / "configs/step_audio_editx.yaml")
    sft = load_config(ROOT / "configs/sft_step_audio_editx.yaml")
    assert sft.llm == LLMConfig(**{**vars(released.llm), "param_dtype": "float32",
                                   "remat_policy": "dots_with_no_batch_dims_saveable"})
    assert sft.generation == released.generation and sft.train.batch_size == 128
