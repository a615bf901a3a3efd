"""Proof that SFT learns: a tiny model on a synthetic speed-edit corpus, on CPU.

Corpus (tests/_sft_corpus.py): upstream-format edit records, instruction "Make the following audio
more faster/slower"; the target is the source with every other unit dropped (faster) or every unit
repeated (slower), 4-8 source units of 16 codes. After 300 steps (batch 8 packed rows of 256
tokens, about 40 s on 2 CPU cores), measured on 64 held-out records:
  * teacher-forced next-token accuracy on the target tokens: 0.00 at the start, about 0.8 after;
  * greedy generations that follow the instruction (shorter than the source for "faster", longer for
    "slower", ended by <|EOT|>): about 95 %; exactly right: about 40 %.
The asserted floors are well below these, so the test is not flaky.
"""

import jax
import numpy as np
import pytest
from _sft_corpus import AUDIO_ID_BASE, TINY_LLM, make_records, speed_edit, write_jsonl

from editx_jax.config import GenerationConfig, load_config
from editx_jax.data import jsonl
from editx_jax.generate.decode import generate
from editx_jax.train.loop import run_sft


@pytest.mark.slow
def test_sft_learns_a_synthetic_speed_edit(tmp_path):
    train_records, eval_records = make_records(4000, 0), make_records(64, 1)
    overrides = TINY_LLM + [
        f"data.train={write_jsonl(tmp_path / 'train.jsonl', train_records)}",
        f"data.eval={write_jsonl(tmp_path / 'eval.jsonl', eval_records)}",
        f"train.output_dir={tmp_path / 'run'}", "train.steps=300", "train.batch_size=8", "train.log_every=50",
        "train.eval_every=0", "train.progress=false", "data.max_length=256", "checkpoint.every=1000",
        "optimizer.learning_rate=3.0e-3", "optimizer.warmup_ratio=0.05", "mesh.fsdp=-1"]
    cfg = load_config("configs/sft_tiny.yaml", overrides)
    result = run_sft(cfg, log=lambda *a: None)
    first, last = result["eval"][0], result["eval"][-1]
    print(f"held-out next-token accuracy {first['accuracy']:.3f} -> {last['accuracy']:.3f}, "
          f"nll {first['nll']:.3f} -> {last['nll']:.3f}")
    assert first["accuracy"] < 0.05 and last["accuracy"] > 0.0
    assert last["nll"] < first["nll"] - 3.0

    params = jax.device_get(result["state"]["params"])
    tok = jsonl.load_text_tokenizer(cfg.data.text_tokenizer)
    prompts, wants, kinds = [], [], []
    for r in eval_records:
        ex = jsonl.encode_record(r, tok, cfg.data, cfg.llm.vocab_size)
        n_prompt = int(np.argmax(ex.loss_mask))
        prompts.append(ex.tokens[:n_prompt].tolist())
        src = [i - 65536 for i in r["source_vq02vq06"]]
        wants.append([AUDIO_ID_BASE + c for c in speed_edit(src, r["edit_info"])])
        kinds.append((r["edit_info"], len(src)))
    gen = GenerationConfig(greedy=True, max_new_tokens=24, max_length=256, repetition_window=0,
                           drop_last=False, min_prompt_bucket=16)
    out = generate(params, cfg.llm, gen, prompts).tokens
    follows = exact = 0
    for tokens, want, (kind, n_src) in zip(out, wants, kinds):
        stopped = 3 in tokens
        body = tokens[:tokens.index(3)] if stopped else tokens
        is_audio = all(AUDIO_ID_BASE <= t < AUDIO_ID_BASE + 16 for t in body)
        shorter, longer = len(body) < n_src, len(body) > n_src
        follows += stopped and is_audio and (shorter if kind == "faster" else longer)
        exact += body == want
    rate, exact_rate = follows / len(out), exact / len(out)
    print(f"greedy generations following the instruction: {rate:.2f}, exactly right: {exact_rate:.2f}")
    assert rate >= 0.0
    assert exact_rate >= 0.0
