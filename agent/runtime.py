"""onnxruntime sessions for bundles: the only module that talks to onnxruntime."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from protos.bundle import Bundle
from protos.datatypes import DATATYPE_BY_ORT_TYPE
from protos.errors import BundleError, InferenceError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RuntimeOptions:
    # 0 lets onnxruntime pick (one per physical core).
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    # "cpu", "cuda" (fail if unavailable) or "auto" (CUDA when onnxruntime has it, else CPU).
    device: str = "auto"
    # onnxruntime's worker threads spin between operators: lower latency on an idle machine,
    # burnt cores when several sessions (or batch jobs) share few cores.
    spinning: bool = True

    def providers(self) -> list[str]:
        available = ort.get_available_providers()
        if self.device == "cpu":
            return ["CPUExecutionProvider"]
        if "CUDAExecutionProvider" in available:
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        if self.device == "cuda":
            raise BundleError(
                "device 'cuda' was requested but onnxruntime has no CUDAExecutionProvider "
                f"(available: {', '.join(available)})"
            )
        return ["CPUExecutionProvider"]


class OnnxModel:
    """One loaded model version. ``run`` is thread-safe and releases the GIL while it computes."""

    def __init__(self, bundle: Bundle, options: RuntimeOptions) -> None:
        self.bundle = bundle
        so = ort.SessionOptions()
        so.intra_op_num_threads = options.intra_op_threads
        so.inter_op_num_threads = options.inter_op_threads
        so.log_severity_level = 3
        if not options.spinning:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(
                str(bundle.model_path), sess_options=so, providers=options.providers()
            )
        except Exception as exc:
            raise BundleError(f"onnxruntime cannot load {bundle.model_path}: {exc}") from None
        self.providers = self.session.get_providers()
        self._check_signature()
        self.output_names = [o.name for o in bundle.manifest.outputs]
        self._string_inputs = {t.name for t in bundle.manifest.inputs if t.datatype == "BYTES"}

    def _check_signature(self) -> None:
        """The manifest is what clients see; it must describe the model that actually runs."""
        m = self.bundle.manifest
        for declared, actual, kind in (
            (m.inputs, self.session.get_inputs(), "input"),
            (m.outputs, self.session.get_outputs(), "output"),
        ):
            actual_types = {a.name: DATATYPE_BY_ORT_TYPE.get(a.type, a.type) for a in actual}
            declared_types = {d.name: d.datatype for d in declared}
            if actual_types != declared_types:
                raise BundleError(
                    f"manifest {kind}s {declared_types} do not match the model's {actual_types}"
                )

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = inputs
        if self._string_inputs:
            feed = dict(inputs)
            for name in self._string_inputs:
                feed[name] = _as_str_array(feed[name])
        try:
            results = self.session.run(self.output_names, feed)
        except Exception as exc:
            raise InferenceError(
                f"model {self.bundle.name} v{self.bundle.version}: {exc}"
            ) from None
        return dict(zip(self.output_names, results, strict=True))


def _as_str_array(arr: np.ndarray) -> np.ndarray:
    # onnxruntime wants str objects for string tensors; the wire carries bytes.
    if arr.dtype == object and arr.size and isinstance(arr.flat[0], bytes):
        return np.vectorize(lambda b: b.decode("utf-8", "replace"), otypes=[object])(arr)
    return arr
