"""Plan a training mesh before renting one: lower and compile the SFT step ahead of time for N devices
and print XLA's per-device memory analysis and FLOPs per step. Nothing is allocated.

    python tools/plan_memory.py --config configs/sft_step_audio_editx.yaml --devices 4 --mesh 1,4,1
    python tools/plan_memory.py --config configs/sft_step_audio_editx.yaml --devices 1 --batch 8 --seq 1536

Runs on CPU with fake devices (`--devices` sets XLA's host device count before jax starts), so the
figures are those of the XLA CPU compiler: buffer sizes (params, optimizer state, activations and
temporaries under the chosen remat policy) carry over to GPU/TPU closely, fusion-dependent temporaries
less so. Run it on the target backend (`--platform`) for exact numbers.
"""

from __future__ import annotations

import argparse
import os
import sys

GiB = 1024 ** 3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/sft_step_audio_editx.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--devices", type=int, default=8, help="fake CPU devices to plan for")
    p.add_argument("--mesh", help="data,fsdp,tensor (default: the config's mesh)")
    p.add_argument("--batch", type=int, help="rows per step (default: train.batch_size)")
    p.add_argument("--grad-accum", type=int, help="micro-batches per step (default: train.grad_accum)")
    p.add_argument("--seq", type=int, help="tokens per row (default: data.max_length)")
    p.add_argument("--platform", default="cpu", help="cpu (fake devices) or the real backend")
    args = p.parse_args(argv)
    if args.platform == "cpu":
        os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices} " + \
            os.environ.get("XLA_FLAGS", "")
        os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    from editx_jax import sharding
    from editx_jax.config import ConfigError, MeshConfig, load_config
    from editx_jax.data.dataset import BATCH_KEYS
    from editx_jax.train import sft
    from editx_jax.train import state as st

    try:
        cfg = load_config(args.config, args.overrides)
        mesh_cfg = MeshConfig(*map(int, args.mesh.split(","))) if args.mesh else cfg.mesh
        devices = jax.devices()[:args.devices]
        mesh = sharding.make_mesh(mesh_cfg, devices)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    batch = args.batch or cfg.train.batch_size
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


if __name__ == "__main__":
    sys.exit(main())
