"""CAM++ converters (architecture.md §3.3.4, §4 item 4): a PyTorch state_dict in 3D-Speaker / funasr
`CAMPPlus` names, or the released `campplus.onnx`.

Both go through one path:

1. The source is read into torch names (`head.layer1.0.conv1.weight`, `xvector.block1.tdnnd1.
   nonlinear1.batchnorm.running_mean`, ...). For ONNX, every Conv and BatchNormalization node is named
   after its module scope (`/head/layer1/layer1.0/conv1/Conv`), so its weight inputs get the torch
   name even when the initializer itself is anonymous (`onnx::Conv_812`). The exporter folds a BN that
   directly follows a conv into that conv, so such a conv arrives with a bias and its BN is absent.
   When node names are missing the Conv nodes are matched to the modules in execution order.
2. `fold_state_dict` puts every BatchNorm in inference form, whichever of the two forms it came in:
   conv->BN pairs become one conv (kernel·s, (bias - mean)·s + beta with s = gamma/sqrt(var + eps));
   BNs that precede a ReLU become `<bn>.scale` / `<bn>.shift`. Conv2d kernels leave this step already
   in Flax HWIO layout (the key map's layouts cover 1-D convs only).
3. The key map (`rules(config)`) maps those names onto the params tree of
   `editx_jax.decoder.campplus.CAMPPlus`; every tensor used exactly once, every param filled once.

Config: `infer_config` reads the sizes from the tensors (dilations and the segment length are not in
the weights: the 3D-Speaker values (1, 2, 2) and 100 are assumed).
"""

from __future__ import annotations

import dataclasses
import os
import re

import numpy as np

from editx_jax.config import ConfigError
from editx_jax.convert.keymap import ConversionError, DictSource, Rule, convert, flatten, unflatten
from editx_jax.config.decoder import CAMPPlusConfig
from editx_jax.decoder.campplus import abstract_params

BN_EPS = 1e-5  # torch BatchNorm default; ONNX BatchNormalization nodes carry their own epsilon


# --------------------------------------------------------------------------- the module inventory


@dataclasses.dataclass(frozen=True)
class _Conv:
    conv: str  # torch module path of the conv
    target: str  # params path
    bn: str | None = None  # the BatchNorm that directly follows it (folded into it)
    ndim: int = 1
    bias: bool = True  # whether the params conv has a bias (own or folded)
    bn_affine: bool = True


@dataclasses.dataclass(frozen=True)
class _Affine:
    bn: str  # torch module path of the BatchNorm
    target: str


def _inventory(config: CAMPPlusConfig) -> list[_Conv | _Affine]:
    """Every conv and stand-alone BN of CAM++ in execution order (the order ONNX export emits them)."""
    items: list[_Conv | _Affine] = [_Conv("head.conv1", "head/conv1", "head.bn1", 2)]
    for stage in ("layer1", "layer2"):
        for i in (0, 1):
            p, t = f"head.{stage}.{i}", f"head/{stage}/{i}"
            items += [_Conv(f"{p}.conv1", f"{t}/conv1", f"{p}.bn1", 2),
                      _Conv(f"{p}.conv2", f"{t}/conv2", f"{p}.bn2", 2)]
            if i == 0:  # stride 2: the 1x1 shortcut conv + BN
                items.append(_Conv(f"{p}.shortcut.0", f"{t}/shortcut", f"{p}.shortcut.1", 2))
    items.append(_Conv("head.conv2", "head/conv2", "head.bn2", 2))
    items.append(_Conv("xvector.tdnn.linear", "xvector/tdnn", "xvector.tdnn.nonlinear.batchnorm"))
    for b, n in enumerate(config.num_layers, 1):
        for i in range(1, n + 1):
            p, t = f"xvector.block{b}.tdnnd{i}", f"xvector/block{b}/tdnnd{i}"
            items += [_Affine(f"{p}.nonlinear1.batchnorm", f"{t}/nonlinear1"),
                      _Conv(f"{p}.linear1", f"{t}/linear1", f"{p}.nonlinear2.batchnorm"),
                      _Conv(f"{p}.cam_layer.linear_local", f"{t}/cam_layer/linear_local", bias=False),
                      _Conv(f"{p}.cam_layer.linear1", f"{t}/cam_layer/linear1"),
                      _Conv(f"{p}.cam_layer.linear2", f"{t}/cam_layer/linear2")]
        items += [_Affine(f"xvector.transit{b}.nonlinear.batchnorm", f"xvector/transit{b}/nonlinear"),
                  _Conv(f"xvector.transit{b}.linear", f"xvector/transit{b}/linear", bias=False)]
    items += [_Affine("xvector.out_nonlinear.batchnorm", "xvector/out_nonlinear"),
              _Conv("xvector.dense.linear", "xvector/dense", "xvector.dense.nonlinear.batchnorm",
                    bn_affine=False)]
    return items


def rules(config: CAMPPlusConfig) -> list[Rule]:
    """Folded torch names -> params paths (one concrete rule per tensor: the blocks are not scanned)."""
    out = []
    for item in _inventory(config):
        if isinstance(item, _Affine):
            out += [Rule(f"{item.bn}.scale", f"{item.target}/scale"), Rule(f"{item.bn}.shift", f"{item.target}/bias")]
        else:
            out.append(Rule(f"{item.conv}.weight", f"{item.target}/kernel", "identity" if item.ndim == 2 else "conv1d"))
            if item.bias:
                out.append(Rule(f"{item.conv}.bias", f"{item.target}/bias"))
    return out


# ------------------------------------------------------------------------------------------ folding


class _Tensors:
    """The source dict with use tracking: each tensor may be taken once."""

    def __init__(self, tensors, eps):
        self.t = {k: v for k, v in tensors.items() if not k.endswith("num_batches_tracked")}
        self.eps = eps
        self.used: set[str] = set()

    def has(self, name):
        return name in self.t

    def take(self, name, size=None, required=True):
        if name not in self.t:
            if required:
                raise ConversionError(f"checkpoint is missing tensor {name!r}"
                                      + (f" (shape [{size}])" if size is not None else ""))
            return None
        if name in self.used:
            raise ConversionError(f"tensor {name!r} is used twice")
        self.used.add(name)
        arr = np.asarray(self.t[name], np.float64)
        if size is not None and arr.shape != (size,):
            raise ConversionError(f"tensor {name!r} has shape {list(arr.shape)}; expected [{size}]")
        return arr

    def bn(self, path, size, affine=True):
        """(scale, shift) of the eval BatchNorm at `path`."""
        mean = self.take(f"{path}.running_mean", size)
        var = self.take(f"{path}.running_var", size)
        gamma = self.take(f"{path}.weight", size, required=affine)
        beta = self.take(f"{path}.bias", size, required=affine)
        scale = (1.0 if gamma is None else gamma) / np.sqrt(var + self.eps.get(path, BN_EPS))
        return scale, (0.0 if beta is None else beta) - mean * scale


def fold_state_dict(tensors, config: CAMPPlusConfig, eps: dict[str, float] | None = None) -> dict[str, np.ndarray]:
    """Torch-named CAM++ tensors (plain or partly BN-folded) -> inference-form tensors (see module doc).

    `eps` maps BN module paths to their epsilon (default 1e-5). Missing tensors, misshapen BN vectors,
    tensors used twice and unknown tensors raise ConversionError naming the tensor.
    """
    src = _Tensors(tensors, eps or {})
    out: dict[str, np.ndarray] = {}
    last_transit = f"xvector.transit{len(config.num_layers)}.linear"
    carried_bias = None  # an ONNX-folded out_nonlinear BN leaves a bias on the last transit conv
    for item in _inventory(config):
        if isinstance(item, _Affine):
            size = _affine_size(item, config)
            if item.bn == "xvector.out_nonlinear.batchnorm" and not src.has(f"{item.bn}.running_mean") \
                    and carried_bias is not None:
                scale, shift = np.ones(size), carried_bias
            else:
                scale, shift = src.bn(item.bn, size)
                if item.bn == "xvector.out_nonlinear.batchnorm" and carried_bias is not None:
                    shift = shift + carried_bias * scale
            out[f"{item.bn}.scale"], out[f"{item.bn}.shift"] = scale, shift
            continue
        w = src.take(f"{item.conv}.weight")
        n_out = w.shape[0]
        b = src.take(f"{item.conv}.bias", n_out, required=False)
        if item.bn is not None and (src.has(f"{item.bn}.running_mean") or b is None):
            scale, shift = src.bn(item.bn, n_out, item.bn_affine)
            w = w * scale.reshape((-1,) + (1,) * (w.ndim - 1))
            b = shift if b is None else b * scale + shift
        if item.conv == last_transit and b is not None:
            carried_bias, b = b, None
        if item.bias:
            if b is None:
                raise ConversionError(f"checkpoint is missing tensor {item.conv + '.bias'!r} (shape [{n_out}])")
            out[f"{item.conv}.bias"] = b
        elif b is not None:
            raise ConversionError(f"tensor {item.conv + '.bias'!r} is unexpected: {item.conv} has no bias")
        if item.ndim == 2:
            if w.ndim != 4:
                raise ConversionError(f"tensor {item.conv + '.weight'!r} has shape {list(w.shape)}; expected a "
                                      f"4-D Conv2d weight [out, in, kh, kw]")
            w = w.transpose(2, 3, 1, 0)  # torch [out, in, kh, kw] -> Flax HWIO
        out[f"{item.conv}.weight"] = w
    unknown = sorted(set(src.t) - src.used)
    if unknown:
        raise ConversionError(f"unexpected tensor(s) in checkpoint: {', '.join(unknown[:10])}"
                              + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""))
    return {k: np.asarray(v, np.float32) for k, v in out.items()}


def _affine_size(item: _Affine, config: CAMPPlusConfig) -> int:
    if m := re.search(r"block(\d+)\.tdnnd(\d+)\.", item.bn):
        b, i = int(m[1]), int(m[2])
        return config.block_channels()[b - 1][0] + (i - 1) * config.growth_rate
    if m := re.search(r"transit(\d+)\.", item.bn):
        b = int(m[1])
        c_in = config.block_channels()[b - 1][0]
        return c_in + config.num_layers[b - 1] * config.growth_rate
    return config.out_channels


# --------------------------------------------------------------------------------------- config


def campplus_config_from_reference(ref: dict) -> CAMPPlusConfig:
    """From funasr/3D-Speaker `CAMPPlus(**kwargs)` arguments (fixture manifests, template.yaml)."""
    if ref.get("config_str", "batchnorm-relu") != "batchnorm-relu":
        raise ConfigError(f"campplus.config_str: only 'batchnorm-relu' is implemented, got {ref['config_str']!r}")
    if ref.get("output_level", "segment") != "segment":
        raise ConfigError(f"campplus.output_level: only 'segment' is implemented, got {ref['output_level']!r}")
    known = {"feat_dim", "embedding_size", "growth_rate", "bn_size", "init_channels"}
    unknown = sorted(set(ref) - known - {"config_str", "output_level", "memory_efficient"})
    if unknown:
        raise ConfigError(f"campplus: unknown option(s) {unknown}")
    return CAMPPlusConfig(**{k: ref[k] for k in known if k in ref})


def infer_config(tensors) -> CAMPPlusConfig:
    """CAM++ sizes from torch-named tensors (a state_dict or `onnx_to_state_dict`'s output)."""
    def shape(name):
        if name not in tensors:
            raise ConversionError(f"checkpoint is missing tensor {name!r} (needed to read the CAM++ sizes)")
        return tuple(np.shape(tensors[name]))

    m_channels = shape("head.conv1.weight")[0]
    init_channels, head_out = shape("xvector.tdnn.linear.weight")[:2]
    local = shape("xvector.block1.tdnnd1.cam_layer.linear_local.weight")
    growth = local[0]
    bn_channels = shape("xvector.block1.tdnnd1.linear1.weight")[0]
    layers = {}
    for name in tensors:
        if m := re.match(r"xvector\.block(\d+)\.tdnnd(\d+)\.", name):
            layers[int(m[1])] = max(layers.get(int(m[1]), 0), int(m[2]))
    num_layers = tuple(layers[b] for b in sorted(layers))
    defaults = CAMPPlusConfig()
    dilations = defaults.dilations if len(num_layers) == len(defaults.dilations) else (1,) * len(num_layers)
    try:
        return CAMPPlusConfig(feat_dim=head_out // m_channels * 8, embedding_size=shape("xvector.dense.linear.weight")[0],
                              growth_rate=growth, bn_size=bn_channels // growth, init_channels=init_channels,
                              m_channels=m_channels, num_layers=num_layers, kernel_size=local[-1],
                              dilations=dilations)
    except ConfigError as e:
        raise ConversionError(f"the checkpoint's sizes do not make a CAM++ config: {e}") from None


# ------------------------------------------------------------------------------------- converters


def from_state_dict(tensors, config: CAMPPlusConfig | None = None, eps: dict[str, float] | None = None) -> dict:
    """Params from a torch CAM++ state_dict (3D-Speaker / funasr names; numpy or torch tensors)."""
    tensors = {k: np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v) for k, v in tensors.items()}
    config = config or infer_config(tensors)
    return convert_folded(fold_state_dict(tensors, config, eps), config)


def convert_folded(folded: dict[str, np.ndarray], config: CAMPPlusConfig) -> dict:
    """Run the key map on inference-form tensors, one module at a time.

    The key map matches every tensor name against every rule; with ~500 concrete rules that is
    quadratic, so the rules are applied per parent module (a handful each). Together the groups
    still use every tensor once and fill every param once.
    """
    specs = flatten(abstract_params(config))
    groups: dict[str, list[Rule]] = {}
    for rule in rules(config):
        groups.setdefault(rule.target.rsplit("/", 1)[0], []).append(rule)
    unfilled = sorted(set(specs) - {r.target for g in groups.values() for r in g})
    if unfilled:  # pragma: no cover - the inventory and the model are written together
        raise ConversionError(f"no rule fills the model param(s) {unfilled[:5]}")
    owner = {r.source: module for module, g in groups.items() for r in g}
    unknown = sorted(set(folded) - set(owner))
    if unknown:
        raise ConversionError(f"unexpected tensor(s) in checkpoint: {', '.join(unknown[:10])}")
    out: dict[str, np.ndarray] = {}
    for module, group in groups.items():
        source = {r.source: folded[r.source] for r in group if r.source in folded}
        abstract = unflatten({r.target: specs[r.target] for r in group})
        out.update(flatten(convert(DictSource(source), group, abstract)))
    return unflatten(out)


def _scope_to_path(node_name: str) -> str | None:
    """'/head/layer1/layer1.0/conv1/Conv' -> 'head.layer1.0.conv1' (scopes of Sequential children
    repeat the parent's name: 'layer1.0' under 'layer1'). None for names without a scope."""
    parts = [p for p in node_name.split("/") if p][:-1]  # drop the op name
    if not parts:
        return None
    path: list[str] = []
    for part in parts:
        if path and part.startswith(".".join(path[-1:]) + "."):
            part = part[len(path[-1]) + 1:]
        elif path and part.startswith(".".join(path) + "."):  # a fully qualified scope
            part = part[len(".".join(path)) + 1:]
        path.append(part)
    return ".".join(path)


def onnx_to_state_dict(model) -> tuple[dict[str, np.ndarray], dict[str, float], CAMPPlusConfig]:
    """Read `campplus.onnx` (a path or a loaded ModelProto) into torch names.

    Returns (tensors, BN epsilons by module path, config). Conv weights of folded conv+BN pairs carry a
    bias and no BN; the stand-alone BNs keep their four vectors.
    """
    try:
        import onnx  # noqa: PLC0415  (onnx is optional, the convert extra)
        from onnx import numpy_helper  # noqa: PLC0415  (as above)
    except ImportError as e:  # pragma: no cover - onnx is in the convert extra
        raise ConversionError("reading campplus.onnx needs the `onnx` package") from e
    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        if not os.path.isfile(path):
            raise ConversionError(f"ONNX file not found: {path}")
        try:
            model = onnx.load(path)
        except Exception as e:  # DecodeError and friends for a non-ONNX file
            raise ConversionError(f"{path} is not a readable ONNX model ({type(e).__name__})") from None
    graph = model.graph
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:  # weights stored as Constant nodes, and Identity aliases of initializers
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
        elif node.op_type == "Identity" and node.input[0] in values:
            values[node.output[0]] = values[node.input[0]]

    def weights_of(node, slots):
        return [values[node.input[s]] if s < len(node.input) and node.input[s] in values else None for s in slots]

    convs = [n for n in graph.node if n.op_type == "Conv"]
    bns = [n for n in graph.node if n.op_type == "BatchNormalization"]
    if not convs:
        raise ConversionError("the ONNX graph has no Conv nodes: not a CAM++ model")
    named = [_scope_to_path(n.name) for n in convs]
    if all(named) and all(p.startswith(("head.", "xvector.")) for p in named):
        conv_paths = named
    else:
        conv_paths = _conv_paths_by_order(convs, values)
    bn_paths = _bn_paths(bns, convs, conv_paths, graph)
    tensors: dict[str, np.ndarray] = {}
    eps: dict[str, float] = {}

    def put(name, arr):
        if name in tensors:
            raise ConversionError(f"two ONNX nodes map to tensor {name!r}")
        tensors[name] = np.asarray(arr, np.float32)

    for node, path in zip(convs, conv_paths):
        w, b = weights_of(node, (1, 2))
        if w is None:
            raise ConversionError(f"ONNX node {node.name or node.output[0]!r}: the conv weight is not a constant")
        put(f"{path}.weight", w)
        if b is not None:
            put(f"{path}.bias", b)
    for node, path in zip(bns, bn_paths):
        arrs = weights_of(node, (1, 2, 3, 4))
        for key, arr in zip(("weight", "bias", "running_mean", "running_var"), arrs):
            if arr is None:
                raise ConversionError(f"ONNX node {node.name or node.output[0]!r}: BatchNormalization {key} "
                                      f"is not a constant")
            put(f"{path}.{key}", arr)
        eps[path] = next((a.f for a in node.attribute if a.name == "epsilon"), BN_EPS)
    return tensors, eps, infer_config(tensors)


def _conv_paths_by_order(convs, values) -> list[str]:
    """Without scope names: map the Conv nodes (in graph order) onto the CAM++ modules by structure.

    The 12 head convs and the TDNN come first, in module order, and the dense conv is last. In
    between, a dense layer is its 1x1 `linear1` followed by its three CAM convs in whatever order the
    exporter emitted them: `linear_local` (kernel > 1, input = linear1's output), `cam_layer.linear1`
    (1x1, input = linear1's output) and `cam_layer.linear2` (1x1, input half of that). Any other conv
    there is a transit layer, which closes a block.
    """
    shapes = [tuple(np.shape(values[n.input[1]])) if len(n.input) > 1 and n.input[1] in values else ()
              for n in convs]

    def fail(why):
        return ConversionError(f"the ONNX Conv nodes have no module scope names and cannot be mapped by "
                               f"order ({len(convs)} convs): {why}")

    if len(convs) < 16 or any(len(sh) != 4 for sh in shapes[:12]) or len(shapes[12]) != 3:
        raise fail("the first 12 convs must be the 2-D head and the 13th the TDNN")
    head = [x.conv for x in _inventory(CAMPPlusConfig(num_layers=(1,), dilations=(1,))) if isinstance(x, _Conv)]
    paths = head[:13] + [None] * (len(convs) - 13)
    paths[-1] = "xvector.dense.linear"

    def cam_roles(j):
        """{conv index: role} if convs j+1..j+3 are the CAM convs of a layer whose linear1 is conv j."""
        if j + 3 >= len(convs) - 1 or len(shapes[j]) != 3 or shapes[j][-1] != 1:
            return None
        bn = shapes[j][0]
        roles = {}
        for k in range(j + 1, j + 4):
            sh = shapes[k]
            if len(sh) != 3:
                return None
            if sh[-1] > 1 and sh[1] == bn:
                roles[k] = "cam_layer.linear_local"
            elif sh[-1] == 1 and sh[1] == bn and sh[0] == bn // 2:
                roles[k] = "cam_layer.linear1"
            elif sh[-1] == 1 and sh[1] == bn // 2:
                roles[k] = "cam_layer.linear2"
        return roles if sorted(roles.values()) == ["cam_layer.linear1", "cam_layer.linear2",
                                                   "cam_layer.linear_local"] else None

    j, block, layer = 13, 1, 0
    while j < len(convs) - 1:
        roles = cam_roles(j)
        if roles:
            layer += 1
            prefix = f"xvector.block{block}.tdnnd{layer}"
            paths[j] = f"{prefix}.linear1"
            for k, role in roles.items():
                paths[k] = f"{prefix}.{role}"
            j += 4
        else:
            if layer == 0:
                raise fail(f"conv {j} is neither a dense layer nor a transit after one")
            paths[j] = f"xvector.transit{block}.linear"
            block, layer, j = block + 1, 0, j + 1
    if j != len(convs) - 1 or layer:
        raise fail("the sequence does not end with a transit conv and the dense conv")
    return paths


def _bn_paths(bns, convs, conv_paths, graph) -> list[str]:
    """Module paths of the BatchNormalization nodes: from their scope names, else by position (a BN
    fed by a conv, through shape-only ops, is that conv's BN; the others follow in order)."""
    named = [_scope_to_path(n.name) for n in bns]
    if all(named) and all(p.startswith(("head.", "xvector.")) for p in named):
        return named
    producer = {o: n for n in graph.node for o in n.output}
    conv_path = {id(n): p for n, p in zip(convs, conv_paths)}
    layers = _layers_from_paths(conv_paths)
    config = CAMPPlusConfig(num_layers=layers, dilations=(1,) * len(layers))
    after_conv = {x.conv: x.bn for x in _inventory(config) if isinstance(x, _Conv) and x.bn}
    standalone = [x.bn for x in _inventory(config) if isinstance(x, _Affine)]
    out, k = [], 0
    for node in bns:
        src = producer.get(node.input[0])
        while src is not None and src.op_type in ("Squeeze", "Unsqueeze", "Reshape", "Identity"):
            src = producer.get(src.input[0])
        if src is not None and src.op_type == "Conv" and conv_path.get(id(src)) in after_conv:
            out.append(after_conv[conv_path[id(src)]])
        else:
            if k >= len(standalone):
                raise ConversionError("the ONNX graph has more BatchNormalization nodes than CAM++ has BNs")
            out.append(standalone[k])
            k += 1
    return out


def _layers_from_paths(paths) -> tuple[int, ...]:
    layers: dict[int, int] = {}
    for p in paths:
        if m := re.match(r"xvector\.block(\d+)\.tdnnd(\d+)\.", p):
            layers[int(m[1])] = max(layers.get(int(m[1]), 0), int(m[2]))
    return tuple(layers[b] for b in sorted(layers)) or CAMPPlusConfig().num_layers


def from_onnx(model, config: CAMPPlusConfig | None = None) -> dict:
    """Params from `campplus.onnx` (a path or a loaded ModelProto); sizes read from the file unless given."""
    tensors, eps, found = onnx_to_state_dict(model)
    config = config or found
    return convert_folded(fold_state_dict(tensors, config, eps), config)
