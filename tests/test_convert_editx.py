"""tools/convert.py editx: the two released folders (fakes in the official names) -> one model folder."""

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import AUDIO, ROOT
from reference_models import write_step_audio_tokenizer
from test_convert_llm import hf_config, random_state, write_release
from test_token2wav import SMALL_HIFT, _write_released_folder, small_flow_config

from editx_jax.config import LLMConfig
from editx_jax.convert.editx import convert_editx
from editx_jax.decoder import flow, hift
from editx_jax.decoder.token2wav import Decoder
from editx_jax.pipeline import EditX
from editx_jax.random_init import random_params
from editx_jax.text.prompts import build_edit_ids
from editx_jax.text.tiny import train_layout_model
from editx_jax.text.tokenizer import TextTokenizer

# architecture.md §1.6: the released file's keys (its chat_template shortened); no add_bos_token key
RELEASED_TOKENIZER_CONFIG = {"tokenizer_class": "LlamaTokenizer", "legacy": False, "bos_token": "<s>",
                             "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>",
                             "model_max_length": 65536, "padding_side": "left", "clean_up_tokenization_spaces": False,
                             "use_default_system_prompt": False, "chat_template": "{{ bos_token }}"}
LLM = LLMConfig(vocab_size=74752, hidden_size=32, intermediate_size=64, num_heads=4, num_groups=2, num_layers=1)


@pytest.mark.slow
def test_convert_editx_then_edit(tmp_path):
    editx = write_release(tmp_path / "Step-Audio-EditX", random_state(LLM), hf_config(LLM))
    (editx / "tokenizer.model").write_bytes(train_layout_model())
    (editx / "tokenizer_config.json").write_text(json.dumps(RELEASED_TOKENIZER_CONFIG))
    cfg = small_flow_config()
    decoder = Decoder(random_params(flow.abstract_params(cfg), 1), cfg,
                      random_params(hift.abstract_params(SMALL_HIFT), 3, kernel_scale=0.3), SMALL_HIFT)
    _write_released_folder(editx / "CosyVoice-300M-25Hz", decoder)
    tokenizer = write_step_audio_tokenizer(tmp_path / "Step-Audio-Tokenizer")

    dst = tmp_path / "model"
    proc = subprocess.run([sys.executable, str(ROOT / "tools/convert.py"), "editx", str(editx), str(dst),
                           "--tokenizer", str(tokenizer), "--quiet", "--dtype", "float32"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert not list(tmp_path.glob(".model.partial"))
    model = EditX.from_pretrained(dst, max_new_tokens=10)
    assert model.config.llm.hidden_size == 32 and model.config.flow == cfg
    wave, sr = model.edit(str(AUDIO / "espeak_en_16k_a.wav"), "hello", "emotion", "happy")
    assert sr == 24000 and len(wave) % 2880 == 0 and np.all(np.isfinite(wave))
    # the released config has no add_bos_token key: HF's default, BOS before every segment (inner BOS)
    assert json.loads((dst / "tokenizer_config.json").read_text()) == RELEASED_TOKENIZER_CONFIG
    audio = [65536 + 7] * 10
    assert build_edit_ids(model.text_tokenizer, "emotion", "happy", "hi", audio).count(1) == 5

    # a release whose tokenizer_config.json turns add_bos_token off gives prompts without inner BOS
    (editx / "tokenizer_config.json").write_text(json.dumps({**RELEASED_TOKENIZER_CONFIG, "add_bos_token": False}))
    convert_editx(editx, tmp_path / "model_no_bos", tokenizer, progress=False, dtype="float32")
    plain = TextTokenizer.from_pretrained(tmp_path / "model_no_bos" / "tokenizer.model")
    ids = build_edit_ids(plain, "emotion", "happy", "hi", audio)
    assert ids.count(1) == 1 and ids[:3] == [1, 4, plain.encode("system\n")[0]]
    (editx / "tokenizer_config.json").write_text(json.dumps({**RELEASED_TOKENIZER_CONFIG, "legacy": True}))
    legacy = subprocess.run([sys.executable, str(ROOT / "tools/convert.py"), "editx", str(editx),
                             str(tmp_path / "legacy"), "--tokenizer", str(tokenizer)], capture_output=True, text=True,
                            cwd=ROOT)
    assert legacy.returncode == 1 and "non-legacy" in legacy.stderr and legacy.stderr.count("\n") == 1
    assert not (tmp_path / "legacy").exists()
    (editx / "tokenizer_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer_config.json"):
        convert_editx(editx, tmp_path / "model_none", tokenizer, progress=False)
    (editx / "tokenizer_config.json").write_text(json.dumps(RELEASED_TOKENIZER_CONFIG))

    again = subprocess.run([sys.executable, str(ROOT / "tools/convert.py"), "editx", str(editx), str(dst),
                            "--tokenizer", str(tokenizer)], capture_output=True, text=True, cwd=ROOT)
    assert again.returncode == 1 and "not empty" in again.stderr and again.stderr.count("\n") == 1
    missing = subprocess.run([sys.executable, str(ROOT / "tools/convert.py"), "editx", str(editx),
                              str(tmp_path / "other")], capture_output=True, text=True, cwd=ROOT)
    assert missing.returncode == 1 and "--tokenizer" in missing.stderr
