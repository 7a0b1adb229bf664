"""Writing small ONNX graphs without the `onnx` package: a node list serialized to ModelProto bytes.

Serving builds MemGuard's Phase I graph (`purifier.defenses.phase1`) from the fitted weights when
a defense is loaded; the slim install has onnxruntime and protobuf but not `onnx`, and a graph
built at load time also serves every defense directory fitted before it existed. The encoder
writes the protobuf wire format of the few ONNX messages a graph needs (field numbers from
onnx.proto: ModelProto, GraphProto, NodeProto, AttributeProto, TensorProto, ValueInfoProto);
tests/unit/models/test_onnx_graph.py parses its output with the `onnx` package and its checker.

    g = GraphBuilder("example")
    x = g.input("x", np.float64, ("N", 4))
    y = g.op("Relu", g.op("Add", x, g.const(np.ones(4))))
    g.output(y, "y", np.float64, ("N", 4))
    session = onnxruntime.InferenceSession(g.model_bytes())
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import numpy as np

OPSET = 17
IR_VERSION = 8
# TensorProto.DataType for the numpy dtypes a graph uses
DTYPES = {np.dtype(np.float32): 1, np.dtype(np.int32): 6, np.dtype(np.int64): 7, np.dtype(np.bool_): 9,
          np.dtype(np.float64): 11}
_ATTR_FLOAT, _ATTR_INT, _ATTR_STRING, _ATTR_FLOATS, _ATTR_INTS = 1, 2, 3, 6, 7


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int64 as two's complement, as protobuf does
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _int(field: int, value: int) -> bytes:
    return _varint(field << 3) + _varint(value)


def _bytes(field: int, value: bytes | str) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return _varint(field << 3 | 2) + _varint(len(data)) + data


def _float(field: int, value: float) -> bytes:
    return _varint(field << 3 | 5) + struct.pack("<f", value)


def _attribute(name: str, value) -> bytes:
    """AttributeProto: name 1, f 2, i 3, s 4, floats 7, ints 8, type 20."""
    out = _bytes(1, name)
    if isinstance(value, bool | int | np.integer):
        return out + _int(3, int(value)) + _int(20, _ATTR_INT)
    if isinstance(value, float):
        return out + _float(2, value) + _int(20, _ATTR_FLOAT)
    if isinstance(value, str):
        return out + _bytes(4, value) + _int(20, _ATTR_STRING)
    values = list(value)
    if values and all(isinstance(v, int | np.integer) for v in values):
        return out + b"".join(_int(8, int(v)) for v in values) + _int(20, _ATTR_INTS)
    return out + b"".join(_float(7, float(v)) for v in values) + _int(20, _ATTR_FLOATS)


def _tensor(name: str, array: np.ndarray) -> bytes:
    """TensorProto: dims 1, data_type 2, name 8, raw_data 9 (little-endian)."""
    a = np.asarray(array)  # 0-d stays 0-d (a scalar, no dims)
    return (b"".join(_int(1, d) for d in a.shape) + _int(2, DTYPES[a.dtype]) + _bytes(8, name)
            + _bytes(9, a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes(order="C")))


def _value_info(name: str, dtype, shape: Sequence[int | str]) -> bytes:
    """ValueInfoProto name 1, type 2 -> TypeProto tensor_type 1 -> elem_type 1, shape 2 -> dim 1."""
    dims = b"".join(_bytes(1, _int(1, d) if isinstance(d, int) else _bytes(2, d)) for d in shape)
    tensor_type = _int(1, DTYPES[np.dtype(dtype)]) + _bytes(2, dims)
    return _bytes(1, name) + _bytes(2, _bytes(1, tensor_type))


class GraphBuilder:
    """A graph under construction: inputs, constants (initializers), nodes and outputs, in order."""

    def __init__(self, name: str):
        self.name = name
        self._inputs: list[bytes] = []
        self._outputs: list[bytes] = []
        self._initializers: list[bytes] = []
        self._nodes: list[bytes] = []
        self.op_types: list[str] = []  # every node's op, in graph order
        self._count = 0

    def _fresh(self, stem: str) -> str:
        self._count += 1
        return f"{stem}_{self._count}"

    def input(self, name: str, dtype, shape: Sequence[int | str]) -> str:
        self._inputs.append(_value_info(name, dtype, shape))
        return name

    def const(self, array, dtype=None) -> str:
        """An initializer holding `array` (numpy dtype kept unless `dtype` is given)."""
        name = self._fresh("const")
        self._initializers.append(_tensor(name, np.asarray(array, dtype)))
        return name

    def op(self, op_type: str, *inputs: str, outputs: int = 1, **attributes):
        """Add a node; returns its output name (or a tuple of `outputs` names)."""
        names = [self._fresh(op_type.lower()) for _ in range(outputs)]
        node = (b"".join(_bytes(1, i) for i in inputs) + b"".join(_bytes(2, o) for o in names)
                + _bytes(3, names[0]) + _bytes(4, op_type)
                + b"".join(_bytes(5, _attribute(k, v)) for k, v in sorted(attributes.items())))
        self._nodes.append(node)
        self.op_types.append(op_type)
        return names[0] if outputs == 1 else tuple(names)

    def output(self, value: str, name: str, dtype, shape: Sequence[int | str]) -> None:
        """Expose `value` as graph output `name` (through an Identity node)."""
        self._nodes.append(_bytes(1, value) + _bytes(2, name) + _bytes(3, name) + _bytes(4, "Identity"))
        self.op_types.append("Identity")
        self._outputs.append(_value_info(name, dtype, shape))

    def model_bytes(self, producer: str = "purifier") -> bytes:
        """ModelProto: ir_version 1, producer_name 2, graph 7, opset_import 8."""
        graph = (b"".join(_bytes(1, n) for n in self._nodes) + _bytes(2, self.name)
                 + b"".join(_bytes(5, t) for t in self._initializers)
                 + b"".join(_bytes(11, i) for i in self._inputs) + b"".join(_bytes(12, o) for o in self._outputs))
        return (_int(1, IR_VERSION) + _bytes(2, producer) + _bytes(7, graph)
                + _bytes(8, _bytes(1, "") + _int(2, OPSET)))
