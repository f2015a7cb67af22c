"""A model server answering like vLLM, for the real hermes agent in tests/hermes_agent.rs.

Usage: python stub_model.py PORT_FILE
Binds 127.0.0.1 on a free port, writes it to PORT_FILE, and serves until killed:
  GET /version                  {"version": "0.6.3"} (the agent probes it on each turn)
  GET /v1/models                one model, "stub-model"
  POST /v1/chat/completions     plain or streamed; the reply says what the model was given:
                                "user messages: N; last: TEXT" (N counts role user)
Each request's messages are appended, one JSON line, to PORT_FILE + ".log".
"""

import json
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def send_json(self, code, obj):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/version":
            self.send_json(200, {"version": "0.6.3"})
        elif self.path.rstrip("/") in ("/v1/models", "/models"):
            self.send_json(200, {"object": "list", "data": [
                {"id": "stub-model", "object": "model", "owned_by": "vllm",
                 "max_model_len": 131072}]})
        else:
            self.send_json(404, {"error": {"message": "not found"}})

    def do_POST(self):
        n = int(self.headers.get("Content-Length") or 0)
        req = json.loads(self.rfile.read(n) or b"{}")
        if not self.path.rstrip("/").endswith("/chat/completions"):
            self.send_json(404, {"error": {"message": "not found"}})
            return
        msgs = req.get("messages", [])
        with open(LOG, "a") as f:
            f.write(json.dumps(msgs) + "\n")
        users = [m for m in msgs if m.get("role") == "user"]
        last = users[-1].get("content") if users else ""
        if isinstance(last, list):
            last = "".join(p.get("text", "") for p in last if isinstance(p, dict))
        text = f"user messages: {len(users)}; last: {last}"
        usage = {"prompt_tokens": 10 * len(msgs), "completion_tokens": 7,
                 "total_tokens": 10 * len(msgs) + 7}
        if not req.get("stream"):
            self.send_json(200, {
                "id": "cmpl-stub", "object": "chat.completion", "created": int(time.time()),
                "model": "stub-model",
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": text}}],
                "usage": usage})
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()

        def chunk(delta, finish=None, **extra):
            c = {"id": "cmpl-stub", "object": "chat.completion.chunk",
                 "created": int(time.time()), "model": "stub-model",
                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
            self.wfile.write(b"data: " + json.dumps(c).encode() + b"\n\n")
            self.wfile.flush()

        chunk({"role": "assistant", "content": ""})
        words = text.split(" ")
        for i, w in enumerate(words):
            chunk({"content": w + (" " if i < len(words) - 1 else "")})
        chunk({}, "stop", usage=usage)
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()
        self.close_connection = True


if __name__ == "__main__":
    port_file = sys.argv[1]
    LOG = port_file + ".log"
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    with open(port_file + ".tmp", "w") as f:
        f.write(str(server.server_address[1]))
    import os
    os.rename(port_file + ".tmp", port_file)
    server.serve_forever()
