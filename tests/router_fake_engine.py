"""A tiny aiohttp stand-in for a vLLM OpenAI server, for the router's unit tests (tests/test_router_lifecycle.py).

Why a fake at all: it shows what a real vLLM cannot show on this CPU machine, on demand and in seconds: an engine that
honours sleep (vLLM's CPU build ignores it), a start-up that takes exactly as long as a test needs, a start-up that
fails. It is still a real process (the router starts it as a process group, kills it, restarts it) speaking vLLM's
command line and HTTP routes: --host, --port, --served-model-name; /health, /v1/completions
(streamed as server-sent events or not), /v1/chat/completions, /sleep, /wake_up, /is_sleeping.

Behaviour through the environment: FAKE_START_S (seconds before it listens), FAKE_EXIT_AT_START (exit code instead
of serving), FAKE_SLEEP ("honour", "ignore": 200 but never asleep, "missing": 404 as without VLLM_SERVER_DEV_MODE),
FAKE_CHUNKS (stream chunks), FAKE_CHUNK_S (seconds between chunks), FAKE_MEMORY_FILE (a file the engine writes its
state into: "awake", "asleep", so a test's memory probe can follow it).
"""

import argparse
import asyncio
import json
import os
import time

from aiohttp import web


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--served-model-name", required=True)
    args, _ = p.parse_known_args()
    time.sleep(float(os.environ.get("FAKE_START_S", "0")))
    if os.environ.get("FAKE_EXIT_AT_START"):
        raise SystemExit(int(os.environ["FAKE_EXIT_AT_START"]))
    mode = os.environ.get("FAKE_SLEEP", "honour")
    chunks, chunk_s = int(os.environ.get("FAKE_CHUNKS", "4")), float(os.environ.get("FAKE_CHUNK_S", "0.05"))
    state = {"asleep": False}
    memory_file = os.environ.get("FAKE_MEMORY_FILE")

    def note() -> None:
        if memory_file:
            with open(memory_file, "w") as f:
                f.write("asleep" if state["asleep"] else "awake")

    note()

    async def health(_):
        return web.json_response({})

    async def complete(request):
        body = await request.json()
        if state["asleep"]:
            return web.json_response({"error": {"message": "asleep"}}, status=500)
        text = [f" {args.served_model_name}-{i}" for i in range(chunks)]
        if not body.get("stream"):
            await asyncio.sleep(chunk_s * chunks)
            return web.json_response({"object": "text_completion", "model": args.served_model_name,
                                      "choices": [{"index": 0, "text": "".join(text), "finish_reason": "length"}]})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for piece in text:
            event = {"object": "text_completion", "model": args.served_model_name,
                     "choices": [{"index": 0, "text": piece, "finish_reason": None}], "sent_at": time.time()}
            await response.write(f"data: {json.dumps(event)}\n\n".encode())
            await asyncio.sleep(chunk_s)
        await response.write(b"data: [DONE]\n\n")
        return response

    async def sleep(request):
        if mode == "missing":
            raise web.HTTPNotFound()
        state["asleep"] = mode == "honour"
        note()
        return web.Response(status=200)

    async def wake_up(_):
        if mode == "missing":
            raise web.HTTPNotFound()
        state["asleep"] = False
        note()
        return web.Response(status=200)

    async def is_sleeping(_):
        if mode == "missing":
            raise web.HTTPNotFound()
        return web.json_response({"is_sleeping": state["asleep"]})

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_post("/v1/completions", complete)
    app.router.add_post("/v1/chat/completions", complete)
    app.router.add_post("/sleep", sleep)
    app.router.add_post("/wake_up", wake_up)
    app.router.add_get("/is_sleeping", is_sleeping)
    web.run_app(app, host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
