"""A scripted OpenAI-compatible streaming server for the serving tests (stdlib only, 127.0.0.1).

Usage: python fake_openai_server.py PORT [--fail-start] [--die-after N] [--stall] [--child] [--text T] [--fast]
                                      [--prompt-extra N]
Each completion streams "Hello", " world", "\n", " tail" with GAP seconds between chunks after a FIRST-second
wait, then a usage chunk and [DONE]. --die-after N exits the process when request N+1 arrives; --stall never
answers completions; --child starts a grandchild (sleep) in the same process group and prints its pid;
--fail-start exits 3 at once; --text T streams the words of T instead (T "" finishes with no text: an engine that
honours the stop before any output; "zzz zzz\n" is garbage); --fast answers at once (no waits). The usage chunk
reports the prompt's length (a token-id list: its length; text: its words), plus N with --prompt-extra N (a server
that adds a BOS of its own). A request with "logprobs" gets llama-server's form on each chunk: the piece's token id
(100 + its position in the word list below, so the same word is the same id) and two top_logprobs. A port already
taken makes the bind fail with "Address already in use", as a real server's does.
"""

import json
import os
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

args = sys.argv[1:]
FIRST, GAP = (0.0, 0.0) if "--fast" in args else (0.2, 0.1)
TEXT = args[args.index("--text") + 1] if "--text" in args else None
port = int(args[0])
die_after = int(args[args.index("--die-after") + 1]) if "--die-after" in args else None
prompt_extra = int(args[args.index("--prompt-extra") + 1]) if "--prompt-extra" in args else 0
VOCAB = ["Hello", " world", "\n", " tail", "zzz", " zzz"]
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
        pieces = ["Hello", " world", "\n", " tail"] if TEXT is None else re.findall(r"[^\S\n]*\S+|\n", TEXT)
        for i, text in enumerate(pieces):
            if i:
                time.sleep(GAP)
            chunk = {"choices": [{"index": 0, "text": text, "finish_reason": None}]}
            if body.get("logprobs"):
                tid = 100 + (VOCAB.index(text) if text in VOCAB else len(VOCAB))
                top = [{"id": tid, "token": text, "logprob": -0.1}, {"id": tid + 50, "token": "?", "logprob": -2.5}]
                chunk["choices"][0]["logprobs"] = {"content": [{"id": tid, "token": text, "logprob": -0.1, "top_logprobs": top}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()
        prompt = body.get("prompt")
        n_prompt = (len(prompt) if isinstance(prompt, list) else len(str(prompt).split())) + prompt_extra
        usage = {"choices": [{"index": 0, "text": "", "finish_reason": "stop"}], "usage": {"prompt_tokens": n_prompt, "completion_tokens": len(pieces)}}
        self.wfile.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())


if "--fail-start" in args:
    print("boom: cannot load model")
    sys.exit(3)
if "--child" in args:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    print(f"child pid {child.pid}", flush=True)
ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
