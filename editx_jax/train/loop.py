"""The one training loop, for every algorithm: steps, logging, held-out evaluation, Orbax checkpoints
and the run-folder guards. An algorithm's wiring (train/runs/<algo>.py) builds a `Run`; `run` drives it.

    <output_dir>/
      run_config.json       the full config of the run and its algorithm (a resume checks both)
      metrics.jsonl         one JSON object per logged step / evaluation (process 0 only)
      tensorboard/          event files, when tensorboardX or tensorflow is importable
      checkpoints/<step>/   Orbax: {state: the run's state tree, data: Grain iterator state per process
                            (SFT only)}

Orbax writes a checkpoint into a temporary folder and renames it when complete, so a run killed
mid-save keeps its previous checkpoint; saves are asynchronous (the device-to-host copy happens
before `save` returns, so the donated state can be reused at once). Keep-N pruning is the mirror
image: Orbax renames the oldest step folder into checkpoints/pruned.trash/ (one atomic rename), and
only then is it deleted, so a run killed mid-prune never leaves a half-deleted folder under a step's
name; leftovers in the trash (and Orbax's temporary folders) are removed at start-up.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
import time
from collections.abc import Callable
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from tqdm import tqdm

from editx_jax.config import Config

try:  # a declared dependency, but the loop runs without it (TensorBoard events are optional)
    from tensorboardX import SummaryWriter
except ImportError:  # pragma: no cover
    SummaryWriter = None


class RunError(ValueError):
    """A run cannot start or resume as asked (existing output, mismatched checkpoint, bad batch size)."""


@dataclasses.dataclass
class Run:
    """One algorithm's run, as its wiring file (train/runs/) builds it.

    state: any pytree of arrays (Orbax saves it as is); sharded ShapeDtypeStructs when the run resumes
    from a checkpoint (the loop restores into them). step_fn(state, step) -> (state, metrics).
    evaluate(state) -> metrics, at step 0, every train.eval_every and at the end. summary(metrics) ->
    the progress-bar / eval log text. data_iterator: checkpointed with the state when given (SFT's
    Grain iterator). rates(seconds, steps) -> throughput metrics added at each log (default:
    seconds_per_step). info: more entries of the returned dict (e.g. SFT's data report)."""
    name: str
    state: Any
    step_fn: Callable
    evaluate: Callable | None = None
    summary: Callable | None = None
    data_iterator: Any = None
    rates: Callable | None = None
    info: dict = dataclasses.field(default_factory=dict)


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
    if SummaryWriter is not None:
        return SummaryWriter(str(path))
    try:
        import tensorflow as tf  # noqa: PLC0415  (optional, heavy: only when tensorboardX is missing)
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


TRASH = "pruned.trash"  # pruned step folders are renamed in here, then deleted


def checkpoint_steps(path) -> list[int]:
    """The steps under `path` a restore can read: folders under their final step name (a save renames
    its temporary folder in when complete, pruning renames one out before deleting it) holding Orbax's
    commit metadata and the state item. Everything that picks a checkpoint goes through this list."""
    path = pathlib.Path(path)
    if not path.is_dir():
        return []
    return sorted(int(p.name) for p in path.iterdir()
                  if p.name.isdigit() and (p / "_CHECKPOINT_METADATA").is_file() and (p / "state").is_dir())


def purge_trash(path, *, startup: bool = False) -> None:
    """Delete the step folders that pruning renamed into the trash; at start-up also the temporary
    folders of saves that a kill interrupted (Orbax's own clean-up of those runs in the background,
    after the first listing). Process 0 only: the others share the folder. Only the trash's entries
    go, never the trash itself: Orbax may be renaming the next pruned step into it meanwhile."""
    path = pathlib.Path(path)
    if jax.process_index() != 0 or not path.is_dir():
        return
    trash = path / TRASH
    leftovers = sorted(trash.iterdir()) if trash.is_dir() else []
    if startup:
        leftovers += [p for p in path.iterdir() if ".orbax-checkpoint-tmp" in p.name]
    for p in leftovers:
        shutil.rmtree(p, ignore_errors=True)


def checkpoint_manager(path: pathlib.Path, cfg: Config):
    """Orbax's manager over `path`, keeping `checkpoint.keep` steps; a killed run's leftovers (pruned
    folders, temporary save folders) are removed first."""
    purge_trash(path, startup=True)
    options = ocp.CheckpointManagerOptions(max_to_keep=cfg.checkpoint.keep, create=True, todelete_subdir=TRASH,
                                           enable_async_checkpointing=cfg.checkpoint.async_save)
    return ocp.CheckpointManager(path.absolute(), options=options)


def latest_step(path) -> int | None:
    steps = checkpoint_steps(path)
    return steps[-1] if steps else None


def save_checkpoint(mgr, step: int, state, iterator=None) -> None:
    items = {"state": ocp.args.StandardSave(state)}
    if iterator is not None:
        items["data"] = grain.checkpoint.CheckpointSave(iterator)
    mgr.save(step, args=ocp.args.Composite(**items), force=True)
    purge_trash(mgr.directory)  # the steps pruned by the previous save (it has finished: save waits for it)


def restore_checkpoint(mgr, step: int, abstract_state, iterator=None):
    """The state restored into `abstract_state`'s shardings (any device count), and the data
    iterator's position when an iterator is given."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if iterator is not None:
        items["data"] = grain.checkpoint.CheckpointRestore(iterator)
    try:
        return mgr.restore(step, args=ocp.args.Composite(**items))["state"]
    except (ValueError, KeyError, TypeError) as e:
        raise RunError(f"checkpoint {mgr.directory}/{step} does not match this model/optimizer: "
                       f"{str(e).splitlines()[0][:300]}") from None


def restore_run_params(run_dir):
    """The params of the last checkpoint of a run folder (`train.output_dir` of any algorithm), as host
    arrays: state["params"] for SFT / reward / DPO runs, state["policy"]["params"] for GRPO / PPO."""
    path = pathlib.Path(run_dir) / "checkpoints"
    step = latest_step(path)
    if step is None:
        raise RunError(f"{run_dir}: no checkpoint under {path}")
    mgr = ocp.CheckpointManager(path.absolute(), options=ocp.CheckpointManagerOptions(read_only=True))
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


def abstract(tree):
    """Sharded ShapeDtypeStructs of a tree of arrays (or of ShapeDtypeStructs): a restore target."""
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


# ----------------------------------------------------------------------------- run-folder guards


MODEL_KEYS = ("llm",)  # config sections a resumed run must share with its checkpoint


def has_checkpoint(cfg: Config) -> bool:
    return bool(checkpoint_steps(pathlib.Path(cfg.train.output_dir) / "checkpoints"))


def check_run_folder(cfg: Config, resume: bool, name: str | None = None) -> None:
    """Refuse to overwrite a run without --resume, and to resume one made with another llm config or
    (when `name` is given) another algorithm. Called before any data or model is read."""
    out = pathlib.Path(cfg.train.output_dir)
    path = out / "run_config.json"
    ckpts = out / "checkpoints"
    # Any step folder counts here, even one a restore would skip: never overwrite what may be a run.
    if not resume and ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir()):
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
        if name is not None and old.get("algo", "sft") != name:
            raise RunError(f"{out} holds a {old.get('algo', 'sft')} run, not {name}; nothing was overwritten")


def process_log(log):
    """`log` on process 0, a no-op elsewhere."""
    if jax.process_index() == 0:
        return log
    return lambda *a, **k: None


def _default_summary(m: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in list(m.items())[:4])


def _seconds_per_step(seconds: float, steps: int) -> dict:
    return {"seconds_per_step": seconds / (steps or 1)}


# ----------------------------------------------------------------------------- the loop


def _log_train(writer, history, bar, summary, rates, pending, t_last, t_step):
    """Log one step's metrics (with the throughput since the last log) -> (time, step) of this log."""
    done, metrics = pending
    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
    now = time.time()
    m.update(rates(now - t_last, done - t_step))
    writer.write(done, "train", m)
    history.append({"step": done, **m})
    if bar is not None:
        bar.set_postfix_str(summary(m))
    return now, done


def run(cfg: Config, r: Run, *, resume: bool = False, log: Callable = print) -> dict:
    """`cfg.train.steps` calls of `r.step_fn(state, step) -> (state, metrics)` with metrics.jsonl /
    TensorBoard logging, a progress bar, held-out `r.evaluate(state)` and Orbax checkpoints of
    `r.state` (and `r.data_iterator`) every checkpoint.every steps; `resume` continues from the last
    checkpoint. A `StopIteration` from the step (SFT's data exhausted) ends the run with the last
    step's log, save and evaluation, on every process together.
    Returns {"state", "train", "eval", **r.info}."""
    log = process_log(log)
    tc = cfg.train
    out = pathlib.Path(tc.output_dir)
    check_run_folder(cfg, resume, r.name)
    pi, state = jax.process_index(), r.state
    summary, rates = r.summary or _default_summary, r.rates or _seconds_per_step
    mgr = checkpoint_manager(out / "checkpoints", cfg)
    start = 0
    latest = latest_step(out / "checkpoints") if resume else None
    if latest is not None:
        state = restore_checkpoint(mgr, latest, abstract(state), r.data_iterator)
        start = int(latest)
        log(f"resumed from {out / 'checkpoints' / str(latest)}")
    elif any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree_util.tree_leaves(state)):
        mgr.close()
        raise RunError(f"{out}: no checkpoint to resume from")
    if pi == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "run_config.json").write_text(json.dumps({**dataclasses.asdict(cfg), "algo": r.name}, indent=2) + "\n")
    writer = MetricsWriter(out, enabled=pi == 0)
    history, eval_history = [], []

    def run_eval(step):
        m = {k: float(v) for k, v in r.evaluate(state).items()}
        writer.write(step, "eval", m)
        eval_history.append({"step": step, **m})
        log(f"eval step {step}: {summary(m)}")

    bar = tqdm(total=tc.steps, initial=start, desc=r.name, dynamic_ncols=True) if tc.progress and pi == 0 else None
    saved = evaluated = logged = start
    pending = None  # (step, metrics) of the last step when not yet logged
    try:
        if r.evaluate is not None and start == 0:
            run_eval(0)
        t_last, t_step = time.time(), start
        done = start
        for step in range(start, tc.steps):
            try:
                state, metrics = r.step_fn(state, step)
            except StopIteration:
                # Every process holds the same global batches (data/dataset.py), so all of them get
                # here at the same step and run the final save / evaluation below together.
                log(f"training data exhausted after {step} steps (data.num_epochs={cfg.data.num_epochs})")
                break
            done = step + 1
            pending = (done, metrics)
            if done % tc.log_every == 0 or done == tc.steps:
                t_last, t_step = _log_train(writer, history, bar, summary, rates, pending, t_last, t_step)
                logged, pending = done, None
            if bar is not None:
                bar.update(1)
            if done % cfg.checkpoint.every == 0 or done == tc.steps:
                save_checkpoint(mgr, done, state, r.data_iterator)
                saved = done
            if r.evaluate is not None and ((tc.eval_every and done % tc.eval_every == 0) or done == tc.steps):
                run_eval(done)
                evaluated = done
        # The end of the data before train.steps: the last step's log, save and evaluation.
        if pending is not None and logged < done:
            _log_train(writer, history, bar, summary, rates, pending, t_last, t_step)
        if saved < done:
            save_checkpoint(mgr, done, state, r.data_iterator)
        if r.evaluate is not None and evaluated < done:
            run_eval(done)
    finally:
        mgr.wait_until_finished()
        mgr.close()
        purge_trash(mgr.directory)
        writer.close()
        if bar is not None:
            bar.close()
    return {"state": state, "train": history, "eval": eval_history, **r.info}
