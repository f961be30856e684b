"""Real ONNX models built with onnx.helper for tests, the demo and the benchmarks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def mlp(
    path: Path,
    *,
    inputs: int = 4,
    hidden: int = 16,
    outputs: int = 3,
    seed: int = 0,
    layers: int = 1,
    batch: int | str = "N",
) -> Path:
    """x[N, inputs] -> (MatMul+Add+Relu) x layers -> MatMul+Add -> y[N, outputs]."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    prev, width = "x", inputs
    for i in range(layers):
        w = (rng.standard_normal((width, hidden)) / np.sqrt(width)).astype(np.float32)
        b = (rng.standard_normal(hidden) * 0.1).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes += [
            helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"]),
            helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"]),
            helper.make_node("Relu", [f"a{i}"], [f"h{i}"]),
        ]
        prev, width = f"h{i}", hidden
    w = (rng.standard_normal((width, outputs)) / np.sqrt(width)).astype(np.float32)
    b = (rng.standard_normal(outputs) * 0.1).astype(np.float32)
    inits += [numpy_helper.from_array(w, "wo"), numpy_helper.from_array(b, "bo")]
    nodes += [
        helper.make_node("MatMul", [prev, "wo"], ["mo"]),
        helper.make_node("Add", ["mo", "bo"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, inputs])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, outputs])],
        initializer=inits,
    )
    return _save(graph, path)


def heavy(path: Path, *, width: int = 1024, layers: int = 4, seed: int = 1) -> Path:
    """A compute-heavy MLP: single-row compute well above 0.5 ms on a laptop core."""
    return mlp(path, inputs=width, hidden=width, outputs=width, layers=layers, seed=seed)


ONNX_TYPES = {
    "BOOL": TensorProto.BOOL,
    "UINT8": TensorProto.UINT8,
    "UINT16": TensorProto.UINT16,
    "UINT32": TensorProto.UINT32,
    "UINT64": TensorProto.UINT64,
    "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16,
    "INT32": TensorProto.INT32,
    "INT64": TensorProto.INT64,
    "FP16": TensorProto.FLOAT16,
    "FP32": TensorProto.FLOAT,
    "FP64": TensorProto.DOUBLE,
    "BYTES": TensorProto.STRING,
}


def identity(path: Path, datatype: str, width: int = 3) -> Path:
    """x[N, width] of ``datatype`` -> y = Identity(x): round-trips every wire datatype."""
    elem = ONNX_TYPES[datatype]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        f"identity_{datatype.lower()}",
        [helper.make_tensor_value_info("x", elem, ["N", width])],
        [helper.make_tensor_value_info("y", elem, ["N", width])],
    )
    return _save(graph, path)


def nan_model(path: Path, width: int = 4) -> Path:
    """y = Sqrt(x - 1000): NaN for every ordinary input."""
    graph = helper.make_graph(
        [
            helper.make_node("Sub", ["x", "k"], ["d"]),
            helper.make_node("Sqrt", ["d"], ["y"]),
        ],
        "nan",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width])],
        initializer=[numpy_helper.from_array(np.array(1000.0, dtype=np.float32), "k")],
    )
    return _save(graph, path)


def log_model(path: Path, width: int = 4) -> Path:
    """x[N, width] -> log = Log(x), same = Identity(x): finite for positive inputs (the bundle's
    samples), NaN for negative ones, -Infinity for 0, Infinity for Infinity."""
    graph = helper.make_graph(
        [helper.make_node("Log", ["x"], ["log"]), helper.make_node("Identity", ["x"], ["same"])],
        "log",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
        [
            helper.make_tensor_value_info("log", TensorProto.FLOAT, ["N", width]),
            helper.make_tensor_value_info("same", TensorProto.FLOAT, ["N", width]),
        ],
    )
    return _save(graph, path)


def reshape_model(path: Path) -> Path:
    """x[N, 4] -> Reshape to [-1, 3]: fails at run time unless 4N is a multiple of 3."""
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "s"], ["y"])],
        "reshape",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", 3])],
        initializer=[numpy_helper.from_array(np.array([-1, 3], dtype=np.int64), "s")],
    )
    return _save(graph, path)


def two_inputs(path: Path) -> Path:
    """a[N, 2] (FP32), b[N, 2] (FP32) -> sum = a + b, prod = a * b."""
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["a", "b"], ["sum"]),
            helper.make_node("Mul", ["a", "b"], ["prod"]),
        ],
        "two_inputs",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 2]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 2]),
        ],
        [
            helper.make_tensor_value_info("sum", TensorProto.FLOAT, ["N", 2]),
            helper.make_tensor_value_info("prod", TensorProto.FLOAT, ["N", 2]),
        ],
    )
    return _save(graph, path)


def sample_array(datatype: str, rows: int = 2, width: int = 3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if datatype == "BOOL":
        return rng.integers(0, 2, (rows, width)).astype(bool)
    if datatype == "BYTES":
        return np.array([[f"s{r}-{c}" for c in range(width)] for r in range(rows)], dtype=object)
    from modelfleet.kernel.datatypes import NUMPY_BY_DATATYPE

    dtype = NUMPY_BY_DATATYPE[datatype]
    if dtype.kind == "f":
        return rng.standard_normal((rows, width)).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(max(info.min, -100), min(info.max, 100), (rows, width)).astype(dtype)


def classifier(
    path: Path,
    *,
    inputs: int = 4,
    classes: int = 5,
    seed: int = 0,
    hidden: int = 16,
    layers: int = 1,
) -> Path:
    """x[N, inputs] -> MLP -> Softmax -> probs[N, classes] and logits[N, classes]: class
    scores and probability vectors, for comparing versions output by output."""
    base = onnx.load(
        str(
            mlp(
                path.with_suffix(".mlp.onnx"),
                inputs=inputs,
                hidden=hidden,
                outputs=classes,
                seed=seed,
                layers=layers,
            )
        )
    )
    graph = base.graph
    graph.node.append(helper.make_node("Identity", ["y"], ["logits"]))
    graph.node.append(helper.make_node("Softmax", ["y"], ["probs"], axis=-1))
    del graph.output[:]
    graph.output.extend(
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes]),
            helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", classes]),
        ]
    )
    return _save(graph, path)


def linear_classifier(path: Path, weights: np.ndarray) -> Path:
    """x[N, k] -> scores[N, classes] = x @ weights: a classifier whose accuracy a test knows
    (the class is the argmax, so the weights decide exactly which inputs it gets right)."""
    w = np.asarray(weights, np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["scores"])],
        "linear_classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", w.shape[0]])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", w.shape[1]])],
        initializer=[numpy_helper.from_array(w, "w")],
    )
    return _save(graph, path)


def slow_mlp(
    path: Path, *, inputs: int = 4, outputs: int = 3, width: int = 1024, repeats: int = 16
) -> Path:
    """x[N, inputs] -> ``repeats`` x (MatMul by one shared [width, width] weight + Relu) ->
    y[N, outputs]: the compute of a deep MLP with the file size of a shallow one, for a model
    many times slower than :func:`mlp` with the same signature."""
    rng = np.random.default_rng(3)
    w_in = (rng.standard_normal((inputs, width)) / np.sqrt(inputs)).astype(np.float32)
    w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
    w_out = (rng.standard_normal((width, outputs)) / np.sqrt(width)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w_in"], ["h0"])]
    for i in range(repeats):
        nodes += [
            helper.make_node("MatMul", [f"h{i}", "w"], [f"m{i}"]),
            helper.make_node("Relu", [f"m{i}"], [f"h{i + 1}"]),
        ]
    nodes.append(helper.make_node("MatMul", [f"h{repeats}", "w_out"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "slow_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", inputs])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", outputs])],
        initializer=[
            numpy_helper.from_array(w_in, "w_in"),
            numpy_helper.from_array(w, "w"),
            numpy_helper.from_array(w_out, "w_out"),
        ],
    )
    return _save(graph, path)
