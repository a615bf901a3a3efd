"""editx-jax training entry point: SFT (default), the reward model, DPO, GRPO, PPO.

    python train.py --config configs/sft_tiny.yaml --set data.train=train.jsonl --set train.steps=200
    python train.py --algo reward --config configs/reward_tiny.yaml --init-from runs/sft_tiny
    python train.py --algo dpo --config configs/dpo_tiny.yaml --init-from runs/sft_tiny
    python train.py --algo grpo --config configs/grpo_tiny.yaml --init-from runs/sft_tiny
    python train.py --algo ppo --config configs/ppo_tiny.yaml --init-from runs/sft_tiny \
        --reward-model runs/reward_tiny                   # and/or --reward-fn token_level_edit ...
    python train.py --config configs/sft_step_audio_editx.yaml --init-from ckpt/llm --set data.train=...
    python train.py --config ... --resume                 # continue from the last checkpoint
    python train.py --config ... --export out/hf          # also write released-format safetensors
    python train.py --config ... --resume --export out/hf # export the last checkpoint of a finished run

Multi-host: every process runs the same command with `--coordinator HOST:PORT --num-processes N
--process-id I` (or the environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID); each reads its own share of the data, only process 0 writes logs.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

import jax
from jax.experimental import multihost_utils

from editx_jax.cli import check_output_dir
from editx_jax.compile_cache import enable_compile_cache
from editx_jax.config import ConfigError, add_config_args, load_config
from editx_jax.convert.llm import export_llm
from editx_jax.train import loop, runs
from editx_jax.train.peers import PeerWatchdog

# One line per algorithm: its wiring file's setup(cfg, ...) -> loop.Run (train/runs/<algo>.py).
RUNS = {
    "sft": runs.sft.setup,
    "reward": runs.reward.setup,
    "dpo": runs.dpo.setup,
    "grpo": runs.grpo.setup,
    "ppo": runs.ppo.setup,
}


def init_distributed(args, out_dir: str) -> PeerWatchdog | None:
    """`jax.distributed.initialize` when a coordinator is given (flag or environment), and the
    watchdog that ends this process with one clear line when another one dies."""
    address = args.coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if not address:
        return None
    num = args.num_processes if args.num_processes is not None else int(os.environ.get("JAX_NUM_PROCESSES", "1"))
    pid = args.process_id if args.process_id is not None else int(os.environ.get("JAX_PROCESS_ID", "0"))
    # A process that stops sending heartbeats (killed, hung host) is declared dead after this long, and
    # the coordination service then aborts the others instead of leaving them in a collective; our
    # watchdog reports it first, after half of it, with which process and where to resume.
    jax.distributed.initialize(coordinator_address=address, num_processes=num, process_id=pid,
                               heartbeat_timeout_seconds=args.heartbeat_timeout)
    print(f"process {jax.process_index()} of {jax.process_count()} (jax.distributed via {address})", flush=True)
    return PeerWatchdog.for_this_job(args.heartbeat_timeout / 2, lambda: resume_hint(pathlib.Path(out_dir))).start()


def resume_hint(out: pathlib.Path) -> str:
    step = loop.latest_step(out / "checkpoints")
    if step is None:
        return f"no checkpoint in {out} yet: the run must start again"
    return f"the run can be resumed with --resume from {out} (last complete checkpoint: step {step})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_config_args(parser, default="configs/sft_tiny.yaml")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in train.output_dir")
    parser.add_argument("--algo", choices=tuple(RUNS), default="sft",
                        help="what to train (default sft)")
    parser.add_argument("--init-from", metavar="DIR", help="start from a converted LLM checkpoint folder "
                        "(reward / dpo / grpo / ppo: also an SFT or RL run folder, its last checkpoint)")
    parser.add_argument("--reward-model", metavar="RUN_DIR", help="grpo / ppo: a reward model (an --algo reward run "
                        "folder) as a reward; ppo: also the critic's start (ppo.value_init=reward)")
    parser.add_argument("--reward-fn", action="append", metavar="SPEC", help="grpo / ppo: a reward function, "
                        "a token-level name (token_level_edit, ...) or module:function; repeatable")
    parser.add_argument("--export", metavar="DIR", help="after training, write released-format safetensors here")
    parser.add_argument("--strict", action="store_true", help="fail on the first malformed data record")
    parser.add_argument("--coordinator", help="multi-host: coordinator HOST:PORT")
    parser.add_argument("--num-processes", type=int)
    parser.add_argument("--process-id", type=int)
    parser.add_argument("--heartbeat-timeout", type=int, default=100, metavar="SECONDS",
                        help="multi-host: a process silent for half this long is reported dead and the others "
                        "exit; the coordination service aborts them after all of it (default 100)")
    args = parser.parse_args(argv)
    overrides = list(args.overrides) + (["data.strict=true"] if args.strict else [])
    watchdog, finished = None, False
    try:
        cfg = load_config(args.config, overrides)
        check_output_dir(cfg.train.output_dir, "train.output_dir")  # before any model loads
        if args.export:
            check_output_dir(args.export, "--export")
        if args.export and args.algo == "reward":
            raise ValueError("--export writes a policy; a reward model has no released format")
        watchdog = init_distributed(args, cfg.train.output_dir)
        enable_compile_cache()  # a resumed run loads the step it compiled before
        run = RUNS[args.algo](cfg, resume=args.resume, init_from=args.init_from, reward_fns=args.reward_fn,
                              reward_model=args.reward_model)
        result = loop.run(cfg, run, resume=args.resume)
        if args.export:
            state = result["state"]
            result = {"state": state.get("policy", state)}
            params = jax.tree_util.tree_map(
                lambda x: jax.device_get(multihost_utils.process_allgather(x, tiled=True))
                if jax.process_count() > 1 else jax.device_get(x), result["state"]["params"])
            if jax.process_index() == 0:
                info = export_llm(params, cfg.llm, args.export, dtype="bfloat16")
                print(f"exported {info['tensors']} tensors to {info['dst']}")
        finished = True
        return 0
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:
        if watchdog:  # often a collective broken by a dead peer: let the watchdog name it
            watchdog.end_after_error(e)
        raise
    finally:
        if watchdog:
            if finished:
                watchdog.finish()
                jax.distributed.shutdown()  # at once: all processes left finish() alive together
            else:
                watchdog.stop()  # go silent: the others report us instead of waiting in a collective


if __name__ == "__main__":
    sys.exit(main())
