"""The shared-memory routes of the HTTP edge (Triton's ``/v2/systemsharedmemory`` and
``/v2/cudasharedmemory``), over the registry gRPC uses (agent/serving/shm.py). Errors are raised
as :mod:`kernel.errors` types and mapped by the HTTP edge's one error handler."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from modelfleet.agent.serving.http_body import read_body
from modelfleet.agent.serving.rest_converters import strict_dumps
from modelfleet.agent.serving.shm import SharedMemoryRegistry, ShmError, require_local
from modelfleet.kernel.errors import InvalidRequestError

SYSTEM = "/v2/systemsharedmemory"
CUDA = "/v2/cudasharedmemory"


class NoCudaError(InvalidRequestError):
    reason = "cuda_shared_memory"


def _whole(doc: dict[str, Any], key: str, default: int | None = None) -> int:
    value = doc.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ShmError(f"register: {key!r} must be a whole number >= 0, got {value!r}")
    return value


def routes(registry: SharedMemoryRegistry, max_bytes: int) -> list[web.RouteDef]:
    async def status(request: web.Request) -> web.Response:
        require_local(request.remote)
        regions = registry.status(request.match_info.get("region", ""))
        doc = [
            {"name": r.name, "key": r.key, "offset": r.offset, "byte_size": r.byte_size}
            for r in regions
        ]
        return web.json_response(doc, dumps=strict_dumps)

    async def register(request: web.Request) -> web.Response:
        require_local(request.remote)
        name = request.match_info["region"]
        try:
            doc = json.loads(await read_body(request, max_bytes))
        except ValueError:
            doc = None
        if not isinstance(doc, dict) or not isinstance(doc.get("key"), str):
            raise ShmError(
                f"register {name!r}: the body must be a JSON object with 'key' (the "
                "shared-memory key), 'byte_size' and optionally 'offset'"
            )
        registry.register(name, doc["key"], _whole(doc, "offset", 0), _whole(doc, "byte_size"))
        return web.Response()

    async def unregister(request: web.Request) -> web.Response:
        require_local(request.remote)
        registry.unregister(request.match_info.get("region", ""))
        return web.Response()

    async def no_cuda(request: web.Request) -> web.Response:
        raise NoCudaError(
            "CUDA shared memory is not supported: this agent runs models on the CPU; use "
            f"system shared memory ({SYSTEM}/region/NAME/register) or send tensors in the request"
        )

    region = "/region/{region}"
    return [
        web.get(SYSTEM + "/status", status),
        web.get(SYSTEM + region + "/status", status),
        web.post(SYSTEM + region + "/register", register),
        web.post(SYSTEM + "/unregister", unregister),
        web.post(SYSTEM + region + "/unregister", unregister),
        web.get(CUDA + "/status", no_cuda),
        web.get(CUDA + region + "/status", no_cuda),
        web.post(CUDA + region + "/register", no_cuda),
        # Nothing CUDA is ever registered, so unregistering it all is done (clients clean up
        # with this after every run).
        web.post(CUDA + "/unregister", _empty),
        web.post(CUDA + region + "/unregister", _empty),
    ]


async def _empty(request: web.Request) -> web.Response:
    return web.Response()
