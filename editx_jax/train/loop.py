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
from editx_jax.config import Config, ConfigError, MeshConfig
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


# ----------------------------------------------------------------------------- the reward / DPO / GRPO / PPO runs
#
# One generic loop (`run_loop`) takes a step callable; each algorithm's `run_*` below only builds its
# state, its data and that callable. The data are plain lists indexed by step (a seeded permutation
# per epoch), so a resumed run needs nothing but the step to find its place: a checkpoint holds the
# state tree only (for DPO / GRPO / PPO including the frozen reference, so a resume needs no
# --init-from).

ALGOS = ("sft", "reward", "dpo", "grpo", "ppo")


def epoch_indices(n: int, size: int, step: int, seed: int) -> np.ndarray:
    """The `size` example indices of `step`: consecutive slices of a fresh permutation per epoch."""
    if n == 0:
        raise RunError("no training examples")
    pos = np.arange(step * size, (step + 1) * size)
    epochs, offsets = pos // n, pos % n
    perms = {e: np.random.RandomState(seed + int(e)).permutation(n) for e in np.unique(epochs)}
    return np.asarray([perms[e][o] for e, o in zip(epochs, offsets)])


def _abstract(tree):
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def run_loop(name: str, cfg: Config, state: dict, step_fn: Callable, *, evaluate: Callable | None = None,
             resume: bool = False, log: Callable = print, summary: Callable | None = None) -> dict:
    """`cfg.train.steps` calls of `step_fn(state, step) -> (state, metrics)` with metrics.jsonl /
    TensorBoard logging, a progress bar, held-out `evaluate(state) -> metrics` (at step 0, every
    train.eval_every and at the end) and Orbax checkpoints of `state` (any pytree of arrays) every
    checkpoint.every steps; `resume` continues from the last checkpoint. Returns
    {"state", "train", "eval"}. `summary(metrics)` formats the progress-bar postfix / eval log line."""
    log = _log_fn(log)
    tc = cfg.train
    out = pathlib.Path(tc.output_dir)
    _check_run_config(out, cfg, resume)
    old = out / "run_config.json"
    if resume and old.is_file() and json.loads(old.read_text()).get("algo", "sft") != name:
        raise RunError(f"{out} holds a {json.loads(old.read_text()).get('algo', 'sft')} run, not {name}; "
                       "nothing was overwritten")
    pi = jax.process_index()
    mgr = checkpoint_manager(out / "checkpoints", cfg)
    start = 0
    latest = mgr.latest_step() if resume else None
    if latest is not None:
        import orbax.checkpoint as ocp
        try:
            state = mgr.restore(latest, args=ocp.args.Composite(state=ocp.args.StandardRestore(_abstract(state))))["state"]
        except (ValueError, KeyError, TypeError) as e:
            raise RunError(f"checkpoint {mgr.directory}/{latest} does not match this {name} run: "
                           f"{str(e).splitlines()[0][:300]}") from None
        start = int(latest)
        log(f"resumed from {out / 'checkpoints' / str(latest)}")
    if pi == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "run_config.json").write_text(json.dumps({**dataclasses.asdict(cfg), "algo": name}, indent=2) + "\n")
    summary = summary or (lambda m: ", ".join(f"{k} {v:.4g}" for k, v in list(m.items())[:4]))
    writer = MetricsWriter(out, enabled=pi == 0)
    history, eval_history = [], []

    def run_eval(step):
        m = {k: float(v) for k, v in evaluate(state).items()}
        writer.write(step, "eval", m)
        eval_history.append({"step": step, **m})
        log(f"eval step {step}: {summary(m)}")

    bar = None
    if tc.progress and pi == 0:
        from tqdm import tqdm
        bar = tqdm(total=tc.steps, initial=start, desc=name, dynamic_ncols=True)
    try:
        if evaluate is not None and start == 0:
            run_eval(0)
        t_last = time.time()
        for step in range(start, tc.steps):
            state, metrics = step_fn(state, step)
            done = step + 1
            if done % tc.log_every == 0 or done == tc.steps:
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                now = time.time()
                m["seconds_per_step"] = (now - t_last) / (done - max(start, done - tc.log_every) or 1)
                t_last = now
                writer.write(done, "train", m)
                history.append({"step": done, **m})
                if bar is not None:
                    bar.set_postfix_str(summary(m))
            if bar is not None:
                bar.update(1)
            if done % cfg.checkpoint.every == 0 or done == tc.steps:
                import orbax.checkpoint as ocp
                mgr.save(done, args=ocp.args.Composite(state=ocp.args.StandardSave(state)), force=True)
            if evaluate is not None and ((tc.eval_every and done % tc.eval_every == 0) or done == tc.steps):
                run_eval(done)
    finally:
        mgr.wait_until_finished()
        mgr.close()
        writer.close()
        if bar is not None:
            bar.close()
    return {"state": state, "train": history, "eval": eval_history}


def restore_run_params(run_dir, keys=("params",)):
    """The params of the last checkpoint of a run folder (`train.output_dir` of any algorithm), as host
    arrays: state["params"] for SFT / reward / DPO runs, state["policy"]["params"] for GRPO / PPO."""
    import orbax.checkpoint as ocp
    path = pathlib.Path(run_dir) / "checkpoints"
    mgr = ocp.CheckpointManager(path.absolute())
    step = mgr.latest_step()
    if step is None:
        raise RunError(f"{run_dir}: no checkpoint under {path}")
    try:
        tree = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    finally:
        mgr.close()
    for key in (("policy", "params"), ("params",)):
        node = tree
        for k in key:
            node = node.get(k) if isinstance(node, dict) else None
        if node is not None:
            return node
    raise RunError(f"{run_dir}: its checkpoint holds no params")


def _is_run_dir(path) -> bool:
    return path is not None and (pathlib.Path(path) / "checkpoints").is_dir()


def _check_tree(params, abstract, what: str) -> None:
    want = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(abstract)}
    got = {jax.tree_util.keystr(k): tuple(np.shape(v)) for k, v in jax.tree_util.tree_leaves_with_path(params)}
    if want != got:
        bad = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))[0]
        raise RunError(f"{what}: {bad} is {got.get(bad)}, the config expects {want.get(bad)} "
                       "(another llm config?)")


def load_policy_params(init_from, cfg: Config, log: Callable = print):
    """Host float32 LLM params: from an SFT / RL run folder (its last checkpoint), a converted
    checkpoint folder (checkpoint.save_llm), or a fresh init (seed train.seed) when none is given."""
    from editx_jax.models import llm
    from editx_jax.train.state import master_config
    abstract = llm.abstract_params(master_config(cfg.llm))
    if init_from is None:
        log("policy: fresh initialisation (no --init-from)")
        return jax.device_get(llm.init_params(master_config(cfg.llm), jax.random.key(cfg.train.seed)))
    if _is_run_dir(init_from):
        params = restore_run_params(init_from)
    else:
        from editx_jax import checkpoint as model_ckpt
        _check_init_from(init_from, cfg)
        _, params = model_ckpt.load_llm(init_from, param_dtype="float32")
    params = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), jax.device_get(params))
    _check_tree(params, abstract, f"--init-from {init_from}")
    log(f"policy initialised from {init_from}")
    return params


def load_reward_params(path, cfg: Config):
    """A reward model's params from a reward run folder (`--algo reward` output)."""
    from editx_jax.models import reward as rm
    from editx_jax.train.state import master_config
    if not _is_run_dir(path):
        raise RunError(f"--reward-model {path}: not a run folder with checkpoints (train.py --algo reward output)")
    params = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), jax.device_get(restore_run_params(path)))
    if "trunk" not in params:
        raise RunError(f"--reward-model {path}: its checkpoint is not a reward model (no trunk/score params)")
    vocab = np.shape(params["trunk"]["embed"]["embedding"])[0]
    if vocab != cfg.llm.vocab_size:
        raise RunError(f"--reward-model {path}: its trunk has a vocabulary of {vocab} ids, the policy's "
                       f"llm.vocab_size is {cfg.llm.vocab_size}")
    _check_tree(params, rm.abstract_params(master_config(cfg.llm)), f"--reward-model {path}")
    return params


def _mesh_and_shards(cfg: Config, devices, rows: int, what: str):
    mesh = sharding.make_mesh(cfg.mesh, devices)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if rows % shards:
        raise RunError(f"{what}: {rows} rows per step must divide over data x fsdp = {shards} devices")
    return mesh, shards


def _read_pairs(cfg: Config, path: str, tokenizer, log):
    from editx_jax.train import pairs as pairs_mod
    if not path:
        raise ConfigError("data.train: no training file given")
    tok = tokenizer or jsonl.load_text_tokenizer(cfg.data.text_tokenizer)
    got, report = pairs_mod.read_pairs(path, tok, cfg.data, cfg.dpo, cfg.llm.vocab_size, strict=cfg.data.strict)
    log(f"pairs from {path}: {report.summary()}")
    if not got:
        raise RunError(f"{path}: no usable preference pairs")
    return pairs_mod.as_arrays(got)


def _pair_length(*sets) -> int:
    longest = max(len(p) + max(len(c), len(r)) for P, C, R, _ in sets for p, c, r in zip(P, C, R))
    return -(-longest // 8) * 8


def run_pairs(algo: str, cfg: Config, *, resume=False, init_from=None, log=print, tokenizer=None,
              devices=None) -> dict:
    """The Bradley-Terry reward model (`algo="reward"`, initialised from the policy / SFT trunk) or DPO
    (the frozen reference = the initial policy) over the pairs of data.train; held-out metrics on
    data.eval. train.batch_size = pairs per step (2 rows each)."""
    from editx_jax.models import reward as rm
    from editx_jax.train import dpo, reward, rl_common
    log = _log_fn(log)
    tc = cfg.train
    mesh, _ = _mesh_and_shards(cfg, devices, 2 * tc.batch_size, "train.batch_size (pairs)")
    _check_run_config(pathlib.Path(tc.output_dir), cfg, resume)
    train = _read_pairs(cfg, cfg.data.train, tokenizer, log)
    held = _read_pairs(cfg, cfg.data.eval, tokenizer, log) if cfg.data.eval else None
    length = _pair_length(train, *([held] if held else []))
    tx = train_state.make_optimizer(cfg.optimizer, tc.steps)
    policy = None if resume and _has_checkpoint(cfg) else load_policy_params(init_from, cfg, log)

    def batch_at(data, idx):
        P, C, R, M = data
        pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
        if algo == "reward":
            return reward.make_batch(pick(P), pick(C), pick(R), M[idx], length=length, pad_id=cfg.llm.pad_id)
        return dpo.make_batch(pick(P), pick(C), pick(R), length=length, pad_id=cfg.llm.pad_id)

    # whole batches only (each must divide over the batch shards); a remainder is left out
    n_held = 0 if held is None else len(held[0]) // tc.batch_size * tc.batch_size
    held_batches = [batch_at(held, np.arange(i, i + tc.batch_size)) for i in range(0, n_held, tc.batch_size)]
    if held is not None and not held_batches:
        log(f"warning: data.eval has fewer than train.batch_size = {tc.batch_size} pairs; no held-out metrics")
    if tc.eval_batches:
        held_batches = held_batches[:tc.eval_batches]
    if algo == "reward":
        sh = reward.shardings(cfg.llm, tx, mesh)
        from editx_jax.train.state import master_config
        start = rm.from_llm_params(policy) if policy is not None else rm.abstract_params(master_config(cfg.llm))
        state = rl_common.create_state(start, tx, sh) if policy is not None else _zeros_state(start, tx, sh)
        step, ev = reward.make_train_step(cfg.llm, cfg.reward, tx, mesh), reward.make_eval_step(cfg.llm, cfg.reward, tx, mesh)

        def step_fn(state, i):
            return step(state, batch_at(train, epoch_indices(len(train[0]), tc.batch_size, i, tc.seed)))

        evaluate = (lambda s: reward.evaluate(ev, s["params"], held_batches)) if held_batches else None
        summary = lambda m: f"loss {m.get('loss', 0):.4f} acc {m.get('accuracy', 0):.3f} margin {m.get('margin', 0):.3f}"  # noqa: E731
    else:
        sh = rl_common.llm_state_shardings(cfg.llm, tx, mesh)
        if policy is not None:
            state = {"policy": rl_common.create_state(policy, tx, sh), "ref": rl_common.place(policy, sh["params"])}
        else:
            from editx_jax.models import llm
            from editx_jax.train.state import master_config
            abstract = llm.abstract_params(master_config(cfg.llm))
            state = {"policy": _zeros_state(abstract, tx, sh), "ref": _zeros_params(abstract, sh["params"])}
        step, ev = dpo.make_train_step(cfg.llm, cfg.dpo, tx, mesh), dpo.make_eval_step(cfg.llm, cfg.dpo, tx, mesh)
        if cfg.dpo.precompute_ref and policy is not None:
            held_batches = dpo.precompute_reference(policy, cfg.llm, held_batches)

        def step_fn(state, i):
            b = batch_at(train, epoch_indices(len(train[0]), tc.batch_size, i, tc.seed))
            if cfg.dpo.precompute_ref:
                b = dpo.precompute_reference(state["ref"], cfg.llm, [b])[0]
            policy_state, m = step(state["policy"], state["ref"], b)
            return {"policy": policy_state, "ref": state["ref"]}, m

        evaluate = (lambda s: dpo.evaluate(ev, s["policy"]["params"], s["ref"], held_batches)) if held_batches else None
        summary = lambda m: (f"loss {m.get('loss', 0):.4f} acc {m.get('reward_accuracy', 0):.3f} "  # noqa: E731
                             f"margin {m.get('reward_margin', 0):.3f}")
    return run_loop(algo, cfg, state, step_fn, evaluate=evaluate, resume=resume, log=log, summary=summary)


def _has_checkpoint(cfg: Config) -> bool:
    d = pathlib.Path(cfg.train.output_dir) / "checkpoints"
    return d.is_dir() and any(p.name.isdigit() for p in d.iterdir())


def _zeros_params(abstract, shardings):
    """Placeholders of the right shapes / shardings that a resume overwrites (no init, no load)."""
    return jax.tree_util.tree_map(lambda a, s: jax.device_put(np.zeros(a.shape, np.float32), s), abstract, shardings)


def _zeros_state(abstract, tx, shardings):
    from editx_jax.train import rl_common
    return rl_common.create_state(jax.tree_util.tree_map(lambda a: np.zeros(a.shape, np.float32), abstract), tx,
                                  shardings)


def read_prompt_records(path: str, cfg: Config, tokenizer=None, speaker_fn=jsonl.clone_speaker):
    """GRPO / PPO prompts: (prompt ids, record) per line of a JSONL file. A line is either token-level,
    {"prompt": [ids], "source": [ids], "target": [ids]} (source / target optional, read by the
    token-level rewards), or an upstream edit record (prompt = the SFT chat up to the assistant turn,
    source / target = its audio tokens in model ids). Bad lines are skipped (data.strict: an error)."""
    from editx_jax.train import pairs as pairs_mod
    if not path:
        raise ConfigError("data.train: no prompt file given")
    prompts, records, report, tok = [], [], jsonl.DataReport(), tokenizer
    for where, rec in jsonl.iter_jsonl(path):
        report.records += 1
        try:
            if isinstance(rec, jsonl.RecordError):
                raise rec
            if not isinstance(rec, dict):
                raise jsonl.RecordError("record is not a JSON object")
            if "prompt" in rec:
                ids = rec["prompt"]
                for key in ("prompt", "source", "target"):
                    v = rec.get(key, [])
                    if not isinstance(v, list) or not all(isinstance(i, int) and 0 <= i < cfg.llm.vocab_size for i in v):
                        raise jsonl.RecordError(f"{key} is not a list of token ids in [0, {cfg.llm.vocab_size})")
                if not ids:
                    raise jsonl.RecordError("empty prompt")
                extra = {k: v for k, v in rec.items() if k != "prompt"}
            else:
                tok = tok or jsonl.load_text_tokenizer(cfg.data.text_tokenizer)
                src = jsonl._audio_ids(rec, "source_vq02vq06", cfg.data, cfg.llm.vocab_size)
                tgt = jsonl._audio_ids(rec, "target_vq02vq06", cfg.data, cfg.llm.vocab_size) \
                    if rec.get("target_vq02vq06") is not None else np.zeros(0, np.int64)
                ids = pairs_mod._prompt_ids(rec, tok, src, speaker_fn)
                extra = {**rec, "source": src.tolist(), "target": tgt.tolist()}
        except jsonl.RecordError as e:
            if cfg.data.strict:
                raise jsonl.RecordError(e.reason, e.detail, where) from None
            report.skipped[e.reason] += 1
            report.first_error.setdefault(e.reason, f"{where}: {e}")
            continue
        report.kept += 1
        prompts.append([int(i) for i in ids])
        records.append(extra)
    if not prompts:
        raise RunError(f"{path}: no usable prompts ({report.summary()})")
    return prompts, records, report


def _reward_fns(algo: str, cfg: Config, reward_fns, reward_model, policy_cfg):
    """GRPO: grpo.rewards unless --reward-fn / --reward-model are given; PPO: those flags (one needed)."""
    from editx_jax.train import rollout
    fns = list(reward_fns or [])
    if reward_model:
        fns.append(rollout.reward_model_fn(load_reward_params(reward_model, cfg), cfg.llm, cfg.reward, policy_cfg,
                                           cfg.llm.pad_id))
    if not fns and algo == "grpo":
        fns = list(cfg.grpo.rewards)
    if not fns:
        raise RunError("ppo needs a reward: --reward-model RUN_DIR (an --algo reward run) and/or --reward-fn "
                       "NAME|module:function")
    return [rollout.resolve(f) for f in fns]


def run_rollouts(algo: str, cfg: Config, *, resume=False, init_from=None, log=print, tokenizer=None,
                 devices=None, reward_fns=None, reward_model=None) -> dict:
    """GRPO (train.batch_size prompts x grpo.group_size samples per step) or PPO (train.batch_size
    rollouts per step; the critic from --reward-model when ppo.value_init="reward" and one is given,
    else from the policy's trunk) over the prompts of data.train. Held-out: mean reward of one sample
    per data.eval prompt (a fixed key per evaluation step)."""
    from editx_jax.train import grpo, ppo, rl_common, rollout
    from editx_jax.train.state import master_config
    log = _log_fn(log)
    tc = cfg.train
    rows = tc.batch_size * (cfg.grpo.group_size if algo == "grpo" else 1)
    devices = list(jax.devices() if devices is None else devices)
    value_mesh = None
    if algo == "ppo" and cfg.ppo.critic_devices:
        n = cfg.ppo.critic_devices
        if n >= len(devices):
            raise RunError(f"ppo.critic_devices {n} leaves no device for the policy ({len(devices)} devices)")
        value_mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1), devices[-n:])
        devices = devices[:-n]
    mesh, _ = _mesh_and_shards(cfg, devices, rows, "train.batch_size" + (" x grpo.group_size" if algo == "grpo" else ""))
    if algo == "ppo" and rows % cfg.ppo.minibatches:
        raise RunError(f"ppo.minibatches {cfg.ppo.minibatches} does not divide train.batch_size {rows}")
    _check_run_config(pathlib.Path(tc.output_dir), cfg, resume)
    prompts, records, report = read_prompt_records(cfg.data.train, cfg, tokenizer)
    log(f"prompts from {cfg.data.train}: {report.summary()}")
    held = read_prompt_records(cfg.data.eval, cfg, tokenizer)[:2] if cfg.data.eval else None
    fns = _reward_fns(algo, cfg, reward_fns, reward_model, cfg.llm)
    fresh = not (resume and _has_checkpoint(cfg))
    policy = load_policy_params(init_from, cfg, log) if fresh else None
    from editx_jax.models import llm
    abstract = llm.abstract_params(master_config(cfg.llm))
    tx = train_state.make_optimizer(cfg.optimizer, tc.steps)
    sh = rl_common.llm_state_shardings(cfg.llm, tx, mesh)
    pol_state = rl_common.create_state(policy, tx, sh) if fresh else _zeros_state(abstract, tx, sh)
    ref = rl_common.place(policy, sh["params"]) if fresh else _zeros_params(abstract, sh["params"])
    key0 = jax.random.key(tc.seed)

    def batch_at(i):
        idx = epoch_indices(len(prompts), tc.batch_size, i, tc.seed)
        return [prompts[j] for j in idx], [records[j] for j in idx]

    if algo == "grpo":
        trainer = grpo.GRPO(cfg.llm, cfg.grpo, tx, mesh, pol_state, ref, fns, gen=cfg.generation,
                            pad_id=cfg.llm.pad_id, sample_mesh=mesh)
        gen = trainer.gen
        state = {"policy": pol_state, "ref": ref}

        def step_fn(state, i):
            trainer.state, trainer.ref_params = state["policy"], state["ref"]
            m = trainer.iteration(*batch_at(i), jax.random.fold_in(key0, i))
            return {"policy": trainer.state, "ref": state["ref"]}, m
    else:
        from editx_jax.models import reward as rm
        vtx = train_state.make_optimizer(cfg.optimizer, tc.steps)
        vsh = ppo.value_shardings(cfg.llm, vtx, value_mesh or mesh)
        if fresh:
            rparams = load_reward_params(reward_model, cfg) if reward_model and cfg.ppo.value_init == "reward" else None
            value = rl_common.create_state(ppo.init_value_params(rparams, None if rparams is not None else policy),
                                           vtx, vsh)
        else:
            value = _zeros_state(rm.abstract_params(master_config(cfg.llm)), vtx, vsh)
        gen = dataclasses.replace(cfg.generation, max_new_tokens=cfg.ppo.max_new_tokens, drop_last=False)
        trainer = ppo.PPO(cfg.llm, cfg.ppo, gen, tx, vtx, mesh, pol_state, ref, value, fns, pad_id=cfg.llm.pad_id,
                          sample_mesh=mesh, value_mesh=value_mesh)
        state = {"policy": pol_state, "ref": ref, "value": value}

        def step_fn(state, i):
            trainer.policy, trainer.ref_params, trainer.value = state["policy"], state["ref"], state["value"]
            trainer.iterations = i  # the critic warm-up counts iterations
            m = trainer.iteration(*batch_at(i), jax.random.fold_in(key0, i))
            return {"policy": trainer.policy, "ref": state["ref"], "value": trainer.value}, m

    def evaluate(state):
        hp, hr = held
        rows_, comps = rollout.sample_completions(state["policy"]["params"], cfg.llm, gen, hp,
                                                  jax.random.key(tc.seed + 1))
        total, parts = rollout.score(fns, None if algo == "ppo" else trainer.weights, rows_, comps, hr)
        m = {"reward_mean": float(np.mean(total)), "completion_length": float(np.mean([len(c) for c in comps]))}
        m.update({f"reward/{k}": float(np.nanmean(v)) for k, v in parts.items()})
        return m

    summary = lambda m: (f"reward {m.get('reward_mean', 0):.3f} kl {m.get('kl', 0):.3f} "  # noqa: E731
                         f"len {m.get('completion_length', m.get('response_length', 0)):.1f}")
    return run_loop(algo, cfg, state, step_fn, evaluate=evaluate if held else None, resume=resume, log=log,
                    summary=summary)
