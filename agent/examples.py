"""``modelfleet-agent bundle example``: two small real models to try the quickstarts with.

The README's quickstarts need a ``model.onnx``, a ``model_v2.onnx`` that answers differently
(so a swap and a rollback can be seen in the outputs) and health-check samples. Both models are
the same small MLP, x[N, 4] float32 -> y[N, 3] float32, with other weights; they are built with
onnx.helper from a fixed seed, so every run writes the same bytes.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from modelfleet.kernel.atomic import atomic_write
from modelfleet.kernel.errors import ModelfleetError, Status

FILES = ("model.onnx", "model_v2.onnx", "samples.npz")
INPUTS, HIDDEN, OUTPUTS = 4, 16, 3
# onnxruntime 1.18 (the oldest we support) reads IR 8 / opset 17.
OPSET, IR_VERSION = 17, 8


class ExamplesExistError(ModelfleetError):
    """The files are there already: never overwrite a user's model without --force."""

    status = Status.ALREADY_EXISTS
    reason = "already_exists"


def mlp_bytes(seed: int) -> bytes:
    """x[N, 4] -> MatMul+Add+Relu -> MatMul+Add -> y[N, 3], weights drawn from ``seed``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)

    def weights(name: str, *shape: int) -> onnx.TensorProto:
        scale = 1 / np.sqrt(shape[0]) if len(shape) == 2 else 0.1
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype("f4"), name)

    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w0"], ["m0"]),
            helper.make_node("Add", ["m0", "b0"], ["a0"]),
            helper.make_node("Relu", ["a0"], ["h0"]),
            helper.make_node("MatMul", ["h0", "w1"], ["m1"]),
            helper.make_node("Add", ["m1", "b1"], ["y"]),
        ],
        f"example_mlp_seed{seed}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", INPUTS])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", OUTPUTS])],
        initializer=[
            weights("w0", INPUTS, HIDDEN),
            weights("b0", HIDDEN),
            weights("w1", HIDDEN, OUTPUTS),
            weights("b1", OUTPUTS),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model.SerializeToString()


def samples_bytes() -> bytes:
    buf = io.BytesIO()
    x = np.random.default_rng(0).standard_normal((4, INPUTS)).astype(np.float32)
    np.savez(buf, x=x)
    return buf.getvalue()


def write_examples(out_dir: Path, force: bool = False) -> list[Path]:
    """Write model.onnx (v1), model_v2.onnx and samples.npz into ``out_dir``."""
    paths = [out_dir / name for name in FILES]
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise ExamplesExistError(
            f"refusing to overwrite {', '.join(existing)}: pass --force, or choose another folder"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    for path, data in zip(paths, (mlp_bytes(1), mlp_bytes(2), samples_bytes()), strict=True):
        atomic_write(path, data)
    return paths
