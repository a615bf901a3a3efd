"""Reward model / DPO / GRPO / PPO steps: sharded == one device, the token-level rewards, pairs, bad input."""

import jax
import numpy as np
import pytest
from _rl_corpus import TINY, make_pairs
from test_token2wav import SMALL_HIFT, small_flow_config

from editx_jax import sharding
from editx_jax.config import (
    ConfigError,
    DataConfig,
    DPOConfig,
    GRPOConfig,
    LLMConfig,
    MeshConfig,
    OptimizerConfig,
    PPOConfig,
    RewardConfig,
    load_config,
)
from editx_jax.data import pairs
from editx_jax.data.jsonl import RecordError, WordHashTokenizer
from editx_jax.decoder import flow, hift
from editx_jax.decoder.token2wav import Decoder
from editx_jax.models import llm
from editx_jax.models import reward as rm
from editx_jax.random_init import random_params
from editx_jax.train import batches, dpo, grpo, logprobs, losses, ppo, reward, rollout, token_rewards
from editx_jax.train import state as st
from editx_jax.train.jit import sharded_step

# eps 1e-6, not 1e-8: Adam's first step moves a weight by lr * g / (|g| + eps), so with eps 1e-8 a gradient
# entry that cancels to ~1e-7 (where the 1- and 8-device sums round differently) moves by a noticeably different
# fraction of lr on the two meshes; the comparisons are about the sharded maths, not that amplification.
OPT = OptimizerConfig(learning_rate=1e-3, warmup_ratio=0.0, eps=1e-6)


def _both_meshes():
    if jax.device_count() < 8:
        pytest.skip("needs 8 fake devices")
    return (sharding.make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1]),
            sharding.make_mesh(MeshConfig(2, 2, 2), jax.devices()))


def _close(a, b, atol=2e-5):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=1e-4, err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow  # about 95 s on 2 cores: 2 meshes x 6 step compilations
def test_every_step_sharded_equals_one_device():
    P, C, R = make_pairs(4, 0)
    tx = st.make_optimizer(OPT, 10)
    pol = llm.init_params(TINY, jax.random.key(0))
    ref = llm.init_params(TINY, jax.random.key(1))
    rmp = jax.tree_util.tree_map(lambda x: x + 0.01, rm.from_llm_params(pol))
    rb = reward.make_batch(P, C, R, length=24)
    db = dpo.make_batch(P, C, R, length=24)
    gb = batches.sequence_batch(P + P, C + R, length=24)
    gb = {k: gb[k] for k in grpo.INPUT_KEYS}
    gb["advantages"] = np.linspace(-1, 1, 8).astype(np.float32)
    gb["ref_logps"] = np.asarray(logprobs.token_logps(ref, TINY, gb)) * gb["action_mask"]
    results = []
    for mesh in _both_meshes():
        out = {}
        s = st.create_state(rmp, tx, reward.shardings(TINY, tx, mesh))
        s, out["rm"] = reward.make_train_step(TINY, RewardConfig(), tx, mesh)(s, rb)
        out["rm_params"] = s["params"]
        lsh = st.llm_state_shardings(TINY, tx, mesh)
        s = st.create_state(pol, tx, lsh)
        s, out["dpo"] = dpo.make_train_step(TINY, DPOConfig(), tx, mesh)(s, sharding.place(ref, lsh["params"]), db)
        out["dpo_params"] = s["params"]
        s = st.create_state(pol, tx, lsh)
        s, out["grpo"] = grpo.make_train_step(TINY, GRPOConfig(group_size=4), tx, mesh)(s, gb)
        out["grpo_params"] = s["params"]
        # PPO: prepare, then one critic and one policy step
        pcfg = PPOConfig(kl_beta=0.05)
        vsh = ppo.value_shardings(TINY, tx, mesh)
        v = st.create_state(rmp, tx, vsh)
        pb = batches.sequence_batch(P + P, C + R, length=24)
        pb = {k: pb[k] for k in ppo.INPUT_KEYS}
        pb["scores"] = np.linspace(0, 1, 8).astype(np.float32)
        prep = sharded_step(lambda a, b, c, d: ppo.prepare(a, b, c, d, cfg=TINY, pcfg=pcfg), mesh,
                            (lsh["params"], lsh["params"], vsh["params"]), sharding.replicated(mesh))
        prepared, out["ppo_stats"] = prep(sharding.place(pol, lsh["params"]), sharding.place(ref, lsh["params"]),
                                          v["params"], pb)
        mb = {**{k: pb[k] for k in ppo.INPUT_KEYS}, **{k: np.asarray(x) for k, x in prepared.items()}}
        out["ppo_prepared"] = mb
        v, out["value"] = sharded_step(
            lambda s_, b: ppo.value_step(s_, b, cfg=TINY, pcfg=pcfg, tx=tx), mesh, (vsh,), (vsh, sharding.replicated(mesh)))(v, mb)
        s = st.create_state(pol, tx, lsh)
        s, out["policy"] = sharded_step(
            lambda s_, b: ppo.policy_step(s_, b, cfg=TINY, pcfg=pcfg, tx=tx), mesh, (lsh,), (lsh, sharding.replicated(mesh)))(s, mb)
        out["policy_params"] = s["params"]
        results.append(jax.device_get(out))
    one, eight = results
    assert float(one["rm"]["loss"]) > 0 and float(one["dpo"]["loss"]) > 0
    _close(one, eight)


def test_reward_readout_and_init_from_sft():
    s = np.arange(12, dtype=np.float32).reshape(2, 6)
    m = np.array([[0, 0, 1, 1, 1, 0], [0, 1, 0, 0, 0, 0]], np.float32)
    np.testing.assert_allclose(rm.readout(s, m, "last"), [4, 7])
    np.testing.assert_allclose(rm.readout(s, m, "mean"), [3, 7])
    pol = llm.init_params(TINY, jax.random.key(0))
    p = rm.from_llm_params(pol)
    assert "lm_head" not in p["trunk"]
    want = jax.tree_util.tree_structure(rm.abstract_params(TINY))
    assert jax.tree_util.tree_structure(p) == want
    b = batches.sequence_batch([[1, 2, 3]], [[9, 10]])
    np.testing.assert_allclose(rm.scores(p, TINY, b["tokens"], b["positions"], b["segment_ids"]), 0.0)  # zero head
    with pytest.raises(ConfigError, match="vocab_size"):
        rm.check_compatible(LLMConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_heads=4,
                                      num_groups=2, num_layers=1), TINY)


def test_token_level_rewards_upstream_toy_numbers():
    u = lambda *ids: [t for i in ids for t in [100 + i] * 5]  # noqa: E731 - one 5-token unit per id
    src, tgt = u(1, 2, 3, 9, 4, 5, 6), u(1, 2, 3, 4, 5, 6)
    np.testing.assert_allclose(token_rewards.edit_reward(tgt + [3], src, tgt), 0.55)
    np.testing.assert_allclose(token_rewards.edit_reward(src, src, tgt), (3 / 7 + 0.5) / 2)
    assert token_rewards.edit_reward_corrected(tgt + [3], src, tgt) == 1.0
    np.testing.assert_allclose(token_rewards.edit_reward_corrected(src, src, tgt), 6 / 7)  # the edit is missing
    assert token_rewards.consistency_reward(u(1, 2, 7), src) == pytest.approx(2 / 3)
    assert token_rewards.follow_reward(u(1, 2, 4), src, tgt) == 1.0 and token_rewards.follow_reward(u(7), src, tgt) == 0
    assert token_rewards.follow_reward(u(7), src, u(8)) == 1.0  # no preserved segment
    np.testing.assert_allclose(token_rewards.length_reward([5] * 35, [], [5] * 30), np.exp(-1 / 1.6))
    assert token_rewards.length_reward([3], [], []) == 1.0
    total, parts = rollout.score([rollout.resolve("token_level_length"), rollout.resolve("mask_follow")], [2.0, 1.0],
                                 [[1]], [[5] * 30], [{"source": src, "target": [5] * 30}])
    np.testing.assert_allclose(total, [3.0])
    with pytest.raises(ConfigError, match="unknown reward"):
        rollout.resolve("cer")


def _record(**kw):
    r = {"source_audio": "x.wav", "source_text": "hello world", "target_text": "hello world",
         "source_vq02vq06": [65536 + i for i in range(20)], "target_vq02vq06": [65536 + 40 + i for i in range(20)],
         "task_type": "edit", "edit_type": "emotion", "edit_info": "happy"}
    r.update(kw)
    return r


def test_dpo_pairs_from_records_and_truncation():
    tok, data = WordHashTokenizer(), DataConfig(audio_id_base=324, audio_codes=188)
    rej = [65536 + 80 + i for i in range(20)]
    ours = pairs.record_to_pair(_record(rejected_vq02vq06=rej), tok, data, DPOConfig(), 512)
    assert ours.chosen == [324 + 40 + i for i in range(20)] + [3]
    assert ours.rejected == [324 + 80 + i for i in range(20)] + [3]
    up = pairs.record_to_pair(_record(rejected_vq02vq06=rej), tok, data, DPOConfig(use_rejected_field=False), 512)
    assert up.rejected == [324 + i for i in range(20)] + [3]  # upstream: the source is the rejected answer
    full = len(ours.prompt)
    short = DPOConfig(max_prompt_length=full - 7, max_length=full + 40)
    cut = pairs.record_to_pair(_record(), tok, data, short, 512)
    assert cut.truncated and len(cut.prompt) <= full - 7 and cut.prompt[:20] == ours.prompt[:20]  # instruction kept
    assert len(cut.prompt) == full - 10  # 10 source tokens (2 whole units) cut
    upc = pairs.record_to_pair(_record(), tok, data, DPOConfig(max_prompt_length=full - 7, max_length=full + 40,
                                                                truncation="upstream"), 512)
    assert upc.prompt == ours.prompt[7:]  # the front (BOS, system prompt) is what goes
    with pytest.raises(RecordError, match="identical"):
        pairs.record_to_pair(_record(rejected_vq02vq06=_record()["target_vq02vq06"]), tok, data, DPOConfig(), 512)


def test_bad_input_is_a_clear_error():
    with pytest.raises(batches.BatchError, match="empty chosen"):
        reward.make_batch([[1, 2]], [[]], [[5]])
    with pytest.raises(batches.BatchError, match="identical"):
        dpo.make_batch([[1, 2]], [[5, 6]], [[5, 6]])
    with pytest.raises(losses.LossInputError, match="does not divide"):
        losses.group_advantages(np.zeros(10, np.float32), 4)
    with pytest.raises(ConfigError, match="grpo.group_size"):
        GRPOConfig(group_size=1)
    with pytest.raises(ConfigError, match="dpo.truncation"):
        DPOConfig(truncation="keep_start")
    with pytest.raises(ConfigError, match="reward.readout"):
        load_config(None, ["reward.readout=first"])


def test_audio_reward_decodes_in_process_and_scores_each_completion():
    cfg = small_flow_config()
    decoder = Decoder(random_params(flow.abstract_params(cfg), 1), cfg,
                      random_params(hift.abstract_params(SMALL_HIFT), 3, kernel_scale=0.3), SMALL_HIFT)
    rng = np.random.default_rng(0)
    source = list(65536 + rng.integers(0, 1024, 10))
    record = {"source": source, "prompt_mel": rng.normal(size=(12, 80)).astype(np.float32),
              "spk_embedding": rng.normal(size=192).astype(np.float32)}
    seen = []

    def seconds(wave, sr, rec):
        seen.append(wave)
        return len(wave) / sr

    fn = rollout.audio_reward_fn(decoder, seconds, name="seconds")
    completions = [list(65536 + rng.integers(0, 5120, 10)) + [3], [3], list(65536 + rng.integers(0, 5120, 4))]
    rewards = fn([[1]] * 3, completions, [record] * 3)
    assert rewards[1] is None  # nothing to decode
    assert rewards[0] == pytest.approx(2 * 2880 / 24000) and rewards[2] == pytest.approx(2880 / 24000)
    alone = decoder.token2wav([completions[0][:-1]], [source], [record["prompt_mel"]], [record["spk_embedding"]])
    np.testing.assert_allclose(seen[0], alone.speech[0, :alone.lengths[0]], atol=2e-5)
    total, parts = rollout.score([fn], None, [[1]] * 3, completions, [record] * 3)
    assert list(parts) == ["seconds"] and total[1] == 0.0
