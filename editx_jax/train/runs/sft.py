"""SFT's wiring: Grain data (JSONL or prepared ArrayRecord shards), the LLM state, the jitted step."""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

from editx_jax import checkpoint as model_ckpt
from editx_jax import sharding
from editx_jax.config import Config, ConfigError
from editx_jax.data import dataset, jsonl
from editx_jax.train import sft
from editx_jax.train import state as train_state
from editx_jax.train.init_from import check_converted_folder
from editx_jax.train.loop import (
    Run,
    RunError,
    check_run_folder,
    has_checkpoint,
    process_log,
)


def check_ids(batch: dict, vocab_size: int) -> None:
    # Prepared shards were validated against the config they were written with; a gather would
    # silently clamp an id the current vocabulary does not have.
    for key in ("tokens", "targets"):
        ids = batch[key]
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise RunError(f"data: {key} id {int(ids.max() if ids.max() >= vocab_size else ids.min())} is outside "
                           f"the vocabulary [0, {vocab_size}) (shards prepared for another config?)")


def check_same_data(*counts: int) -> None:
    """Every process must read the same examples (each iterates all of them): compare the counts."""
    if jax.process_count() == 1:
        return
    got = multihost_utils.process_allgather(np.asarray(counts, np.int64))
    if not (got == got[0]).all():
        raise RunError(f"the processes read different data (train, eval examples per process: "
                       f"{got.tolist()}); data.train / data.eval must name the same files on every host")


def _summary(m: dict) -> str:
    if "nll" in m:
        return f"nll {m['nll']:.4f} accuracy {m['accuracy']:.4f}"
    return f"loss {m.get('loss', 0):.4f} tok_s {m.get('tokens_per_s', 0):.0f}"


def _read_data(cfg: Config, tokenizer, speaker_fn, log):
    if not cfg.data.train:
        raise ConfigError("data.train: no training file given")
    prepared = dataset.is_array_record(cfg.data.train)  # tools/prepare_data.py shards need no tokenizer
    tok = None if prepared and not cfg.data.eval else tokenizer or jsonl.load_text_tokenizer(cfg.data.text_tokenizer)
    if prepared:
        examples, report = dataset.ArrayRecordExamples(cfg.data.train), jsonl.DataReport()
        log(f"train data: {len(examples)} prepared examples in ArrayRecord shards")
    else:
        examples, report = jsonl.read_examples(cfg.data.train, tok, cfg.data, cfg.llm.vocab_size, speaker_fn)
        log(f"train data: {report.summary()}")
    eval_examples = []
    if cfg.data.eval:
        eval_examples, eval_report = jsonl.read_examples(cfg.data.eval, tok, cfg.data, cfg.llm.vocab_size, speaker_fn)
        log(f"eval data: {eval_report.summary()}")
    return examples, report, eval_examples


def setup(cfg: Config, *, resume: bool = False, init_from: str | None = None, log: Callable = print,
          tokenizer=None, speaker_fn=jsonl.clone_speaker, devices=None, **_) -> Run:
    """`cfg.train.steps` steps of SFT over data.train; held-out NLL / accuracy on data.eval. The run's
    result also holds "data_report"."""
    log = process_log(log)
    tc = cfg.train
    check_run_folder(cfg, resume, "sft")
    mesh = sharding.make_mesh(cfg.mesh, devices)
    pc = jax.process_count()
    micro_rows = tc.batch_size // tc.grad_accum
    shards = mesh.shape["data"] * mesh.shape["fsdp"]  # the batch shards: every process holds shards / pc
    if tc.batch_size % tc.grad_accum or micro_rows % shards:
        raise RunError(f"train.batch_size {tc.batch_size} / grad_accum {tc.grad_accum} = "
                       f"{tc.batch_size / tc.grad_accum:g} rows per micro-batch: they must be whole and must divide over "
                       f"data x fsdp = {shards} devices ({pc} processes)")
    resuming = resume and has_checkpoint(cfg)
    if init_from and not resume:
        check_converted_folder(init_from, cfg)
    examples, report, eval_examples = _read_data(cfg, tokenizer, speaker_fn, log)
    check_same_data(len(examples), len(eval_examples))
    # Every process iterates the same global batches (data/dataset.py): they run out together.
    iterator = iter(dataset.train_dataset(examples, cfg.data, tc.batch_size, tc.grad_accum))

    tx = train_state.make_optimizer(cfg.optimizer, tc.steps)
    sh = train_state.llm_state_shardings(cfg.llm, tx, mesh)
    if resuming:
        state = train_state.abstract_llm_state(cfg.llm, tx, sh)  # the loop restores into it
    elif init_from:
        _, params = model_ckpt.load_llm(init_from, shardings=sh["params"], param_dtype="float32")
        train_state.check_shapes(params, train_state.abstract_llm_state(cfg.llm, tx, sh)["params"],
                                 f"--init-from {init_from}")
        state = train_state.create_state(params, tx, sh)
        log(f"initialised from {init_from}")
    else:
        state = train_state.init_llm_state(cfg.llm, tx, sh, jax.random.key(tc.seed))

    step = sft.make_train_step(cfg.llm, tx, mesh, tc.loss_norm, train_state.lr_schedule(cfg.optimizer, tc.steps), sh)
    tokens = [0.0]  # loss-bearing + context tokens since the last log (this process)

    def step_fn(state, _):
        batch = next(iterator)  # StopIteration ends the run (the loop saves first)
        check_ids(batch, cfg.llm.vocab_size)
        tokens[0] += float(np.sum(batch["segment_ids"] > 0))
        return step(state, dataset.to_global(batch, mesh))

    def rates(seconds: float, _steps: int) -> dict:
        rate = tokens[0] / max(seconds, 1e-9)
        tokens[0] = 0.0
        return {"tokens_per_s": rate}

    evaluate = None
    if eval_examples:
        eval_fn = sft.make_eval_step(cfg.llm, tx, mesh, sh)
        eval_data = dataset.eval_batches(eval_examples, cfg.data.max_length, micro_rows)
        if tc.eval_batches:
            eval_data = eval_data[:tc.eval_batches]

        def evaluate(state):
            sums = {"nll_sum": 0.0, "correct": 0.0, "tokens": 0.0}
            for b in eval_data:
                got = jax.device_get(eval_fn(state["params"], dataset.to_global(b, mesh)))
                for k in sums:
                    sums[k] += float(got[k])
            n = max(sums["tokens"], 1.0)
            return {"nll": sums["nll_sum"] / n, "accuracy": sums["correct"] / n, "tokens": sums["tokens"]}

    return Run("sft", state, step_fn, evaluate=evaluate, summary=_summary, data_iterator=iterator, rates=rates,
               info={"data_report": report})
