"""Parity runners for the Step1 fixtures (step1_llm, step1_llm_decode)."""

import jax
import numpy as np

from editx_jax.config import GenerationConfig
from editx_jax.convert import keymap
from editx_jax.convert.llm import RULES, llm_config_from_hf
from editx_jax.generate.decode import generate
from editx_jax.models import llm


def _model(fx):
    cfg = llm_config_from_hf(fx.config, param_dtype="float32", dtype="float32")
    params = keymap.convert(keymap.DictSource(fx.weights()), RULES, llm.abstract_params(cfg))
    return cfg, jax.tree_util.tree_map(np.asarray, params)


def run_forward(fx):
    cfg, params = _model(fx)
    tokens = fx.inputs()["input_ids"]
    llm.check_token_ids(tokens, cfg)
    return {"logits": np.asarray(llm.forward(params, cfg, tokens))}


def run_greedy_decode(fx):
    """HF generate(max_new_tokens=call_args.max_new_tokens, do_sample=False): sequences, generated_ids,
    step_logits [n_new, B, vocab]."""
    cfg, params = _model(fx)
    prompt = fx.inputs()["input_ids"]
    n_new = int(fx.call_arg("max_new_tokens"))
    gen = GenerationConfig(greedy=True, max_new_tokens=n_new, max_length=prompt.shape[1] + n_new,
                           repetition_window=0, drop_last=False, top_k=0)
    out = generate(params, cfg, gen, [list(row) for row in prompt], return_logits=True)
    generated = np.asarray(out.tokens, np.int64)
    sequences = np.concatenate([prompt.astype(np.int64), generated], axis=1)
    return {"sequences": sequences, "generated_ids": generated,
            "step_logits": np.asarray(out.logits).transpose(1, 0, 2)}
