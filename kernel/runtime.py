"""onnxruntime sessions for bundles: the only module that talks to onnxruntime."""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from modelfleet.kernel.bundle import CPU_PROVIDER, Bundle, ProviderSpec
from modelfleet.kernel.datatypes import DATATYPE_BY_ORT_TYPE
from modelfleet.kernel.errors import BundleError, InferenceError, InvalidRequestError

log = logging.getLogger(__name__)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# Providers that run on a GPU and take a ``device_id`` option.
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
# What ``device = auto`` prefers for a bundle that names no providers. TensorRT only when a bundle
# asks for it: it builds an engine per model and input shape at load, which can take minutes.
DEFAULT_PREFERENCE = ("CUDAExecutionProvider", CPU_PROVIDER)
INSTALL_HINT = (
    "replace onnxruntime with onnxruntime-gpu (docs/gpu.md), with the CUDA and cuDNN libraries "
    "it needs, and install the GPU systemd drop-in"
)


@dataclass(frozen=True)
class RuntimeOptions:
    # 0 lets onnxruntime pick (one per physical core).
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    # "cpu" (never a GPU), "auto" (the bundle's providers, else CUDA, as far as onnxruntime has
    # them; CPU otherwise) or "cuda" (as auto, but a version that would serve on CPU is refused).
    device: str = "auto"
    # onnxruntime's worker threads spin between operators: lower latency on an idle machine,
    # burnt cores when several sessions (or batch jobs) share few cores.
    spinning: bool = True
    # Providers this node may use (empty: any); CPU stays the last resort either way.
    allowed_providers: tuple[str, ...] = ()
    # A version must serve on its first preferred provider, or it fails its gate.
    require_provider: bool = False
    # GPU for GPU providers, overriding a bundle's device_id option; per model before global.
    device_id: int = 0
    model_device_ids: tuple[tuple[str, int], ...] = ()
    # Where providers may write caches (TensorRT engines and timing caches): one private folder
    # per model and version below it. Empty: nowhere, so those caches are switched off.
    cache_dir: str = ""

    def device_for(self, model: str) -> int:
        return dict(self.model_device_ids).get(model, self.device_id)

    def cache_for(self, model: str, version: int, digest: str = "") -> Path | None:
        """TensorRT's folder for one model's bytes: onnxruntime names a cached engine by the
        model file's name and its tensors, not its weights, so a version rebuilt with other
        weights must not find the old engine (``digest``: the bundle's model sha256)."""
        if not self.cache_dir:
            return None
        folder = f"{version}-{digest[:16]}" if digest else str(version)
        return Path(self.cache_dir) / TRT_PROVIDER / model / folder


TRT_PROVIDER = "TensorrtExecutionProvider"
# TensorRT's options that name where it writes; without them it writes into the working
# directory. Always set by the agent (confine_caches), never taken from a bundle.
TRT_CACHE_PATHS = ("trt_engine_cache_path", "trt_timing_cache_path")
TRT_CACHE_SWITCHES = ("trt_engine_cache_enable", "trt_timing_cache_enable")


def confine_caches(opts: dict[str, str], cache: Path | None) -> dict[str, str]:
    """TensorRT's options with its cache folders set to ``cache`` (the agent's own), whatever
    ``opts`` held; with no folder, its caches are switched off rather than left to write into
    the working directory. A cached engine is loaded as it is, so the folder must be one that
    nobody but the agent writes: a file planted there would be what the GPU runs."""
    out = {k: v for k, v in opts.items() if k not in TRT_CACHE_PATHS}
    if cache is None:
        for key in TRT_CACHE_SWITCHES:
            out[key] = "False"
        return out
    for key in TRT_CACHE_PATHS:
        out[key] = str(cache)
    return out


def private_dir(root: Path, path: Path) -> Path:
    """Create ``path`` (below ``root``, which must exist or be creatable) with every folder from
    ``root`` down owned by this user, mode 0700, and none of them a symlink; raises OSError
    naming the folder otherwise."""
    rel = path.relative_to(root)
    os.makedirs(root.parent, mode=0o700, exist_ok=True)
    # The folder above (the data folder) may be a symlink, but whoever else can write it could
    # swap root for a folder of their own between these checks and TensorRT's use of it.
    above = os.stat(root.parent)
    if above.st_uid != os.geteuid() or above.st_mode & 0o022:
        raise OSError(
            f"{root.parent} is not this agent's alone (owner uid {above.st_uid}, mode "
            f"{stat.S_IMODE(above.st_mode):o}): it must belong to the agent's user and not be "
            "writable by group or others"
        )
    current = root
    for part in (None, *rel.parts):
        if part is not None:
            current = current / part
        with contextlib.suppress(FileExistsError):
            os.mkdir(current, 0o700)
        st = os.lstat(current)
        if not stat.S_ISDIR(st.st_mode):
            raise OSError(f"{current} is not a folder (a symlink or a file)")
        if st.st_uid != os.geteuid():
            raise OSError(f"{current} belongs to uid {st.st_uid}, not to this agent")
        if stat.S_IMODE(st.st_mode) != 0o700:
            os.chmod(current, 0o700)
    return path


@dataclass(frozen=True)
class ProviderPlan:
    """Which providers a session is created with, and what was wanted but is not there."""

    # (name, options) in onnxruntime's order; always ends with the CPU provider.
    chain: tuple[tuple[str, dict[str, str]], ...]
    # The provider the version should serve on.
    wanted: str
    # A bundle or the operator asked for ``wanted`` (a fallback from it is worth reporting);
    # false for the default preference on a node that has no GPU provider at all.
    requested: bool
    # The first requested provider onnxruntime lacks here, and why (None: nothing missing).
    missing: tuple[str, str] | None = None


def plan_providers(
    bundle_providers: tuple[ProviderSpec, ...],
    options: RuntimeOptions,
    model: str,
    available: list[str],
    version: int = 0,
    digest: str = "",
) -> ProviderPlan:
    """Choose the session's providers: pure, so every rule is unit-tested without a GPU."""
    if options.device == "cpu":
        return ProviderPlan(((CPU_PROVIDER, {}),), CPU_PROVIDER, False)
    requested = bool(bundle_providers) or options.device == "cuda"
    prefs = [(p.name, dict(p.options)) for p in bundle_providers] or [
        (name, {}) for name in DEFAULT_PREFERENCE
    ]
    if options.allowed_providers:
        prefs = [p for p in prefs if p[0] in options.allowed_providers or p[0] == CPU_PROVIDER]
    if options.device == "cuda":
        # The operator demands a GPU: GPU providers first, whatever the bundle's order.
        prefs = [p for p in prefs if p[0] in GPU_PROVIDERS] + [
            p for p in prefs if p[0] not in GPU_PROVIDERS
        ]
        if not prefs or prefs[0][0] not in GPU_PROVIDERS:
            prefs.insert(0, ("CUDAExecutionProvider", {}))
    if not prefs:
        prefs = [(CPU_PROVIDER, {})]
    wanted = prefs[0][0]
    missing = None
    chain: list[tuple[str, dict[str, str]]] = []
    for name, opts in prefs:
        if name not in available:
            if missing is None and name != CPU_PROVIDER:
                missing = (
                    name,
                    f"this onnxruntime has no {name} (it offers {', '.join(available)}); "
                    + INSTALL_HINT,
                )
            continue
        if name in GPU_PROVIDERS:
            opts = {**opts, "device_id": str(options.device_for(model))}
        if name == TRT_PROVIDER:
            opts = confine_caches(opts, options.cache_for(model, version, digest))
        chain.append((name, opts))
    if all(name != CPU_PROVIDER for name, _ in chain):
        chain.append((CPU_PROVIDER, {}))
    requested = requested or wanted in available
    return ProviderPlan(tuple(chain), wanted, requested, missing)


def _why(plan: ProviderPlan, failure: str) -> str:
    """Why ``plan.wanted`` does not serve, in words that say what to do about it."""
    if plan.missing is not None and plan.missing[0] == plan.wanted:
        return plan.missing[1]
    if failure:
        return failure
    # onnxruntime drops a provider whose libraries do not load and carries on without it,
    # logging only an error of its own.
    return (
        "onnxruntime dropped it while creating the session (its libraries did not load: CUDA, "
        "cuDNN or TensorRT missing or of the wrong version, or no usable GPU)"
    )


class ProviderUnavailableError(BundleError):
    """The version must serve on a provider that cannot load here (require_provider, cuda)."""

    reason = "provider"


class OnnxModel:
    """One loaded model version. ``run`` is thread-safe and releases the GIL while it computes.

    ``provider`` is the execution provider it serves on; ``fallback`` is (provider, why) when a
    provider the bundle or operator asked for could not load and a lesser one serves instead.
    """

    def __init__(self, bundle: Bundle, options: RuntimeOptions) -> None:
        self.bundle = bundle
        self.fallback: tuple[str, str] | None = None
        so = ort.SessionOptions()
        so.intra_op_num_threads = options.intra_op_threads
        so.inter_op_num_threads = options.inter_op_threads
        so.log_severity_level = 3
        if not options.spinning:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        m = bundle.manifest
        plan = plan_providers(
            m.providers, options, m.name, ort.get_available_providers(), m.version, m.model_sha256
        )
        # require_provider binds what a bundle or the operator asked for, not the default
        # preference of a node that has no GPU provider at all.
        strict = (options.require_provider and plan.requested) or options.device == "cuda"
        chain = self._with_cache_dir(list(plan.chain), options)
        failure = ""
        try:
            self.session = self._session(so, chain)
        except Exception as exc:
            if chain == [(CPU_PROVIDER, {})]:
                raise BundleError(f"onnxruntime cannot load {bundle.model_path}: {exc}") from None
            failure = f"onnxruntime could not create a session with {chain[0][0]}: "
            failure += _first_line(exc)
            if strict:
                self._refuse(options, plan.wanted, _why(plan, failure))
            chain = [(CPU_PROVIDER, {})]
            try:
                self.session = self._session(so, chain)
            except Exception as exc2:
                raise BundleError(f"onnxruntime cannot load {bundle.model_path}: {exc2}") from None
        self.providers = self.session.get_providers()
        self.provider = self.providers[0]
        # onnxruntime's Python run() checks input names, graph capture and OrtValue ownership
        # on every call: about a tenth of the agent's own CPU per request on a small model.
        # Feeds here are numpy arrays already checked against the signature, and on the CPU
        # provider nothing else in that wrapper applies (its run-time fallback is for GPU
        # providers), so CPU sessions call the C++ session's run directly.
        direct = getattr(self.session, "_sess", None)
        self._run = (
            direct.run
            if direct is not None and self.providers == [CPU_PROVIDER]
            else self.session.run
        )
        if strict and (
            (options.require_provider and plan.requested and self.provider != plan.wanted)
            or (options.device == "cuda" and self.provider not in GPU_PROVIDERS)
        ):
            self._refuse(options, plan.wanted, _why(plan, failure))
        if plan.requested and self.provider != plan.wanted:
            self.fallback = (plan.wanted, _why(plan, failure))
            log.warning(
                "model %s version %d: execution provider %s cannot load, serving on %s instead: %s",
                m.name,
                m.version,
                plan.wanted,
                self.provider,
                self.fallback[1],
            )
        self._check_signature()
        self.output_names = [o.name for o in bundle.manifest.outputs]
        self._string_inputs = {t.name for t in bundle.manifest.inputs if t.datatype == "BYTES"}

    def _with_cache_dir(
        self, chain: list[tuple[str, dict[str, str]]], options: RuntimeOptions
    ) -> list[tuple[str, dict[str, str]]]:
        """The chain, with TensorRT's cache folder created (private), or its caches off when
        that folder cannot be made safe: a version serves without a cache rather than not."""
        m = self.bundle.manifest
        cache = options.cache_for(m.name, m.version, m.model_sha256)
        if cache is None or all(name != TRT_PROVIDER for name, _ in chain):
            return chain
        try:
            private_dir(Path(options.cache_dir), cache)
        except OSError as exc:
            log.warning(
                "model %s version %d: TensorRT caches are off for this version: cannot make "
                "its cache folder private: %s",
                m.name,
                m.version,
                exc,
            )
            return [
                (name, confine_caches(opts, None) if name == TRT_PROVIDER else opts)
                for name, opts in chain
            ]
        return chain

    def _session(
        self, so: ort.SessionOptions, chain: list[tuple[str, dict[str, str]]]
    ) -> ort.InferenceSession:
        return ort.InferenceSession(
            str(self.bundle.model_path),
            sess_options=so,
            providers=[name for name, _ in chain],
            provider_options=[opts for _, opts in chain],
        )

    def _refuse(self, options: RuntimeOptions, wanted: str, why: str) -> None:
        m = self.bundle.manifest
        if options.require_provider:
            rule = f"must serve on {wanted} (require_provider = true)"
            undo = "set require_provider = false"
        else:
            rule = 'must serve on a GPU provider (device = "cuda")'
            undo = 'set device = "auto"'
        raise ProviderUnavailableError(
            f"model {m.name} version {m.version} {rule}, and {wanted} cannot load here: {why}. "
            f"To serve on CPU instead, {undo}"
        )

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
            results = self._run(self.output_names, feed, None)
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
