"""Meshes and the logical-axis rules: the one place that maps logical names to mesh axes.

Layers name logical axes only (`embed`, `heads`, `activation_batch`, ...). A rules table maps each
to mesh axes of the ('data', 'fsdp', 'tensor') mesh; `None` means replicated.
"""

from __future__ import annotations

import contextlib

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from editx_jax.config import MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")

# The LLM: batch over data x fsdp, weights' embed dim over fsdp (ZeRO-3 style), heads / kv heads /
# MLP / the lm_head's vocab over tensor (Megatron style). The KV cache follows the activations.
LLM_RULES: tuple[tuple[str, object], ...] = (
    ("activation_batch", BATCH),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    ("cache_batch", BATCH),
    # k/v rows are (sequence, kv group) pairs, batch-major: split over data x fsdp, then tensor, they
    # land where the sequences (data x fsdp) and the kv heads (tensor) of the activations are.
    ("cache_rows", (*BATCH, "tensor")),
    ("cache_length", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    # The embedding table's rows stay whole: a gather from a table split over both of its dims
    # makes XLA replicate it on every lookup ("involuntary full rematerialization").
    ("embed_vocab", None),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
)

# KV cache arrays of models/llm.py: per layer k, v [B * G, S, D] (rows batch-major); slot positions [B, S].
CACHE_KV_AXES = ("cache_rows", "cache_length", "head_dim")
CACHE_POS_AXES = ("cache_batch", "cache_length")


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh sized by `cfg` (-1 takes the rest of the devices)."""
    devices = jax.devices() if devices is None else devices
    shape = cfg.resolve(len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def logical_to_sharding(logical_tree, mesh: Mesh, rules=LLM_RULES):
    """NamedShardings for a tree of logical PartitionSpecs (e.g. `param_logical_axes(cfg)`)."""
    return nn.logical_to_mesh_sharding(logical_tree, mesh, list(rules))


def cache_shardings(mesh: Mesh, num_layers: int, rules=LLM_RULES) -> dict:
    """The shardings of `models.llm.init_cache(cfg, ...)`'s tree (`num_layers` k and v buffers)."""
    kv = NamedSharding(mesh, nn.logical_to_mesh_axes(CACHE_KV_AXES, list(rules)))
    return {"k": (kv,) * num_layers, "v": (kv,) * num_layers,
            "pos": NamedSharding(mesh, nn.logical_to_mesh_axes(CACHE_POS_AXES, list(rules)))}


def batch_sharding(mesh: Mesh, ndim: int = 2, axis: int = 0) -> NamedSharding:
    """Batch inputs: dimension `axis` (the rows) over data x fsdp, the rest replicated. Batch-major
    arrays ([B, ...]) use axis 0; SFT's [grad_accum, rows, length] batches axis 1."""
    return NamedSharding(mesh, PartitionSpec(*([None] * axis), BATCH, *([None] * (ndim - axis - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def place(tree, shardings):
    """Place a tree of host arrays onto devices with the matching tree of shardings."""
    return jax.tree_util.tree_map(lambda x, s: jax.device_put(x, s), tree, shardings)


shard_tree = place  # the name generate/decode.py and tests/test_sharding.py use


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules=LLM_RULES):
    """Activate a mesh and its rules so `nn.with_logical_constraint` in the layers takes effect."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(list(rules)):
        yield mesh


def split_factor(array) -> int:
    """How many ways an array is split across devices (1 = fully replicated)."""
    shard = array.sharding.shard_shape(array.shape)
    return int(np.prod(array.shape) // max(1, np.prod(shard)))
