"""Plan a training mesh before renting one: lower and compile the SFT step ahead of time for N devices
and print XLA's per-device memory analysis and FLOPs per step. Nothing is allocated.

    python tools/plan_memory.py --config configs/sft_step_audio_editx.yaml --devices 4 --mesh 1,4,1
    python tools/plan_memory.py --config configs/sft_step_audio_editx.yaml --devices 1 --batch 8 --seq 1536
    python tools/plan_memory.py --inference --config configs/step_audio_editx.yaml --devices 1 --batch 1 4 \
        --clip-seconds 5 30   # an edit: params + KV cache + prefill / decode temporaries, per device
    python tools/plan_memory.py --algo dpo --target h200 v5p-8   # DPO / GRPO / PPO at 3.5B: a config that fits

Runs on CPU with fake devices (`--devices` sets XLA's host device count before jax starts), so the
figures are those of the XLA CPU compiler: buffer sizes (params, optimizer state, activations and
temporaries under the chosen remat policy) carry over to GPU/TPU closely, fusion-dependent temporaries
less so. Run it on the target backend (`--platform`) for exact numbers.
"""

from __future__ import annotations

import argparse
import functools
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

GiB = 1024 ** 3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/sft_step_audio_editx.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--devices", type=int, default=8, help="fake CPU devices to plan for")
    p.add_argument("--mesh", help="data,fsdp,tensor (default: the config's mesh)")
    p.add_argument("--batch", type=int, nargs="+", help="rows per step (default: train.batch_size); "
                   "--inference takes several")
    p.add_argument("--grad-accum", type=int, help="micro-batches per step (default: train.grad_accum)")
    p.add_argument("--seq", type=int, help="tokens per row (default: data.max_length)")
    p.add_argument("--platform", default="cpu", help="cpu (fake devices) or the real backend")
    p.add_argument("--inference", action="store_true", help="plan an edit's generation instead of a train step")
    p.add_argument("--clip-seconds", type=float, nargs="+", default=[5.0, 30.0], help="(--inference) clip lengths")
    p.add_argument("--algo", choices=("dpo", "grpo", "ppo"), help="plan a preference / RL step (plan_rl.py) instead "
                   "of SFT: upstream's batch, the smallest grad_accum / micro_batch that fits each --target")
    p.add_argument("--target", nargs="+", default=["h200", "v5p-8"], help="(--algo) h200 and/or v5p-8")
    args = p.parse_args(argv)
    if args.algo:
        args.devices = 4  # the most any --target needs (v5p-8: 4 chips)
    if args.inference:
        args.batch = args.batch or [1]
    if args.platform == "cpu":
        os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices} " + \
            os.environ.get("XLA_FLAGS", "")
        os.environ["JAX_PLATFORMS"] = "cpu"
    import jax  # noqa: PLC0415  (after --devices sets XLA_FLAGS)

    from editx_jax import sharding  # noqa: PLC0415  (after --devices sets XLA_FLAGS)
    from editx_jax.config import ConfigError, MeshConfig, load_config  # noqa: PLC0415  (after --devices sets XLA_FLAGS)
    from editx_jax.data.dataset import BATCH_KEYS  # noqa: PLC0415  (after --devices sets XLA_FLAGS)
    from editx_jax.train import sft  # noqa: PLC0415  (after --devices sets XLA_FLAGS)
    from editx_jax.train import state as st  # noqa: PLC0415  (after --devices sets XLA_FLAGS)

    try:
        cfg = load_config(args.config, args.overrides)
        mesh_cfg = MeshConfig(*map(int, args.mesh.split(","))) if args.mesh else cfg.mesh
        devices = jax.devices()[:args.devices]
        mesh = sharding.make_mesh(mesh_cfg, devices)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.inference:
        return plan_inference(cfg, mesh, args.batch, args.clip_seconds)
    if args.algo:
        import plan_rl  # noqa: PLC0415  (tools/plan_rl.py imports jax: only after XLA_FLAGS is set)
        return plan_rl.plan(cfg, args.algo, args.target)
    batch = args.batch[0] if args.batch else cfg.train.batch_size
    accum = args.grad_accum or cfg.train.grad_accum
    seq = args.seq or cfg.data.max_length
    if batch % accum or (batch // accum) % (mesh.shape["data"] * mesh.shape["fsdp"]):
        print(f"error: {batch} rows / {accum} micro-batches must divide over data x fsdp "
              f"= {mesh.shape['data'] * mesh.shape['fsdp']}", file=sys.stderr)
        return 1
    tx = st.make_optimizer(cfg.optimizer, cfg.train.steps)
    sh = st.llm_state_shardings(cfg.llm, tx, mesh)
    state = st.abstract_llm_state(cfg.llm, tx, sh)
    bs = sharding.batch_sharding(mesh, ndim=3, axis=1)
    shape = (accum, batch // accum, seq)
    abatch = {k: jax.ShapeDtypeStruct(shape, "float32" if k == "weights" else "int32", sharding=bs)
              for k in BATCH_KEYS}
    step = sft.make_train_step(cfg.llm, tx, mesh, cfg.train.loss_norm, shardings=sh)
    compiled = step.lower(state, abatch).compile()
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", 0.0)) if cost else 0.0

    def leaf_bytes(tree):
        total = 0
        for leaf in jax.tree_util.tree_leaves(tree):
            shard = leaf.sharding.shard_shape(leaf.shape)
            n = 1
            for d in shard:
                n *= d
            total += n * leaf.dtype.itemsize
        return total

    n_params = sum(x.size for x in jax.tree_util.tree_leaves(state["params"]))
    tokens = batch * seq
    print(f"model: {n_params / 1e9:.3f}B params, compute {cfg.llm.dtype}, master float32, remat "
          f"{cfg.llm.remat_policy}")
    print(f"mesh: {dict(mesh.shape)} on {len(devices)} {devices[0].platform} devices; step: {batch} rows x {seq} "
          f"tokens in {accum} micro-batch(es)")
    print("per device:")
    print(f"  params (fp32 master)       {leaf_bytes(state['params']) / GiB:8.2f} GiB")
    print(f"  optimizer state            {leaf_bytes(state['opt_state']) / GiB:8.2f} GiB")
    if mem is not None:
        print(f"  arguments (state + batch)  {mem.argument_size_in_bytes / GiB:8.2f} GiB")
        print(f"  outputs (aliased {mem.alias_size_in_bytes / GiB:.2f})    {mem.output_size_in_bytes / GiB:8.2f} GiB")
        print(f"  temporaries (activations)  {mem.temp_size_in_bytes / GiB:8.2f} GiB")
        peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
                + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
        print(f"  peak estimate              {peak / GiB:8.2f} GiB")
    model_flops = sft.model_flops_per_token(cfg.llm, seq) * tokens
    print(f"model FLOPs per step (all devices, fwd+bwd, no remat): {model_flops:.4g} "
          f"({model_flops / len(devices):.4g} per device)")
    print(f"XLA cost analysis (per device): {flops:.4g} -- counts one layer of one micro-batch, since it "
          f"counts a loop body once")
    return 0


# An edit's prompt: the clip's audio ids (vq02 at 50/3 Hz + vq06 at 25 Hz, architecture.md §2) plus
# the instruction and transcript (about 100 text ids); the edited speech is about as long as the clip.
AUDIO_IDS_PER_SECOND = 50 / 3 + 25
TEXT_IDS = 100


def plan_inference(cfg, mesh, batches, clip_seconds) -> int:
    """Compile prefill and decode as `generate` sizes them (abstract shapes, nothing allocated) and
    print per-device bytes: params, KV cache, and each phase's temporaries."""
    import jax  # noqa: PLC0415  (after --devices sets XLA_FLAGS)
    import jax.numpy as jnp  # noqa: PLC0415  (after --devices sets XLA_FLAGS)

    from editx_jax import sharding  # noqa: PLC0415  (after --devices sets XLA_FLAGS)
    from editx_jax.generate import decode as dec  # noqa: PLC0415  (after --devices sets XLA_FLAGS)
    from editx_jax.models import llm  # noqa: PLC0415  (after --devices sets XLA_FLAGS)

    c, gen = cfg.llm, cfg.generation
    single = mesh.size == 1
    run_mesh = None if single else mesh
    params = llm.abstract_params(c)
    if not single:
        shardings = sharding.logical_to_sharding(llm.param_logical_axes(c), mesh)
        params = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                        params, shardings)
    params = llm.split_layers(params)  # the form EditX holds (one tree per layer)
    limit = min(gen.max_length, c.max_seq_len)
    print(f"LLM {c.num_params / 1e9:.2f}B, weights {c.param_dtype}, compute {c.dtype}; mesh {dict(mesh.shape)}; "
          f"max_length {gen.max_length}, max_new_tokens {gen.max_new_tokens}; GiB per device")
    print(f"{'batch':>5} {'clip s':>6} {'prompt':>6} {'cache':>6} {'params':>7} {'cache':>6} {'prefill tmp':>11} "
          f"{'decode tmp':>10} {'peak':>6}")
    for asked in batches:
        batch = asked + dec.idle_rows(asked, mesh)  # what generate compiles
        for seconds in clip_seconds:
            prompt = int(seconds * AUDIO_IDS_PER_SECOND) + TEXT_IDS
            if prompt >= limit:
                print(f"{batch:>5} {seconds:>6g}  prompt of {prompt} ids leaves no room under max_length {limit}")
                continue
            steps = min(gen.max_new_tokens, limit - prompt)
            p_len, slots, room = dec.widths(prompt, steps, limit, gen.min_prompt_bucket)
            cache = jax.eval_shape(functools.partial(llm.init_cache, c, batch, slots))
            ids = jax.ShapeDtypeStruct((batch, p_len), jnp.int32)
            m_pre = dec.prefill_jit(c, run_mesh).lower(params, ids, ids, cache).compile().memory_analysis()
            window = max(gen.repetition_window, 1)
            state = jax.eval_shape(functools.partial(
                dec.initial_state, c, llm.init_cache(c, batch, 1), jnp.zeros((batch, c.vocab_size)),
                jnp.zeros((batch, window), jnp.int32), jnp.zeros((batch,), jnp.int32), jnp.zeros((batch,), jnp.int32),
                room))
            state = state.replace(cache=cache)
            keys = jax.eval_shape(functools.partial(jax.random.split, jax.random.key(0), batch))
            rows = jax.ShapeDtypeStruct((batch,), jnp.int32)
            scalar = jax.ShapeDtypeStruct((), jnp.int32)
            m_dec = dec.decode_jit(c, gen, run_mesh).lower(params, state, keys, rows, scalar,
                                                           scalar).compile().memory_analysis()
            p_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params)) / mesh.size
            c_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(cache)) / mesh.size
            peak = p_bytes + c_bytes + max(m_pre.temp_size_in_bytes, m_dec.temp_size_in_bytes)
            print(f"{batch:>5} {seconds:>6g} {p_len:>6} {slots:>6} {p_bytes / GiB:>7.2f} {c_bytes / GiB:>6.2f} "
                  f"{m_pre.temp_size_in_bytes / GiB:>11.2f} {m_dec.temp_size_in_bytes / GiB:>10.2f} {peak / GiB:>6.2f}"
                  + (f"  ({asked} rows asked, padded with idle rows)" if batch != asked else ""))
    print("params and cache are split evenly in this estimate; XLA:CPU figures (temporaries differ by backend)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
