"""Loading an InsightFace recognition ONNX file into a fused :class:`IResNet`.

Released InsightFace ONNX files (e.g. ``w600k_r50.onnx``) were exported in eval mode, so every
Conv+BatchNorm pair arrives folded into a single biased convolution; for those the network is
built in *fused* form (biased convs, the folded BatchNorms replaced by ``nn.Identity``), which
reproduces the file exactly instead of guessing the lost BatchNorm factors.  The ONNX graph is
parsed by structure (not by initializer names, which exporters and simplifiers renumber), so the
loader also accepts unfolded graphs (their BatchNorms are folded here).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from controlnet_ray.model.iresnet.blocks import IBasicBlock
from controlnet_ray.model.iresnet.file_checks import (
    WeightsError,
    _check_depth,
    _input_size_from_fc,
    depth_from_layers,
)
from controlnet_ray.model.iresnet.network import IResNet, iresnet

if TYPE_CHECKING:
    from onnx import ModelProto, NodeProto


class _Graph:
    """Just enough of an ONNX graph to walk it by data flow."""

    def __init__(self, model: ModelProto, source: str) -> None:
        from onnx import numpy_helper

        graph = model.graph
        self.source = source
        self.consts: dict[str, np.ndarray] = {
            t.name: numpy_helper.to_array(t) for t in graph.initializer
        }
        self.consumers: dict[str, list[NodeProto]] = defaultdict(list)
        for node in graph.node:
            if node.op_type == "Constant":
                self.consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
                continue
            for inp in node.input:
                if inp and inp not in self.consts:
                    self.consumers[inp].append(node)
        inputs = [i for i in graph.input if i.name not in self.consts]
        if len(inputs) != 1:
            raise WeightsError(f"{source}: expected one image input, found {len(inputs)}")
        self.input_name: str = inputs[0].name

    @staticmethod
    def attrs(node: NodeProto) -> dict[str, Any]:
        from onnx import helper

        return {a.name: helper.get_attribute_value(a) for a in node.attribute}

    def const(self, node: NodeProto, index: int) -> np.ndarray:
        name = node.input[index]
        if name not in self.consts:
            raise WeightsError(
                f"{self.source}: input {index} of node {_label(node)} is not a "
                "constant (weights computed at run time are not supported)"
            )
        return self.consts[name]

    def next(self, tensor: str, op_types: tuple[str, ...]) -> NodeProto:
        """The single consumer of ``tensor`` (skipping Identity/Dropout), of one of op_types."""
        consumers = self.consumers.get(tensor, [])
        while len(consumers) == 1 and consumers[0].op_type in ("Identity", "Dropout"):
            consumers = self.consumers.get(consumers[0].output[0], [])
        if len(consumers) != 1 or consumers[0].op_type not in op_types:
            found = [c.op_type for c in consumers]
            raise WeightsError(
                f"{self.source}: expected {op_types} after tensor {tensor!r}, "
                f"found {found}; not an arcface_torch iresnet export"
            )
        return consumers[0]


def _label(node: NodeProto) -> str:
    return f"{node.op_type}({node.name or node.output[0]})"


class _ConvParams:
    """A conv (with any following BatchNorm folded in) read from the graph."""

    def __init__(self, g: _Graph, node: NodeProto) -> None:
        attrs = g.attrs(node)
        if attrs.get("group", 1) != 1 or any(d != 1 for d in attrs.get("dilations", [1, 1])):
            raise WeightsError(f"{g.source}: grouped/dilated conv {_label(node)} not supported")
        self.weight = g.const(node, 1).astype(np.float32)
        self.bias = (
            g.const(node, 2).astype(np.float32)
            if len(node.input) > 2 and node.input[2]
            else np.zeros(self.weight.shape[0], np.float32)
        )
        self.stride = tuple(attrs.get("strides", [1, 1]))
        self.out = node.output[0]
        self.node = node
        after = g.consumers.get(self.out, [])
        if len(after) == 1 and after[0].op_type == "BatchNormalization":  # unfolded export
            scale, shift = _bn_affine(g, after[0])
            self.weight = self.weight * scale[:, None, None, None]
            self.bias = self.bias * scale + shift
            self.out = after[0].output[0]


def _bn_affine(g: _Graph, node: NodeProto) -> tuple[np.ndarray, np.ndarray]:
    gamma, beta, mean, var = (g.const(node, i).astype(np.float64) for i in range(1, 5))
    eps = float(g.attrs(node).get("epsilon", 1e-5))
    scale = gamma / np.sqrt(var + eps)
    return scale.astype(np.float32), (beta - mean * scale).astype(np.float32)


def _set_conv(conv: nn.Conv2d, p: _ConvParams, source: str) -> None:
    if tuple(conv.weight.shape) != p.weight.shape or tuple(conv.stride) != p.stride:
        raise WeightsError(
            f"{source}: conv {_label(p.node)} has weight {p.weight.shape} stride {p.stride}, "
            f"expected {tuple(conv.weight.shape)} stride {tuple(conv.stride)}"
        )
    conv.weight.data.copy_(torch.from_numpy(p.weight))
    if conv.bias is None:
        raise TypeError("ONNX weights load only into a fused IResNet (biased convs)")
    conv.bias.data.copy_(torch.from_numpy(p.bias))


def _set_bn(bn: nn.Module, g: _Graph, node: NodeProto) -> None:
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        raise TypeError(f"expected a BatchNorm module for {_label(node)}, got {type(bn).__name__}")
    vals = [torch.from_numpy(g.const(node, i).astype(np.float32).reshape(-1)) for i in range(1, 5)]
    if vals[0].numel() != bn.num_features:
        raise WeightsError(
            f"{g.source}: BatchNorm {_label(node)} has {vals[0].numel()} "
            f"channels, expected {bn.num_features}"
        )
    for target, value in zip(
        (bn.weight, bn.bias, bn.running_mean, bn.running_var), vals, strict=True
    ):
        target.data.copy_(value)
    bn.eps = float(g.attrs(node).get("epsilon", 1e-5))


def _set_prelu(prelu: nn.PReLU, g: _Graph, node: NodeProto) -> None:
    slope = torch.from_numpy(g.const(node, 1).astype(np.float32).reshape(-1))
    if slope.numel() != prelu.weight.numel():
        raise WeightsError(
            f"{g.source}: PRelu {_label(node)} has {slope.numel()} slopes, "
            f"expected {prelu.weight.numel()}"
        )
    prelu.weight.data.copy_(slope)


class _BlockParams:
    """One IBasicBlock found in the graph, starting at its input tensor."""

    def __init__(self, g: _Graph, tensor: str) -> None:
        consumers = g.consumers.get(tensor, [])
        bns = [c for c in consumers if c.op_type == "BatchNormalization"]
        if len(consumers) != 2 or len(bns) != 1:
            raise WeightsError(
                f"{g.source}: tensor {tensor!r} does not start an iresnet block "
                f"(consumers {[c.op_type for c in consumers]})"
            )
        self.bn1 = bns[0]
        self.conv1 = _ConvParams(g, g.next(self.bn1.output[0], ("Conv",)))
        self.prelu = g.next(self.conv1.out, ("PRelu",))
        self.conv2 = _ConvParams(g, g.next(self.prelu.output[0], ("Conv",)))
        self.add = g.next(self.conv2.out, ("Add",))
        other = [i for i in self.add.input if i != self.conv2.out]
        self.downsample: _ConvParams | None = None
        if other != [tensor]:
            ds = [c for c in consumers if c.op_type == "Conv"]
            if not ds:
                raise WeightsError(f"{g.source}: cannot find the shortcut of block at {tensor!r}")
            self.downsample = _ConvParams(g, ds[0])
            if other != [self.downsample.out]:
                raise WeightsError(
                    f"{g.source}: shortcut of {_label(self.add)} is not the "
                    "downsample conv of its block"
                )
        self.out = self.add.output[0]

    def load_into(self, block: IBasicBlock, g: _Graph) -> None:
        _set_bn(block.bn1, g, self.bn1)
        _set_conv(block.conv1, self.conv1, g.source)
        _set_prelu(block.prelu, g, self.prelu)
        _set_conv(block.conv2, self.conv2, g.source)
        if (self.downsample is None) != (block.downsample is None):
            raise WeightsError(
                f"{g.source}: shortcut of block at {_label(self.add)} does not "
                "match the iresnet layout"
            )
        if self.downsample is not None and block.downsample is not None:
            _set_conv(block.downsample[0], self.downsample, g.source)


def _parse_head(
    g: _Graph, tensor: str
) -> tuple[NodeProto, np.ndarray, np.ndarray, NodeProto | None]:
    """Final BN -> Flatten -> fc (Gemm or MatMul+Add) -> optional features BN."""
    bn2 = g.next(tensor, ("BatchNormalization",))
    flat = g.next(bn2.output[0], ("Flatten", "Reshape"))
    fc = g.next(flat.output[0], ("Gemm", "MatMul"))
    if fc.op_type == "Gemm":
        attrs = g.attrs(fc)
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1:
            raise WeightsError(f"{g.source}: unsupported Gemm attributes {attrs}")
        w = g.const(fc, 1)
        w = w if attrs.get("transB", 0) else w.T
        b = g.const(fc, 2) if len(fc.input) > 2 else np.zeros(w.shape[0], np.float32)
        out = fc.output[0]
    else:
        w = g.const(fc, 1).T
        add = g.next(fc.output[0], ("Add",))
        bias_name = [i for i in add.input if i != fc.output[0]][0]
        b, out = g.consts[bias_name], add.output[0]
    consumers = g.consumers.get(out, [])
    features = consumers[0] if len(consumers) == 1 else None
    if features is not None and features.op_type != "BatchNormalization":
        raise WeightsError(f"{g.source}: unexpected {_label(features)} after the fc layer")
    return bn2, np.ascontiguousarray(w), b, features


def load_iresnet_onnx(path: str | Path, depth: int | None = None) -> IResNet:
    """InsightFace recognition ONNX (BN folded or not) -> fused IResNet with the same outputs."""
    import onnx

    try:
        model_proto = onnx.load(str(path))
    except Exception as exc:  # noqa: BLE001 - re-raised with the file name
        raise WeightsError(f"{path}: cannot be read as ONNX ({exc})") from exc
    g = _Graph(model_proto, str(path))
    first = g.next(g.input_name, ("Conv", "Sub", "Mul"))
    if first.op_type != "Conv":
        raise WeightsError(
            f"{path}: starts with {first.op_type} (an MXNet-converted model?); "
            "only arcface_torch iresnet exports are supported"
        )
    stem = _ConvParams(g, first)
    stem_prelu = g.next(stem.out, ("PRelu",))
    tensor = stem_prelu.output[0]
    blocks: list[_BlockParams] = []
    while len(g.consumers.get(tensor, [])) == 2:
        blocks.append(_BlockParams(g, tensor))
        tensor = blocks[-1].out
    starts = [i for i, b in enumerate(blocks) if b.downsample is not None] + [len(blocks)]
    if len(starts) != 5 or starts[0] != 0:
        raise WeightsError(f"{path}: found {len(starts) - 1} downsampling stages, expected 4")
    layers = tuple(starts[i + 1] - starts[i] for i in range(4))
    file_depth = depth_from_layers(layers, str(path))
    _check_depth(file_depth, depth, path)
    bn2, fc_w, fc_b, features = _parse_head(g, tensor)
    net = iresnet(file_depth, _input_size_from_fc(fc_w.shape[1], str(path)), fused=True)
    _set_conv(net.conv1, stem, str(path))
    _set_prelu(net.prelu, g, stem_prelu)
    net_blocks = [b for stage in (net.layer1, net.layer2, net.layer3, net.layer4) for b in stage]
    for params, block in zip(blocks, net_blocks, strict=True):
        params.load_into(block, g)
    _set_bn(net.bn2, g, bn2)
    if tuple(net.fc.weight.shape) != fc_w.shape:
        raise WeightsError(f"{path}: fc weight {fc_w.shape}, expected {tuple(net.fc.weight.shape)}")
    net.fc.weight.data.copy_(torch.from_numpy(fc_w.astype(np.float32)))
    net.fc.bias.data.copy_(torch.from_numpy(fc_b.astype(np.float32).reshape(-1)))
    if features is not None:
        _set_bn(net.features, g, features)
    else:  # features BN folded away: make it an exact identity in eval mode
        net.features = nn.Identity()  # type: ignore[assignment]
    return net
