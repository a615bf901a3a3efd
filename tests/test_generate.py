import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from editx_jax.config import GenerationConfig, LLMConfig
from editx_jax.generate import decode, sampling
from editx_jax.generate.decode import PromptTooLongError, from_padded, generate
from editx_jax.models import llm
from editx_jax.models.quantize import quantize_params

CFG = LLMConfig(vocab_size=256, hidden_size=48, intermediate_size=96, num_heads=6, num_groups=2, num_layers=2,
                max_seq_len=512)
GREEDY = GenerationConfig(greedy=True, max_new_tokens=10, max_length=512, repetition_window=0, drop_last=False,
                          min_prompt_bucket=16)


@pytest.fixture(scope="module")
def params():
    return llm.init_params(CFG, jax.random.key(7))


def prompts_of(lengths, seed=0):
    rng = np.random.RandomState(seed)
    return [list(map(int, rng.randint(4, 256, n))) for n in lengths]


def recompute_greedy(params, prompt, n):
    """Greedy without a cache: the whole sequence again for every token. The buffer has a fixed
    length (one compile); causality makes the unfilled tail irrelevant to position len(seq) - 1."""
    buf = np.zeros((1, len(prompt) + n), np.int32)
    buf[0, :len(prompt)] = prompt
    for t in range(len(prompt), len(prompt) + n):
        buf[0, t] = int(np.argmax(llm.forward(params, CFG, buf)[0, t - 1]))
    return list(buf[0, len(prompt):])


def test_cached_greedy_equals_full_recompute(params):
    prompt = prompts_of([9])[0]
    out = generate(params, CFG, GREEDY, [prompt], return_logits=True)
    assert out.tokens[0] == recompute_greedy(params, prompt, 10)
    assert out.logits.shape == (1, 10, 256)


def test_batch_rows_equal_each_prompt_alone(params):
    prompts = prompts_of([3, 17, 8, 12], seed=1)
    batch = generate(params, CFG, GREEDY, prompts).tokens
    for p, row in zip(prompts, batch):
        assert row == generate(params, CFG, GREEDY, [p]).tokens[0]


def test_left_and_right_padded_arrays(params):
    prompts = prompts_of([5, 9], seed=2)
    right = np.zeros((2, 9), np.int64)
    left = np.zeros((2, 9), np.int64)
    mask_r, mask_l = np.zeros((2, 9)), np.zeros((2, 9))
    for i, p in enumerate(prompts):
        right[i, :len(p)], mask_r[i, :len(p)] = p, 1
        left[i, 9 - len(p):], mask_l[i, 9 - len(p):] = p, 1
    assert from_padded(right, mask_r) == prompts == from_padded(left, mask_l)
    want = generate(params, CFG, GREEDY, prompts).tokens
    assert generate(params, CFG, GREEDY, from_padded(right, mask_r)).tokens == want


def test_lengths_in_one_bucket_do_not_recompile(params):
    generate(params, CFG, GREEDY, prompts_of([5]))
    jitted = (decode.prefill_jit(CFG, None), decode.decode_jit(CFG, GREEDY, None))
    before = [f._cache_size() for f in jitted]
    for n in (3, 7, 11, 16):
        generate(params, CFG, GREEDY, prompts_of([n], seed=n))
    assert [f._cache_size() for f in jitted] == before and min(before) >= 1


def test_cache_holds_the_prompt_bucket_plus_the_new_tokens_bucket(params, monkeypatch):
    slots = []
    make = decode.init_cache
    monkeypatch.setattr(decode, "init_cache", lambda cfg, batch, n: slots.append(n) or make(cfg, batch, n))
    prompt = prompts_of([20], seed=5)[0]  # bucket 32, and 10 new tokens' bucket 16: 48 slots, not 64
    out = generate(params, CFG, GREEDY, [prompt])
    assert slots == [48]
    assert out.tokens[0] == recompute_greedy(params, prompt, 10)
    assert decode.cache_length(32, 10, 40, 16) == 40  # never past max_length: the ring reuses the padding


def test_per_row_stop_on_eos_and_drop_last(params):
    prompts = prompts_of([6, 6], seed=3)
    free = generate(params, CFG, GREEDY, prompts).tokens
    # Make the first row's 4th token the EOS id by biasing the head: instead, pick eos = that token.
    eos = free[0][3]
    cfg = LLMConfig(**{**CFG.__dict__, "eos_id": eos})
    rows = generate(params, cfg, GREEDY, prompts).tokens
    assert rows[0] == free[0][:free[0].index(eos) + 1]
    if eos not in free[1]:
        assert rows[1] == free[1]
    dropped = generate(params, cfg, GenerationConfig(**{**GREEDY.__dict__, "drop_last": True}), prompts).tokens
    assert dropped[0] == rows[0][:-1]


def test_max_length_counts_the_prompt(params):
    gen = GenerationConfig(**{**GREEDY.__dict__, "max_length": 20, "max_new_tokens": 100})
    rows = generate(params, CFG, gen, prompts_of([15, 4], seed=4)).tokens
    assert [len(r) for r in rows[:1]] == [5]
    assert len(rows[1]) <= 16


def test_prompt_too_long_and_bad_ids(params):
    gen = GenerationConfig(**{**GREEDY.__dict__, "max_length": 8})
    with pytest.raises(PromptTooLongError, match="max_length"):
        generate(params, CFG, gen, prompts_of([8]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(params, CFG, GREEDY, [[1, 2, 300]])
    with pytest.raises(ValueError, match="at least one token"):
        generate(params, CFG, GREEDY, [[]])


def test_sampling_is_reproducible_with_a_key(params):
    gen = GenerationConfig(max_new_tokens=12, max_length=512, min_prompt_bucket=16)
    prompts = prompts_of([7, 4], seed=5)
    a = generate(params, CFG, gen, prompts, key=jax.random.key(3)).tokens
    b = generate(params, CFG, gen, prompts, key=jax.random.key(3)).tokens
    c = generate(params, CFG, gen, prompts, key=jax.random.key(4)).tokens
    assert a == b and a != c


def reference_repetition_rule(seq, logits, window=10, ratio=0.1):
    """The official processor, written plainly: per row over the whole sequence."""
    out = logits.copy()
    if len(seq) >= window:
        last = seq[-1]
        if seq[-window:].count(last) / window > ratio:
            out[last] = -np.inf
    return out


def test_repetition_rule_matches_the_official_processor():
    rng = np.random.RandomState(0)
    for trial in range(200):
        n = rng.randint(1, 16)
        seq = list(rng.randint(0, 6, n))
        logits = rng.randn(6).astype(np.float32)
        recent = np.full(10, -1, np.int32)
        tail = seq[-10:]
        recent[10 - len(tail):] = tail
        got = sampling.ban_repeats(jnp.asarray(logits[None]), jnp.asarray(recent[None]), jnp.asarray([n]), 10, 0.1)
        np.testing.assert_array_equal(np.asarray(got[0]), reference_repetition_rule(seq, logits))


def test_top_k_and_top_p_filters():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    assert np.isfinite(np.asarray(sampling.top_k_filter(logits, 2))).sum() == 2
    kept = np.isfinite(np.asarray(sampling.top_p_filter(logits, 0.7)))
    np.testing.assert_array_equal(kept[0], [True, True, False, False])
    kept = np.isfinite(np.asarray(sampling.top_p_filter(logits, 0.01)))
    np.testing.assert_array_equal(kept[0], [True, False, False, False])


def test_sample_honours_temperature_and_top_k():
    logits = jnp.asarray([[2.0, 1.0, 0.5, -1.0, -3.0]] * 4000)
    gen = GenerationConfig(temperature=0.7, top_k=2, repetition_window=0)
    ids = np.asarray(sampling.sample(logits, jax.random.key(0), gen))
    assert set(np.unique(ids)) <= {0, 1}
    p0 = 1 / (1 + np.exp((1.0 - 2.0) / 0.7))
    assert abs((ids == 0).mean() - p0) < 0.03


BF16 = dataclasses.replace(CFG, param_dtype="bfloat16", dtype="bfloat16")


def test_inference_form_is_invisible_and_bit_exact():
    """The inference form (one tree per layer): the same ids and logits as the stacked tree, and
    the stacked tree back bit for bit. Views (`transpose=False`) are the stacks' own memory; on
    one CPU the default form holds each layer kernel transposed (`kernel_t`), a copy."""
    floats = llm.init_params(BF16, jax.random.key(3))
    kernel = np.asarray(floats["layers"]["mlp"]["up_proj"]["kernel"])
    views = llm.split_layers(dict(floats), transpose=False)
    assert isinstance(views["layers"], tuple) and len(views["layers"]) == BF16.num_layers
    assert views["layers"][1]["mlp"]["up_proj"]["kernel"].shape == kernel.shape[1:]
    assert "layers" in floats and not isinstance(floats["layers"], tuple)  # the caller's stacks untouched
    # on one CPU device the layer slices are the stack's own memory (splitting allocates nothing)
    stack_kernel = floats["layers"]["mlp"]["up_proj"]["kernel"]
    piece = views["layers"][1]["mlp"]["up_proj"]["kernel"]
    assert piece.unsafe_buffer_pointer() == stack_kernel.unsafe_buffer_pointer() + piece.nbytes
    prompts = prompts_of([7, 12])
    a = generate(floats, BF16, GREEDY, prompts, return_logits=True)
    b = generate(views, BF16, GREEDY, prompts, return_logits=True)
    assert a.tokens == b.tokens
    np.testing.assert_array_equal(a.logits, b.logits)
    host = jax.tree_util.tree_map(np.asarray, floats)
    stack = host["layers"]["mlp"]["up_proj"]["kernel"]
    assert np.shares_memory(llm.split_layers(host, transpose=False)["layers"][1]["mlp"]["up_proj"]["kernel"], stack)

    transposed = llm.split_layers(dict(floats))
    layer = transposed["layers"][1]
    assert "kernel" not in layer["mlp"]["up_proj"]
    np.testing.assert_array_equal(np.asarray(layer["mlp"]["up_proj"]["kernel_t"]).view(np.uint16),
                                  kernel[1].T.view(np.uint16))
    np.testing.assert_array_equal(np.asarray(transposed["lm_head"]["kernel_t"]).view(np.uint16),
                                  np.asarray(floats["lm_head"]["kernel"]).T.view(np.uint16))
    o_proj = np.asarray(floats["layers"]["attn"]["o_proj"]["kernel"])[1]  # [H, D, E]: two input axes
    np.testing.assert_array_equal(np.asarray(layer["attn"]["o_proj"]["kernel_t"]).view(np.uint16),
                                  np.moveaxis(o_proj, -1, 0).view(np.uint16))
    for form in (views, transposed):
        for host_copy in (False, True):
            back = llm.stack_layers(form, host=host_copy)
            for want, got in zip(jax.tree_util.tree_leaves(floats), jax.tree_util.tree_leaves(back)):
                assert got.dtype == want.dtype and got.shape == want.shape
                np.testing.assert_array_equal(np.asarray(got).view(np.uint16), np.asarray(want).view(np.uint16))


def test_transposed_kernels_generate_what_the_stacked_tree_does():
    """float32 and int8 weights: the transposed inference form samples the same ids, and its logits
    differ from the stacked tree's by float summation order only."""
    prompts = prompts_of([7, 12])
    int8, int8_cfg = quantize_params(llm.init_params(CFG, jax.random.key(4)), CFG, "int8")
    for cfg, params in ((CFG, llm.init_params(CFG, jax.random.key(4))), (int8_cfg, int8)):
        a = generate(params, cfg, GREEDY, prompts, return_logits=True)
        b = generate(llm.split_layers(dict(params)), cfg, GREEDY, prompts, return_logits=True)
        assert a.tokens == b.tokens
        np.testing.assert_allclose(b.logits, a.logits, rtol=1e-5, atol=1e-5)


def test_inference_form_keeps_one_layer_of_temporaries():
    """bfloat16 weights are widened to float32 a layer at a time: prefill and decode hold about one
    layer's float32 copy (here 1/8 of the stack's bytes), never the whole stack's (XLA could hoist
    the loop-invariant widening out of the decode loop; it must not)."""
    cfg = LLMConfig(vocab_size=512, hidden_size=256, intermediate_size=1024, num_heads=4, num_groups=2,
                    num_layers=8, max_seq_len=512, param_dtype="bfloat16", dtype="float32")
    params = llm.split_layers(llm.abstract_params(cfg))
    stack = sum(x.size * 2 for layer in params["layers"] for x in jax.tree_util.tree_leaves(layer) if x.ndim > 1)
    cache = jax.eval_shape(lambda: llm.init_cache(cfg, 1, 64))
    ids = jax.ShapeDtypeStruct((1, 32), jnp.int32)
    temp = decode.prefill_jit(cfg, None).lower(params, ids, ids, cache).compile().memory_analysis().temp_size_in_bytes
    assert temp < stack / 2, (temp, stack)
    temp = _decode_temp_bytes(cfg, params)
    assert temp < stack / 2, (temp, stack)


def _decode_temp_bytes(cfg, params) -> int:
    """Compile-time temporaries of one-row greedy decode over a 64-slot cache (nothing allocated)."""
    state = jax.eval_shape(lambda: decode.initial_state(cfg, llm.init_cache(cfg, 1, 64), jnp.zeros((1, cfg.vocab_size)),
                                                        jnp.zeros((1, 4), jnp.int32), jnp.ones((1,), jnp.int32),
                                                        jnp.ones((1,), jnp.int32), 16))
    rows = jax.ShapeDtypeStruct((1,), jnp.int32)
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), 1))
    return decode.decode_jit(cfg, GREEDY, None).lower(params, state, keys, rows, scalar,
                                                      scalar).compile().memory_analysis().temp_size_in_bytes


def test_long_prompt_prefill_in_query_blocks_equals_the_full_forward():
    """A prompt longer than PREFILL_QUERY_BLOCK is prefilled in query blocks (a loop) and its logits
    come from the lm_head in column blocks: the first step's logits are the plain forward's."""
    cfg = dataclasses.replace(CFG, max_seq_len=2048)
    gen = dataclasses.replace(GREEDY, max_length=2048, max_new_tokens=2)
    params = llm.init_params(cfg, jax.random.key(5))
    prompt = prompts_of([3 * llm.PREFILL_QUERY_BLOCK // 2 + 5], seed=4)[0]  # bucket 1024: 2 query blocks
    out = generate(params, cfg, gen, [prompt], return_logits=True)
    full = llm.forward(params, cfg, np.asarray([prompt], np.int32))[0, -1]
    np.testing.assert_allclose(out.logits[0, 0], full, atol=2e-5, rtol=2e-5)


def test_decode_widens_one_lm_head_block_at_a_time():
    """The lm_head of bfloat16 bits is widened a column block at a time: decode's temporaries stay
    well under the float32 copy of the whole [E, V] table."""
    cfg = LLMConfig(vocab_size=32768, hidden_size=256, intermediate_size=512, num_heads=4, num_groups=2, num_layers=2,
                    max_seq_len=512, param_dtype="bfloat16", dtype="float32")
    params = llm.split_layers(llm.abstract_params(cfg))
    head = 4 * cfg.hidden_size * cfg.vocab_size
    temp = _decode_temp_bytes(cfg, params)
    assert temp < head / 2, (temp, head)


def test_progress_runs_the_loop_in_legs_with_the_same_tokens(params, monkeypatch):
    """With a progress callback the decode loop runs PROGRESS_STEPS at a time, resumed where it
    stopped (no recompile: the step limit is traced): the same tokens and logits as one run."""
    prompts = prompts_of([5, 11], seed=6)
    whole = generate(params, CFG, GREEDY, prompts, return_logits=True)
    monkeypatch.setattr(decode, "PROGRESS_STEPS", 3)
    calls = []
    legs = generate(params, CFG, GREEDY, prompts, return_logits=True, progress=lambda *a: calls.append(a))
    assert calls == [(3, 10), (6, 10), (9, 10), (10, 10)]
    assert legs.tokens == whole.tokens
    np.testing.assert_array_equal(legs.logits, whole.logits)
