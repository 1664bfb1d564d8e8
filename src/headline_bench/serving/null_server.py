"""Null server for the client self-check: `python null_server.py PORT` (stdlib only, 127.0.0.1 only).

An OpenAI-compatible /v1/completions endpoint that does no work: each request is answered at once with `max_tokens`
streamed text chunks (one event each, all written together), a finishing chunk and [DONE], over a kept-alive HTTP/1.1
connection with chunked transfer encoding, as uvicorn-based servers answer. The client sets `max_tokens` to the
token count the real server produced for that row, so the client parses the same number of events per request as it
did against the real server; whatever TTFT, ITL and TPOT it then measures is its own floor (plus loopback and this
process's own small cost, which makes the floor an upper bound). GET /health and /v1/models answer 200.
"""

from __future__ import annotations

import asyncio
import json
import sys

HOST = "127.0.0.1"


def chunk(data: bytes) -> bytes:
    """One HTTP/1.1 chunk of a chunked body."""
    return b"%x\r\n%s\r\n" % (len(data), data)


def event(text: str, finish: str | None) -> bytes:
    return b"data: " + json.dumps({"choices": [{"index": 0, "text": text, "finish_reason": finish}]}).encode() + b"\n\n"


def answer(n: int) -> bytes:
    """The whole streamed response of `n` text chunks."""
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    body = [chunk(event(" w", None)) for _ in range(max(n, 1))]
    usage = b"data: " + json.dumps({"choices": [{"index": 0, "text": "", "finish_reason": "stop"}],
                                    "usage": {"completion_tokens": n}}).encode() + b"\n\n"
    return head + b"".join(body) + chunk(usage) + chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            method, path = head[0].split(" ")[:2]
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:] if ":" in line)}
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            if method == "POST" and path.startswith("/v1/completions"):
                writer.write(answer(int(json.loads(body).get("max_tokens") or 1)))
            else:
                ok = path in ("/health", "/v1/models")
                writer.write(b"HTTP/1.1 %s\r\nContent-Length: 2\r\n\r\n{}" % (b"200 OK" if ok else b"404 Not Found"))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, ValueError):
        pass
    finally:
        writer.close()


async def main(port: int) -> None:
    server = await asyncio.start_server(handle, HOST, port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
