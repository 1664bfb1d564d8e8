"""A scripted OpenAI-compatible streaming server for the serving tests (stdlib only, 127.0.0.1).

Usage: python fake_openai_server.py PORT [--fail-start] [--die-after N] [--stall] [--child]
Each completion streams "Hello", " world", "\n", " tail" with GAP seconds between chunks after a FIRST-second
wait, then a usage chunk and [DONE]. --die-after N exits the process when request N+1 arrives; --stall never
answers completions; --child starts a grandchild (sleep) in the same process group; --fail-start exits 3 at once.
"""

import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FIRST, GAP = 0.2, 0.1
args = sys.argv[1:]
port = int(args[0])
die_after = int(args[args.index("--die-after") + 1]) if "--die-after" in args else None
served = 0
lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *a):
        sys.stdout.write("fake: " + (a[0] % a[1:]) + "\n")
        sys.stdout.flush()

    def do_GET(self):
        self.send_response(200 if self.path in ("/health", "/v1/models") else 404)
        self.end_headers()
        self.wfile.write(b'{"status": "ok"}')

    def do_POST(self):
        global served
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with lock:
            served += 1
            if die_after is not None and served > die_after:
                os._exit(7)
        if "--stall" in args:
            time.sleep(60)
        if body.get("prompt") == "bad":
            self.send_response(500)
            self.end_headers()
            self.wfile.write(b"internal error")
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        time.sleep(FIRST)
        if body.get("prompt") == "cut":  # a stream cut short: text, then the connection closes with no finish_reason
            self.wfile.write(b'data: {"choices": [{"index": 0, "text": "Hel", "finish_reason": null}]}\n\n')
            return
        for i, text in enumerate(["Hello", " world", "\n", " tail"]):
            if i:
                time.sleep(GAP)
            chunk = {"choices": [{"index": 0, "text": text, "finish_reason": None}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()
        usage = {"choices": [{"index": 0, "text": "", "finish_reason": "stop"}], "usage": {"prompt_tokens": 5, "completion_tokens": 4}}
        self.wfile.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())


if "--fail-start" in args:
    print("boom: cannot load model")
    sys.exit(3)
if "--child" in args:
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
