"""train.py --algo reward|dpo|grpo|ppo: one short run each on the tiny synthetic task (metrics.jsonl, a
checkpoint, held-out metrics, plots), resume, --init-from an earlier run, bad input.

Also a script that writes the synthetic data the configs/{reward,dpo,grpo,ppo}_tiny.yaml presets read:
    python tests/test_train_rl_cli.py data/rl_tiny
"""

import json
import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _rl_corpus import edit, make_pairs, make_prompts, prompt_ids  # noqa: E402

from editx_jax.config import load_config  # noqa: E402
from editx_jax.data.dataset import epoch_indices  # noqa: E402
from editx_jax.data.jsonl import RecordError  # noqa: E402
from editx_jax.data.records import read_prompt_records  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
import plot_metrics  # noqa: E402  (tools/plot_metrics.py, importable once tools/ is on the path)
import train  # noqa: E402

# the two full CLI chains take 12-40 s each on 2 cores (8 fake devices: every step and the sampler compile sharded)
slow = pytest.mark.slow


def write_synthetic(folder, n_train=4096, n_eval=128) -> dict:
    """pairs_{train,eval}.jsonl (token-level preference pairs) and prompts_{train,eval}.jsonl (prompts
    with the source / target units the token-level rewards read)."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, n, seed in (("train", n_train, 0), ("eval", n_eval, 1)):
        P, C, R = make_pairs(n, seed)
        paths[f"pairs_{split}"] = folder / f"pairs_{split}.jsonl"
        paths[f"pairs_{split}"].write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n"
                                                   for p, c, r in zip(P, C, R)))
        lines = []
        for instr, src in make_prompts(n, seed + 10, lengths=(5, 8)):
            p = prompt_ids(instr, src)
            # the token-level rewards compare 5-token units: the units are repeated as in the GRPO test
            lines.append(json.dumps({"prompt": p, "source": list(src) * 2, "target": edit(src, instr) * 2}))
        paths[f"prompts_{split}"] = folder / f"prompts_{split}.jsonl"
        paths[f"prompts_{split}"].write_text("\n".join(lines) + "\n")
    return {k: str(v) for k, v in paths.items()}


def _main(algo, data, out, *extra, steps=2, flags=()):
    train_file, eval_file = (data["pairs_train"], data["pairs_eval"]) if algo in ("reward", "dpo") else \
        (data["prompts_train"], data["prompts_eval"])
    sets = [f"data.train={train_file}", f"data.eval={eval_file}", f"train.output_dir={out}", f"train.steps={steps}",
            "train.progress=false", "train.log_every=1", "checkpoint.every=2", "mesh.fsdp=-1", *extra]
    return train.main(["--algo", algo, "--config", str(ROOT / f"configs/{algo}_tiny.yaml"), *flags]
                      + [f"--set={s}" for s in sets])


def _rows(out):
    return [json.loads(line) for line in (pathlib.Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("rl_data"), n_train=64, n_eval=16)


def _check_run(out, algo, want_train, want_eval):
    rows = _rows(out)
    train_rows = [r for r in rows if r["split"] == "train"]
    eval_rows = [r for r in rows if r["split"] == "eval"]
    assert [r["step"] for r in train_rows] == [1, 2], algo
    for key in want_train:
        assert key in train_rows[-1], (algo, key, sorted(train_rows[-1]))
    assert [r["step"] for r in eval_rows] == [0, 2] and want_eval in eval_rows[-1], (algo, eval_rows)
    assert (pathlib.Path(out) / "checkpoints" / "2").is_dir()
    assert json.loads((pathlib.Path(out) / "run_config.json").read_text())["algo"] == algo
    pngs = plot_metrics.plot(out)
    assert any(p.name == f"eval_{want_eval.replace('/', '_')}.png" for p in pngs)


@slow
def test_reward_then_ppo_with_the_reward_model_then_resume(data, tmp_path):
    """The reward run's checkpoint is PPO's reward and critic start; PPO resumes from its checkpoint."""
    rm_out = tmp_path / "rm"
    assert _main("reward", data, rm_out, "train.batch_size=8") == 0
    _check_run(rm_out, "reward", ("loss", "accuracy", "margin", "grad_norm"), "accuracy")
    ppo_out = tmp_path / "ppo"
    assert _main("ppo", data, ppo_out, "train.batch_size=8", "ppo.minibatches=1", "ppo.epochs=1",
                 "ppo.critic_warmup=1", flags=("--reward-model", str(rm_out))) == 0
    _check_run(ppo_out, "ppo", ("reward_mean", "kl", "clip_fraction", "value_loss", "explained_variance",
                                "response_length", "entropy", "reward/reward_model"), "reward_mean")
    assert _main("ppo", data, ppo_out, "train.batch_size=8", "ppo.minibatches=1", "ppo.epochs=1",
                 "ppo.critic_warmup=1", steps=3, flags=("--reward-model", str(rm_out), "--resume")) == 0
    assert [r["step"] for r in _rows(ppo_out) if r["split"] == "train"] == [1, 2, 3]
    assert (ppo_out / "checkpoints" / "3").is_dir()


@slow
def test_dpo_and_grpo_from_an_earlier_run(data, tmp_path):
    """DPO from scratch, then GRPO --init-from the DPO run folder (its policy), with the token-level rewards."""
    dpo_out = tmp_path / "dpo"
    assert _main("dpo", data, dpo_out, "train.batch_size=8") == 0
    _check_run(dpo_out, "dpo", ("loss", "reward_accuracy", "reward_margin"), "reward_accuracy")
    g_out = tmp_path / "grpo"
    assert _main("grpo", data, g_out, "train.batch_size=2", "grpo.group_size=4", "grpo.max_new_tokens=8",
                 flags=("--init-from", str(dpo_out))) == 0
    _check_run(g_out, "grpo", ("loss", "reward_mean", "kl", "completion_length", "reward/token_level_edit"),
               "reward/token_level_length")


def test_rl_cli_bad_input_is_a_clear_error(data, tmp_path, capsys):
    # PPO without any reward
    assert _main("ppo", data, tmp_path / "a", "train.batch_size=8") == 1
    assert "needs a reward" in capsys.readouterr().err
    # a group that does not divide over the 8 batch shards
    assert _main("grpo", data, tmp_path / "b", "train.batch_size=1", "grpo.group_size=4") == 1
    assert "divide" in capsys.readouterr().err
    # a reward model whose trunk does not match the policy's vocabulary
    rm_out = tmp_path / "rm"
    assert _main("reward", data, rm_out, "train.batch_size=8", steps=1) == 0
    capsys.readouterr()
    assert _main("ppo", data, tmp_path / "c", "train.batch_size=8", "llm.vocab_size=128",
                 flags=("--reward-model", str(rm_out))) == 1
    assert "vocab_size (64 vs 128)" in capsys.readouterr().err


def test_epoch_indices_and_prompt_records(tmp_path):
    seen = np.concatenate([epoch_indices(10, 4, s, 0) for s in range(5)])
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))  # each once an epoch
    assert (epoch_indices(10, 4, 3, 0) == epoch_indices(10, 4, 3, 0)).all()  # a resume finds its place
    cfg = load_config(ROOT / "configs/grpo_tiny.yaml")
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": [1, 5, 7, 9, 7], "source": [9], "target": [17]}\n{"prompt": []}\n'
                    '{"prompt": [1, 99]}\nnot json\n')
    prompts, records, report = read_prompt_records(str(path), cfg)
    assert prompts == [[1, 5, 7, 9, 7]] and records == [{"source": [9], "target": [17]}]
    assert report.kept == 1 and sum(report.skipped.values()) == 3
    strict = load_config(ROOT / "configs/grpo_tiny.yaml", ["data.strict=true"])
    with pytest.raises(RecordError, match="empty prompt"):
        read_prompt_records(str(path), strict)


if __name__ == "__main__":
    for name, path in write_synthetic(sys.argv[1] if len(sys.argv) > 1 else "data/rl_tiny").items():
        print(f"{name}: {path}")
