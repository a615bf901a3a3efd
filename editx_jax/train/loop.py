"""The shared training loop: data, state, step, logging, held-out evaluation, Orbax checkpoints.

Everything numerical lives in the step functions (sft.py); this file only moves data and files.

    <output_dir>/
      run_config.json       the full config of the run (a resume checks the model part against it)
      metrics.jsonl         one JSON object per logged step / evaluation (process 0 only)
      tensorboard/          event files, when tensorboardX or tensorflow is importable
      checkpoints/<step>/   Orbax: {state: train state, data: Grain iterator state per process}

Orbax writes a checkpoint into a temporary folder and renames it when complete, so a run killed
mid-save keeps its previous checkpoint; saves are asynchronous (the device-to-host copy happens
before `save` returns, so the donated state can be reused at once).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import Callable

import jax
import numpy as np

from editx_jax import sharding
from editx_jax.config import Config, ConfigError
from editx_jax.data import jsonl, pipeline
from editx_jax.train import sft
from editx_jax.train import state as train_state


class RunError(ValueError):
    """A run cannot start or resume as asked (existing output, mismatched checkpoint, bad batch size)."""


# ----------------------------------------------------------------------------- metrics


class MetricsWriter:
    """metrics.jsonl (+ TensorBoard events when a writer library is importable); process 0 only."""

    def __init__(self, out_dir: pathlib.Path, enabled: bool = True):
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self.tb = None
        if enabled:
            self.file = self.path.open("a")
            self.tb = _tensorboard_writer(out_dir / "tensorboard")

    def write(self, step: int, split: str, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), "split": split, "time": round(time.time(), 3),
               **{k: float(v) for k, v in metrics.items()}}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(f"{split}/{k}", float(v), int(step))

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


def _tensorboard_writer(path: pathlib.Path):
    try:
        from tensorboardX import SummaryWriter
        return SummaryWriter(str(path))
    except ImportError:
        pass
    try:
        import tensorflow as tf
    except ImportError:
        return None

    class _TF:  # the same two calls on tf.summary
        def __init__(self):
            self.w = tf.summary.create_file_writer(str(path))

        def add_scalar(self, tag, value, step):
            with self.w.as_default():
                tf.summary.scalar(tag, value, step=step)

        def close(self):
            self.w.close()

    return _TF()


def read_metrics(out_dir) -> list[dict]:
    path = pathlib.Path(out_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_manager(path: pathlib.Path, cfg: Config):
    import orbax.checkpoint as ocp
    options = ocp.CheckpointManagerOptions(max_to_keep=cfg.checkpoint.keep, create=True,
                                           enable_async_checkpointing=cfg.checkpoint.async_save)
    return ocp.CheckpointManager(path.absolute(), options=options)


def save_checkpoint(mgr, step: int, state: dict, iterator) -> None:
    import grain
    import orbax.checkpoint as ocp
    mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                           data=grain.checkpoint.CheckpointSave(iterator)), force=True)


def restore_checkpoint(mgr, step: int, abstract_state: dict, iterator=None) -> dict:
    """The train state restored into `abstract_state`'s shardings (any device count), and the data
    iterator's position when an iterator is given."""
    import grain
    import orbax.checkpoint as ocp
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if iterator is not None:
        items["data"] = grain.checkpoint.CheckpointRestore(iterator)
    try:
        return mgr.restore(step, args=ocp.args.Composite(**items))["state"]
    except (ValueError, KeyError, TypeError) as e:
        raise RunError(f"checkpoint {mgr.directory}/{step} does not match this model/optimizer: "
                       f"{str(e).splitlines()[0][:300]}") from None


# ----------------------------------------------------------------------------- run


MODEL_KEYS = ("llm",)  # config sections a resumed run must share with its checkpoint


def _check_run_config(out: pathlib.Path, cfg: Config, resume: bool) -> None:
    path = out / "run_config.json"
    has_ckpt = (out / "checkpoints").is_dir() and any(p.name.isdigit() for p in (out / "checkpoints").iterdir())
    if has_ckpt and not resume:
        raise RunError(f"{out} already holds checkpoints; pass --resume to continue the run, or choose "
                       "another train.output_dir (nothing was overwritten)")
    if resume and path.is_file():
        old = json.loads(path.read_text())
        new = dataclasses.asdict(cfg)
        for section in MODEL_KEYS:
            diff = sorted(k for k in set(old.get(section, {})) | set(new[section])
                          if old.get(section, {}).get(k) != new[section].get(k) and k not in ("dtype", "remat_policy"))
            if diff:
                raise RunError(f"{out}: the checkpoint was made with another {section} config "
                               f"({', '.join(f'{section}.{k}' for k in diff)} differ); nothing was overwritten")


def _check_init_from(folder, cfg: Config) -> None:
    from editx_jax import checkpoint as model_ckpt
    stored = model_ckpt.read_config(folder)
    sizes = {k: v for k, v in dataclasses.asdict(cfg.llm).items() if k not in ("dtype", "param_dtype", "remat_policy")}
    diff = sorted(k for k, v in sizes.items() if stored.get(k, v) != v)
    if diff:
        raise RunError(f"--init-from {folder}: its config differs from llm in "
                       f"{', '.join(f'{k} ({stored[k]} vs {sizes[k]})' for k in diff)}")


def _check_ids(batch: dict, vocab_size: int) -> None:
    # Prepared shards were validated against the config they were written with; a gather would
    # silently clamp an id the current vocabulary does not have.
    for key in ("tokens", "targets"):
        ids = batch[key]
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise RunError(f"data: {key} id {int(ids.max() if ids.max() >= vocab_size else ids.min())} is outside "
                           f"the vocabulary [0, {vocab_size}) (shards prepared for another config?)")


def _log_fn(log):
    if jax.process_index() == 0:
        return log
    return lambda *a, **k: None


def run_sft(cfg: Config, *, resume: bool = False, init_from: str | None = None, log: Callable = print,
            tokenizer=None, speaker_fn=jsonl.clone_speaker, devices=None) -> dict:
    """Train `cfg.train.steps` steps of SFT; returns {"state", "train", "eval", "data_report"}."""
    log = _log_fn(log)
    tc = cfg.train
    out = pathlib.Path(tc.output_dir)
    _check_run_config(out, cfg, resume)
    mesh = sharding.make_mesh(cfg.mesh, devices)
    pc, pi = jax.process_count(), jax.process_index()
    micro_rows = tc.batch_size // tc.grad_accum
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if micro_rows % shards or tc.batch_size % pc:
        raise RunError(f"train.batch_size {tc.batch_size} / grad_accum {tc.grad_accum} = {micro_rows} rows per "
                       f"micro-batch must divide over data x fsdp = {shards} devices and {pc} processes")

    if init_from and not resume:
        _check_init_from(init_from, cfg)
    tok = None if pipeline.is_array_record(cfg.data.train) and not cfg.data.eval else \
        tokenizer or jsonl.load_text_tokenizer(cfg.data.text_tokenizer)  # prepared shards need none
    if not cfg.data.train:
        raise ConfigError("data.train: no training file given")
    if pipeline.is_array_record(cfg.data.train):  # prepared shards (tools/prepare_data.py shards)
        examples, report = pipeline.ArrayRecordExamples(cfg.data.train), jsonl.DataReport()
        log(f"train data: {len(examples)} prepared examples in ArrayRecord shards")
    else:
        examples, report = jsonl.read_examples(cfg.data.train, tok, cfg.data, cfg.llm.vocab_size, speaker_fn)
        log(f"train data: {report.summary()}")
    eval_examples = []
    if cfg.data.eval:
        eval_examples, eval_report = jsonl.read_examples(cfg.data.eval, tok, cfg.data, cfg.llm.vocab_size, speaker_fn)
        log(f"eval data: {eval_report.summary()}")
    rows = tc.batch_size // pc
    dataset = pipeline.train_dataset(examples, cfg.data, rows, tc.grad_accum, pi, pc)
    iterator = iter(dataset)

    tx = train_state.make_optimizer(cfg.optimizer, tc.steps)
    schedule = train_state.lr_schedule(cfg.optimizer, tc.steps)
    mgr = checkpoint_manager(out / "checkpoints", cfg)
    start = 0
    latest = mgr.latest_step() if resume else None
    if latest is not None:
        abstract = train_state.abstract_sharded_state(cfg.llm, tx, mesh)
        state = restore_checkpoint(mgr, latest, abstract, iterator)
        start = int(latest)
        log(f"resumed from {out / 'checkpoints' / str(latest)}")
    elif init_from:
        from editx_jax import checkpoint as model_ckpt
        param_sh = train_state.state_shardings(cfg.llm, tx, mesh)["params"]
        _, params = model_ckpt.load_llm(init_from, shardings=param_sh, param_dtype="float32")
        state = train_state.state_from_loaded_params(params, cfg.llm, tx, mesh)
        log(f"initialised from {init_from}")
    else:
        state = train_state.create_state(cfg.llm, tx, mesh, jax.random.key(tc.seed))
    if pi == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "run_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")

    step_fn = sft.make_train_step(cfg.llm, tx, mesh, tc.loss_norm, schedule)
    eval_fn = sft.make_eval_step(cfg.llm, tx, mesh) if eval_examples else None
    eval_rows = max(shards, (tc.batch_size // tc.grad_accum) // pc)
    eval_data = pipeline.eval_batches(eval_examples, cfg.data.max_length, eval_rows, pi, pc) if eval_examples else []
    if tc.eval_batches:
        eval_data = eval_data[:tc.eval_batches]

    def evaluate():
        sums = {"nll_sum": 0.0, "correct": 0.0, "tokens": 0.0}
        for b in eval_data:
            got = jax.device_get(eval_fn(state["params"], pipeline.to_global(b, mesh)))
            for k in sums:
                sums[k] += float(got[k])
        n = max(sums["tokens"], 1.0)
        return {"nll": sums["nll_sum"] / n, "accuracy": sums["correct"] / n, "tokens": sums["tokens"]}

    writer = MetricsWriter(out, enabled=pi == 0)
    history, eval_history = [], []
    bar = None
    if tc.progress and pi == 0:
        from tqdm import tqdm
        bar = tqdm(total=tc.steps, initial=start, desc="sft", dynamic_ncols=True)
    if eval_fn is not None and start == 0 and not resume:
        m = evaluate()
        writer.write(0, "eval", m)
        eval_history.append({"step": 0, **m})
        log(f"eval step 0: nll {m['nll']:.4f} accuracy {m['accuracy']:.4f}")
    t_last, tokens_since = time.time(), 0.0
    try:
        for step in range(start, tc.steps):
            try:
                batch = next(iterator)
            except StopIteration:
                log(f"training data exhausted after {step} steps (data.num_epochs={cfg.data.num_epochs})")
                if step > start:
                    save_checkpoint(mgr, step, state, iterator)
                break
            _check_ids(batch, cfg.llm.vocab_size)
            tokens_since += float(np.sum(batch["segment_ids"] > 0))
            state, metrics = step_fn(state, pipeline.to_global(batch, mesh))
            done = step + 1
            if done % tc.log_every == 0 or done == tc.steps:
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                now = time.time()
                m["tokens_per_s"] = tokens_since * pc / max(now - t_last, 1e-9)
                t_last, tokens_since = now, 0.0
                writer.write(done, "train", m)
                history.append({"step": done, **m})
                if bar is not None:
                    bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{m['tokens_per_s']:.0f}")
            if bar is not None:
                bar.update(1)
            if done % cfg.checkpoint.every == 0 or done == tc.steps:
                save_checkpoint(mgr, done, state, iterator)
            if eval_fn is not None and ((tc.eval_every and done % tc.eval_every == 0) or done == tc.steps):
                m = evaluate()
                writer.write(done, "eval", m)
                eval_history.append({"step": done, **m})
                log(f"eval step {done}: nll {m['nll']:.4f} accuracy {m['accuracy']:.4f}")
    finally:
        mgr.wait_until_finished()
        mgr.close()
        writer.close()
        if bar is not None:
            bar.close()
    return {"state": state, "train": history, "eval": eval_history, "data_report": report}
