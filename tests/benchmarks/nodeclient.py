"""The benchmark's client and floor job; runs on the login host and, through srun, on the node.

    python nodeclient.py floor                         the start-up floor: Jupyter, no tool
    python nodeclient.py rtt (--port P | --unix S)    HTTP and kernel round trips, JSON on stdout
    python nodeclient.py download (--port P | --unix S) --path /files/NAME   bulk throughput, JSON
    python nodeclient.py ssh-stream --control CTL --path FILE   ssh's own throughput, same master

The token comes in the environment (BENCH_TOKEN), never on a command line. Only 127.0.0.1 or a Unix
socket is ever contacted. Standard library plus websocket-client (in the project's test extras).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 30) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.unix_path)
        self.sock = sock


def connection(args: argparse.Namespace, timeout: float = 30) -> http.client.HTTPConnection:
    if args.unix:
        return UnixHTTPConnection(args.unix, timeout)
    return http.client.HTTPConnection("127.0.0.1", args.port, timeout=timeout)


def headers(token: str) -> dict[str, str]:
    return {"Authorization": f"token {token}", "Content-Type": "application/json"}


def request(
    conn: http.client.HTTPConnection, token: str, method: str, path: str, body: object = None
) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    conn.request(method, path, body=data, headers=headers(token))
    resp = conn.getresponse()
    return resp.status, resp.read()


# -- floor -----------------------------------------------------------------------------------------
def floor() -> int:
    """Start Jupyter on the node with the launcher's command line, poll until it answers, stay.

    Prints ``READY <seconds since this script started>``. scancel ends it like any job.
    """
    t0 = time.monotonic()
    token = os.environ["BENCH_TOKEN"]
    rundir = tempfile.mkdtemp(prefix=f"bench-floor.{os.environ.get('SLURM_JOB_ID', 'x')}.")
    sock = os.path.join(rundir, "jupyter.sock")
    env = dict(os.environ, JUPYTER_TOKEN=token, JUPYTER_RUNTIME_DIR=os.path.join(rundir, "rt"))
    argv = [
        sys.executable,
        "-m",
        "jupyter_server",
        f"--ServerApp.sock={sock}",
        "--ServerApp.sock_mode=0600",
        "--ServerApp.open_browser=False",
        "--ServerApp.jpserver_extensions=spunnel_jupyter=False",  # as the launcher does
        "--ServerApp.default_url=/lab",
    ]
    jupyter = subprocess.Popen(
        argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )
    try:
        while jupyter.poll() is None:
            try:
                conn = UnixHTTPConnection(sock, timeout=2)
                status, _ = request(conn, token, "GET", "/api/status")
                conn.close()
                if status == 200:
                    break
            except OSError:
                pass
            time.sleep(0.01)
        else:
            print(f"FAILED jupyter exited {jupyter.returncode}", flush=True)
            return 1
        print(f"READY {time.monotonic() - t0:.3f}", flush=True)
        jupyter.wait()
        return 0
    finally:
        shutil.rmtree(rundir, ignore_errors=True)


# -- round trips -----------------------------------------------------------------------------------
def execute_request(code: str, session: str) -> tuple[str, str]:
    msg_id = uuid.uuid4().hex
    msg = {
        "header": {
            "msg_id": msg_id,
            "username": "bench",
            "session": session,
            "msg_type": "execute_request",
            "version": "5.3",
            "date": "",
        },
        "parent_header": {},
        "metadata": {},
        "channel": "shell",
        "buffers": [],
        "content": {
            "code": code,
            "silent": False,
            "store_history": False,
            "user_expressions": {},
            "allow_stdin": False,
            "stop_on_error": True,
        },
    }
    return msg_id, json.dumps(msg)


def kernel_round_trips(args: argparse.Namespace, token: str, count: int) -> list[float]:
    import websocket  # websocket-client

    conn = connection(args)
    status, body = request(conn, token, "POST", "/api/kernels", {"name": "python3"})
    if status != 201:
        raise SystemExit(f"kernel start failed: HTTP {status}")
    kernel = json.loads(body)["id"]
    hdr = [f"Authorization: token {token}"]
    if args.unix:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(args.unix)
        ws = websocket.create_connection(
            f"ws://localhost/api/kernels/{kernel}/channels", header=hdr, socket=sock, timeout=60
        )
    else:
        ws = websocket.create_connection(
            f"ws://127.0.0.1:{args.port}/api/kernels/{kernel}/channels", header=hdr, timeout=60
        )
    session = uuid.uuid4().hex
    times = []
    try:
        for i in range(count + 3):  # three warm-ups: the first execute waits for the kernel
            msg_id, text = execute_request("pass", session)
            t0 = time.perf_counter()
            ws.send(text)
            while True:
                msg = json.loads(ws.recv())
                if msg.get("parent_header", {}).get("msg_id") != msg_id:
                    continue
                if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                    break
            if i >= 3:
                times.append(time.perf_counter() - t0)
    finally:
        ws.close()
        request(conn, token, "DELETE", f"/api/kernels/{kernel}")
        conn.close()
    return times


def rtt(args: argparse.Namespace) -> dict[str, object]:
    token = os.environ["BENCH_TOKEN"]
    conn = connection(args)
    keepalive = []
    for i in range(args.count + 5):
        t0 = time.perf_counter()
        status, _ = request(conn, token, "GET", "/api/status")
        if status != 200:
            raise SystemExit(f"GET /api/status: HTTP {status}")
        if i >= 5:
            keepalive.append(time.perf_counter() - t0)
    conn.close()
    fresh = []
    for _ in range(args.count // 2):
        t0 = time.perf_counter()
        conn = connection(args)
        status, _ = request(conn, token, "GET", "/api/status")
        conn.close()
        fresh.append(time.perf_counter() - t0)
    kernel = kernel_round_trips(args, token, args.count)
    return {
        "http_keepalive_s": statistics.median(keepalive),
        "http_new_connection_s": statistics.median(fresh),
        "kernel_execute_s": statistics.median(kernel),
        "samples": {"http": len(keepalive), "fresh": len(fresh), "kernel": len(kernel)},
    }


def download(args: argparse.Namespace) -> dict[str, object]:
    token = os.environ["BENCH_TOKEN"]
    conn = connection(args, timeout=120)
    t0 = time.perf_counter()
    conn.request("GET", args.path, headers=headers(token))
    resp = conn.getresponse()
    if resp.status != 200:
        raise SystemExit(f"GET {args.path}: HTTP {resp.status}")
    size = 0
    while chunk := resp.read(1 << 20):
        size += len(chunk)
    seconds = time.perf_counter() - t0
    conn.close()
    return {"bytes": size, "seconds": seconds, "mb_per_s": size / seconds / 1e6}


def ssh_stream(args: argparse.Namespace) -> dict[str, object]:
    """The transport's own ceiling: ``cat`` the file through a new channel of the ControlMaster."""
    argv = ["ssh", "-S", args.control, "-o", "BatchMode=yes", args.host, "cat", "--", args.path]
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    size = 0
    while chunk := proc.stdout.read(1 << 20):
        size += len(chunk)
    if proc.wait() != 0:
        raise SystemExit(f"ssh cat exited {proc.returncode}")
    seconds = time.perf_counter() - t0
    return {"bytes": size, "seconds": seconds, "mb_per_s": size / seconds / 1e6}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["floor", "rtt", "download", "ssh-stream"])
    p.add_argument("--port", type=int)
    p.add_argument("--unix")
    p.add_argument("--path", default="")
    p.add_argument("--count", type=int, default=40)
    p.add_argument("--control", help="ssh ControlMaster socket (ssh-stream)")
    p.add_argument("--host", default="c1")
    args = p.parse_args()
    if args.mode == "floor":
        return floor()
    modes = {"rtt": rtt, "download": download, "ssh-stream": ssh_stream}
    result = modes[args.mode](args)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
