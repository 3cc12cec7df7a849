"""Precision variants of an exported fp32 ONNX model: fp16 weights (GPU hosts) and int8 (CPU hosts).

* **fp16** (``onnxruntime.transformers.float16``): weights and activations in float16, graph inputs
  and outputs kept float32 (``keep_io_types``), so the serving code feeds and reads the same dtypes
  whatever the precision. Meant for the CUDA provider; on CPU, ONNX Runtime inserts casts around the
  operators it has no fp16 kernel for, so the model runs but slower than fp32.
* **int8** (``onnxruntime.quantization.quantize_dynamic``): linear weights stored as int8 (per
  output channel), activations quantised on the fly per call. The exported linears are ``Gemm``
  nodes, which the dynamic quantiser has no integer kernel for, so they are rewritten as ``MatMul``
  plus a bias ``Add`` first (:func:`gemms_to_matmuls`). Only MatMuls with a constant weight are quantised
  (``MatMulConstBOnly``): the attention score/softmax products stay float32, so the attention maps
  are computed from float scores. Dynamic quantisation needs no calibration data,
  which a deployer may not have at export time.
"""

from __future__ import annotations

import copy
import logging
import tempfile
from pathlib import Path

import onnx
from onnx import helper, numpy_helper

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """fp16 copy of an fp32 model with float32 inputs/outputs."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    # LayerNormalization/Softmax stay fp16 (ORT's CUDA kernels accumulate in fp32); the head's
    # contribution arithmetic is a few hundred flops and inherits fp16 like the rest.
    from onnxruntime.transformers.onnx_model import OnnxModel

    converted = convert_float_to_float16(copy.deepcopy(model), keep_io_types=True, disable_shape_infer=False)
    assert isinstance(converted, onnx.ModelProto)
    wrapped = OnnxModel(converted)
    wrapped.topological_sort()  # the converter appends the input casts at the end of the node list
    return wrapped.model


def weight_matmuls(model: onnx.ModelProto, min_dim: int = 16) -> list[str]:
    """Names of the MatMul/Gemm nodes whose B is a 2-D weight initializer (the backbone linears).

    Leaves out the head's small products (a 1-D weight vector breaks per-channel quantisation, and
    the per-image contributions should stay exact) and every activation × activation product.
    """
    shapes = {init.name: tuple(init.dims) for init in model.graph.initializer}
    names = []
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1:
            shape = shapes.get(node.input[1])
            if shape is not None and len(shape) == 2 and min(shape) >= min_dim:
                names.append(node.name)
    return names


def gemms_to_matmuls(model: onnx.ModelProto) -> onnx.ModelProto:
    """Copy of ``model`` with each plain ``Gemm`` on a 2-D weight initializer as ``MatMul`` (+ ``Add``).

    The exported graphs run their linears as ``Gemm`` (bias inside: ``training/export_vit.py``), but
    ``quantize_dynamic`` only has an integer kernel for ``MatMul``; ONNX Runtime fuses the quantised
    ``MatMul`` and its bias ``Add`` again. A weight stored for ``transB=1`` is transposed in place
    (or copied, if another node reads it too).
    """
    out = copy.deepcopy(model)
    graph = out.graph
    inits = {init.name: init for init in graph.initializer}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        weight = inits.get(node.input[1]) if node.op_type == "Gemm" and len(node.input) > 1 else None
        if (
            weight is None
            or len(weight.dims) != 2
            or attrs.get("transA", 0)
            or attrs.get("alpha", 1.0) != 1.0
            or attrs.get("beta", 1.0) != 1.0
        ):
            nodes.append(node)
            continue
        b_name = weight.name
        if attrs.get("transB", 0):
            flipped = numpy_helper.to_array(weight).T.copy()
            if uses[weight.name] == 1:
                weight.CopyFrom(numpy_helper.from_array(flipped, weight.name))
            else:
                b_name = f"{weight.name}_transposed"
                if b_name not in inits:
                    inits[b_name] = numpy_helper.from_array(flipped, b_name)
                    graph.initializer.append(inits[b_name])
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        product = f"{node.output[0]}_matmul" if bias else node.output[0]
        nodes.append(
            helper.make_node("MatMul", [node.input[0], b_name], [product], name=f"{node.name}_matmul")
        )
        if bias:
            nodes.append(helper.make_node("Add", [product, bias], [node.output[0]], name=f"{node.name}_bias"))
    del graph.node[:]
    graph.node.extend(nodes)
    return out


class _DropPreprocessHint(logging.Filter):
    """quantize_dynamic logs a generic "consider pre-processing" hint on the root logger every call."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


def to_int8(model: onnx.ModelProto, *, per_channel: bool = True) -> onnx.ModelProto:
    """Dynamically quantised int8 copy (weights int8, activations quantised per call)."""
    hint = _DropPreprocessHint()
    logging.getLogger().addFilter(hint)
    try:
        return _quantize(model, per_channel)
    finally:
        logging.getLogger().removeFilter(hint)


def _quantize(model: onnx.ModelProto, per_channel: bool) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="hyperct-int8-") as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        plain = gemms_to_matmuls(model)
        # the exporter's value_info annotations trip the quantiser's shape inference; it re-infers them
        del plain.graph.value_info[:]
        onnx.save_model(plain, str(src))
        quantize_dynamic(
            str(src),
            str(dst),
            weight_type=QuantType.QInt8,
            per_channel=per_channel,
            op_types_to_quantize=["MatMul"],
            nodes_to_quantize=weight_matmuls(plain),
            extra_options={"MatMulConstBOnly": True},
        )
        return onnx.load_model(str(dst))


def convert_precision(model: onnx.ModelProto, precision: str) -> onnx.ModelProto:
    """Return ``model`` (fp32) converted to ``precision`` ("fp32" returns it unchanged)."""
    if precision == "fp32":
        return model
    if precision == "fp16":
        return to_fp16(model)
    if precision == "int8":
        return to_int8(model)
    raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
