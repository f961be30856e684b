"""A bare aiohttp server answering OIP HTTP infer with a prebuilt response: the HTTP baseline.

Same HTTP stack and event loop kind as the agent's HTTP port, no access log, the body read in
full, and a response of the agent's size and headers (binary outputs after a JSON header, as
tritonclient.http asks for by default). What remains between this and the agent is the agent's
own work: JSON and binary decoding, validation, the model, accounting and encoding.

``python -m tests.benchmarks.http_echo_server --listen HOST:PORT --response-json JSON
--binary-bytes N``
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from aiohttp import web


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", required=True)
    parser.add_argument("--response-json", required=True, help="the JSON part of the response")
    parser.add_argument("--binary-bytes", type=int, default=0, help="zeros after the JSON")
    args = parser.parse_args()
    head = args.response_json.encode()
    body = head + bytes(args.binary_bytes)

    async def infer(request: web.Request) -> web.Response:
        await request.read()
        resp = web.Response(body=body, content_type="application/octet-stream")
        resp.headers["Inference-Header-Content-Length"] = str(len(head))
        return resp

    async def live(request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def serve() -> None:
        app = web.Application()
        app.add_routes(
            [web.post("/v2/models/{model}/infer", infer), web.get("/v2/health/live", live)]
        )
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        host, _, port = args.listen.rpartition(":")
        await web.TCPSite(runner, host, int(port)).start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await runner.cleanup()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
