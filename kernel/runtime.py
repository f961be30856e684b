"""onnxruntime sessions for bundles: the only module that talks to onnxruntime."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from modelfleet.kernel.bundle import Bundle
from modelfleet.kernel.datatypes import DATATYPE_BY_ORT_TYPE
from modelfleet.kernel.errors import BundleError, InferenceError, InvalidRequestError

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

    def prepare(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The feed for :meth:`run_prepared`: string inputs in a form onnxruntime copies byte
        for byte (see :func:`string_feed`). Done per request, before batching, so that requests
        whose strings need different forms get different dtypes and are never merged."""
        if not self._string_inputs:
            return inputs
        feed = dict(inputs)
        for name in self._string_inputs:
            if name in feed:
                feed[name] = string_feed(feed[name], name)
        return feed

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.run_prepared(self.prepare(inputs))

    def run_prepared(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            results = self.session.run(self.output_names, feed)
        except UnicodeDecodeError:
            # onnxruntime hands string outputs back as Python str, decoded strictly: bytes that
            # are not UTF-8 in a string output cannot be returned at all, only refused.
            where = f"model {self.bundle.name} v{self.bundle.version}"
            if any(feed[n].dtype.kind in ("S", "V") for n in self._string_inputs if n in feed):
                raise InvalidRequestError(
                    f"{where}: a string output holds bytes that are not UTF-8 (from a BYTES "
                    "input that is not UTF-8); onnxruntime returns string outputs only as UTF-8 "
                    "text, so they cannot come back unchanged. Send UTF-8, or use a model whose "
                    "string outputs are text",
                    reason="bytes",
                ) from None
            raise InferenceError(
                f"{where}: a string output holds bytes that are not UTF-8, which onnxruntime "
                "cannot return"
            ) from None
        except Exception as exc:
            raise InferenceError(
                f"model {self.bundle.name} v{self.bundle.version}: {exc}"
            ) from None
        return dict(zip(self.output_names, results, strict=True))


def _item_bytes(item: object, name: str) -> bytes:
    if isinstance(item, bytes | bytearray | np.bytes_):
        return bytes(item)
    if isinstance(item, str):
        try:
            return item.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidRequestError(
                f"input {name!r}: a string element holds lone surrogates, which are not text",
                reason="bytes",
            ) from None
    raise InvalidRequestError(
        f"input {name!r}: string elements must be bytes or str, got {type(item).__name__}",
        reason="bytes",
    )


def string_feed(arr: np.ndarray, name: str) -> np.ndarray:
    """``arr`` (bytes or str elements) as an array onnxruntime copies into a string tensor
    unchanged, or InvalidRequestError when its Python binding has no such form.

    The binding (onnxruntime_pybind_mlvalue.cc, CopyDataToTensor) reads an object array through
    str(), which turns a bytes element into its repr ``b'...'``; so UTF-8 goes as str (encoded
    back to the same bytes). Bytes that are not UTF-8 go as a fixed-width numpy array, which it
    copies without decoding: an 'S' element is read as a C string, exact when no element holds
    a NUL (one spare column of padding ends every element); a 'V' element is copied whole, exact
    when all elements have the same length. Nothing else reaches onnxruntime unchanged.
    """
    if arr.dtype.kind not in ("O", "S"):
        return arr  # 'U' is text already; anything else is refused by onnxruntime itself
    items = [_item_bytes(v, name) for v in arr.reshape(-1).tolist()]
    try:
        texts = [b.decode("utf-8") for b in items]
    except UnicodeDecodeError:
        pass
    else:
        out = np.empty(len(texts), dtype=object)
        out[:] = texts
        return out.reshape(arr.shape)
    with_nul = next((i for i, b in enumerate(items) if b"\x00" in b), None)
    if with_nul is None:
        width = max(len(b) for b in items) + 1
        return np.array(items, dtype=f"S{width}").reshape(arr.shape)
    lengths = {len(b) for b in items}
    if len(lengths) == 1:
        return np.array(items, dtype=f"V{lengths.pop()}").reshape(arr.shape)
    other = next(i for i, b in enumerate(items) if len(b) != len(items[with_nul]))
    raise InvalidRequestError(
        f"input {name!r}: BYTES elements that are not UTF-8 reach the model unchanged only when "
        f"no element holds a NUL byte or all elements have the same length (onnxruntime's "
        f"Python binding has no other form for them); element {with_nul} holds a NUL and is "
        f"{len(items[with_nul])} bytes, element {other} is {len(items[other])} bytes. "
        "Send UTF-8 text, or elements of equal length",
        reason="bytes",
    )
