"""Fake Jupyter server: what the launcher needs of ``jupyter_server``, in the standard library.

    fake_jupyter.py --ServerApp.sock=PATH --ServerApp.sock_mode=0600 ... [--Fake.mode=MODE]

Serves HTTP on the Unix socket PATH. The token comes from $JUPYTER_TOKEN (as the launcher passes
it); ``Authorization: token T`` or ``?token=T`` authenticates.

    GET  /api/status         200 with the token, else 403
    GET  /lab, /tree         200 with the token, else 403
    POST /api/shutdown       200, then exit 0 (what File > Shut Down does)
    POST /fake/crash?code=K  200, then exit K at once (a crash after ready; ?signal=N: killed)
    POST /fake/print?line=N&then=M  200, then print (on another thread) one line of N bytes
                             that holds the token every 10000 bytes, then M bytes of ordinary
                             lines that hold it too (what a chatty kernel's output does); see
                             ``flood``
    GET  /fake/echo          200, the request's headers as JSON
    GET  /fake/env           200, this process's environment as JSON (what kernels would inherit)

Modes (--Fake.mode):
  serve (default)  as above
  silent           never listens (the launcher's start_timeout must end it)
  hang             listens, accepts, never answers
  exit             exits with --Fake.code (default 1) after --Fake.delay seconds, before ready
SIGTERM: exits 0 after --Fake.stop_delay seconds (default 0.3; real Jupyter takes a moment too).
With --ServerApp.shutdown_no_activity_timeout (--idle-timeout), it writes $SPUNNEL_RUNDIR/idle.json
as the node extension would for a server unused until now: its idle release 20 s away.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import socketserver
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import log_call, log_event

_stdout = threading.Lock()  # one writer at a time: a long line is never cut by a log line


def flood(token: str, line: int, then: int) -> bytes:
    """What POST /fake/print?line=N&then=M prints: a line of N bytes (newline included) that
    holds ``token`` every 10000 bytes, then about M bytes of 100-byte lines that hold it too."""
    parts = []
    if line:
        head = b"FLOOD-LINE "
        body = bytearray(b"x" * (line - len(head) - 1))
        for at in range(0, len(body) - len(token), 10000):
            body[at : at + len(token)] = token.encode()
        parts.append(head + bytes(body) + b"\n")
    for n in range(then // 100):
        text = f"[I fake-jupyter] ordinary line {n:06d} token={token} "
        parts.append(text.encode().ljust(99, b".") + b"\n")
    parts.append(b"FLOOD-END\n")
    return b"".join(parts)


def _print_flood(data: bytes) -> None:
    with _stdout:
        while data:
            data = data[os.write(1, data) :]


class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    token = ""
    why = "stopped"
    exiting: threading.Event


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Server

    def _authorized(self) -> bool:
        token = self.server.token
        query = parse_qs(urlparse(self.path).query)
        return bool(token) and (
            self.headers.get("Authorization") == f"token {token}" or query.get("token") == [token]
        )

    def _answer(self, code: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def do_GET(self) -> None:
        route = urlparse(self.path).path
        if route not in ("/api/status", "/lab", "/tree", "/fake/echo", "/fake/env"):
            self._answer(404, {"message": "Not Found"})
        elif not self._authorized():
            self._answer(403, {"message": "Forbidden"})
        elif route == "/fake/echo":
            self._answer(200, dict(self.headers.items()))
        elif route == "/fake/env":
            self._answer(200, dict(os.environ))
        else:
            self._answer(200, {"started": "fake", "connections": 0, "kernels": 0})

    def do_POST(self) -> None:
        url = urlparse(self.path)
        if url.path not in ("/api/shutdown", "/fake/crash", "/fake/print"):
            self._answer(404, {"message": "Not Found"})
            return
        if not self._authorized():
            self._answer(403, {"message": "Forbidden"})
            return
        if url.path == "/fake/print":
            query = parse_qs(url.query)
            sizes = (int(query.get("line", ["0"])[0]), int(query.get("then", ["0"])[0]))
            self._answer(200, {"message": "printing"})
            data = flood(self.server.token, *sizes)
            threading.Thread(target=_print_flood, args=(data,), daemon=True).start()
            log_event("jupyter", "flood", bytes=len(data))
            return
        self._answer(200, {"message": "bye"})
        if url.path == "/fake/crash":
            query = parse_qs(url.query)
            code = int(query.get("code", ["1"])[0])
            log_event("jupyter", "exit", code=code, why="crash", query=query)
            if "signal" in query:
                os.kill(os.getpid(), int(query["signal"][0]))
            os._exit(code)
        self.server.why = "shutdown"
        self.server.exiting.set()

    def log_message(self, format: str, *args: Any) -> None:
        with _stdout:
            sys.stdout.write("[I fake-jupyter] " + (format % args) + "\n")
            sys.stdout.flush()


def main(argv: list[str]) -> int:
    log_call("jupyter", argv)
    opts = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
    mode = opts.get("Fake.mode", "serve")
    if opts.get("ServerApp.shutdown_no_activity_timeout") and os.environ.get("SPUNNEL_RUNDIR"):
        idle = Path(os.environ["SPUNNEL_RUNDIR"]) / "idle.json"
        idle.write_text(json.dumps({"release_at": round(time.time()) + 20}))
    sock = opts["ServerApp.sock"]
    token = os.environ.get("JUPYTER_TOKEN", "")
    if mode == "exit":
        time.sleep(float(opts.get("Fake.delay", "0")))
        code = int(opts.get("Fake.code", "1"))
        print(f"[C fake-jupyter] exiting with code {code} before it was ready", flush=True)
        log_event("jupyter", "exit", code=code, why="mode exit")
        return code
    # Set from the HTTP threads (POST /api/shutdown) and the SIGTERM handler, and polled: a
    # signal handler must not take a lock (Event.set) the interrupted main thread may hold.
    exiting = threading.Event()
    terminated: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, _frame: terminated.append(signum))

    def wait_for_the_end() -> None:
        while not terminated and not exiting.is_set():
            time.sleep(0.02)

    if mode == "silent":
        wait_for_the_end()
        return 0
    if mode == "hang":
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(sock)
        listener.listen(16)

        def accept_and_hold() -> None:
            held = []
            while True:
                held.append(listener.accept()[0])

        threading.Thread(target=accept_and_hold, daemon=True).start()
        wait_for_the_end()
        return 0
    server = Server(sock, Handler)
    server.token = token
    server.exiting = exiting
    os.chmod(sock, int(opts.get("ServerApp.sock_mode", "0600"), 8))
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    # Real Jupyter prints its URL with the token: the launcher must mask it.
    print(f"[I fake-jupyter] Jupyter Server is running at: http+unix://{sock}/lab?token={token}",
          flush=True)  # fmt: skip
    log_event("jupyter", "listening", sock=sock)
    wait_for_the_end()
    time.sleep(float(opts.get("Fake.stop_delay", "0.3")))
    server.shutdown()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(sock)
    print("[I fake-jupyter] Shutting down", flush=True)
    log_event("jupyter", "exit", code=0, why=server.why)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
