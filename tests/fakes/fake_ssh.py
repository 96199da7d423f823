"""Fake OpenSSH client, the subset spunnel uses. The "node" and the login host are this machine.

- ``ssh -N -M -S CTL [-o ...] -L SPEC... | -R SPEC... -- HOST``: a ControlMaster that really
  forwards: it listens where each SPEC says (a Unix socket or 127.0.0.1:PORT) and relays every
  connection's bytes to the SPEC's target (a Unix socket or localhost:PORT), on threads. It
  serves ``-O`` requests on CTL and runs until ``-O exit`` or a signal.
- ``ssh -S CTL -O check|exit|forward|cancel [-L SPEC] HOST``: through the master's socket.
- ``ssh -S CTL -T ... -- HOST CMD``: a command through the master; runs nothing, exits 0.

Switches (files in $FAKE_SLURM_DIR/ctl):
  ssh_refuse_forward        masters with -L (login host -> node) are refused: exit 255, saying
                            the file's content (default: Permission denied (publickey).)
  ssh_refuse_reverse        the same for -R masters (the node dialling back)
  ssh_refuse_forward_count  with a refusal set: refuse only this many more masters
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import time
from typing import Any

from common import eprint, flag, log_call, log_event, path

_VALUE_OPTIONS = set("BbcDEeFIiJLlmOoPpQRSWw")
Address = tuple[str, Any]  # ("unix", path) or ("tcp", (host, port))


def parse_argv(argv: list[str]) -> tuple[dict[str, Any], set[str], str, list[str]]:
    """ssh's options (-L, -R and -o as lists), its flags, the host and the command."""
    opts: dict[str, Any] = {"-L": [], "-R": [], "-o": []}
    flags: set[str] = set()
    i = 0
    while i < len(argv) and argv[i].startswith("-") and argv[i] != "-":
        arg = argv[i]
        if arg == "--":
            i += 1
            break
        if arg[1] in _VALUE_OPTIONS:
            value = arg[2:]
            if not value:
                i += 1
                value = argv[i]
            if isinstance(opts.get(arg[:2]), list):
                opts[arg[:2]].append(value)
            else:
                opts[arg[:2]] = value
        else:
            flags.update(arg[1:])
        i += 1
    host = argv[i] if i < len(argv) else ""
    return opts, flags, host, argv[i + 1 :]


def parse_spec(spec: str) -> tuple[Address, Address]:
    """Where a -L/-R SPEC listens and where it connects (both on this machine)."""
    parts = spec.split(":")
    if parts[0].startswith("/"):
        listen: Address = ("unix", parts[0])
        rest = parts[1:]
    elif parts[0].isdigit():
        listen, rest = ("tcp", ("127.0.0.1", int(parts[0]))), parts[1:]
    else:
        listen, rest = ("tcp", (parts[0], int(parts[1]))), parts[2:]
    if rest[0].startswith("/"):
        return listen, ("unix", rest[0])
    return listen, ("tcp", (rest[0], int(rest[1])))


def _connect(address: Address) -> socket.socket:
    kind, where = address
    sock = socket.socket(socket.AF_UNIX if kind == "unix" else socket.AF_INET)
    try:
        sock.connect(where)
    except OSError:
        sock.close()
        raise
    return sock


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


def _relay(client: socket.socket, target: Address) -> None:
    try:
        upstream = _connect(target)
    except OSError as e:
        eprint(f"channel 2: open failed: connect failed: {e.strerror}")
        client.close()
        return
    back = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
    back.start()
    _pump(client, upstream)
    back.join()
    client.close()
    upstream.close()


class Forward:
    """One -L/-R: a listener and a thread that relays each connection to the target."""

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.listen, self.target = parse_spec(spec)
        kind, where = self.listen
        if kind == "unix":
            with contextlib.suppress(FileNotFoundError):
                os.unlink(where)  # StreamLocalBindUnlink=yes
            self.sock = socket.socket(socket.AF_UNIX)
        else:
            self.sock = socket.socket(socket.AF_INET)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind(where)
        except OSError:
            self.sock.close()
            raise
        self.sock.listen(64)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return  # closed
            threading.Thread(target=_relay, args=(client, self.target), daemon=True).start()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() above
        self.sock.close()
        if self.listen[0] == "unix":
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.listen[1])


def _bind_error(spec: str, e: OSError) -> str:
    listen, _ = parse_spec(spec)
    if listen[0] == "unix":
        return f"unix_listener: cannot bind to path {listen[1]}: {e.strerror}"
    host, port = listen[1]
    return f"bind [{host}]:{port}: {e.strerror}\nchannel_setup_fwd_listener_tcpip: cannot listen to port: {port}"  # noqa: E501


class Master:
    def __init__(self, ctl: str, host: str, specs: list[str]) -> None:
        self.ctl = ctl
        self.host = host
        self.forwards: dict[str, Forward] = {}
        self.done = threading.Event()
        self.code = 255
        self.lock = threading.Lock()
        for spec in specs:
            try:
                self.forwards[spec] = Forward(spec)
            except OSError as e:  # ExitOnForwardFailure=yes
                eprint(_bind_error(spec, e))
                eprint("Could not request local forwarding.")
                self.finish(255, "forward failed")
        if os.path.exists(ctl):
            eprint(f"ControlSocket {ctl} already exists, disabling multiplexing")
            self.server: socket.socket | None = None
        else:
            self.server = socket.socket(socket.AF_UNIX)
            self.server.bind(ctl)
            self.server.listen(16)
            threading.Thread(target=self._serve, daemon=True).start()
        log_event("ssh", "master-up", ctl=ctl, host=host, forwards=specs)

    def _serve(self) -> None:
        assert self.server is not None
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._request, args=(conn,), daemon=True).start()

    def _request(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rw") as f:
            request = json.loads(f.readline() or "{}")
            answer = self.handle(request)
            f.write(json.dumps(answer) + "\n")
            f.flush()
        if request.get("op") == "exit":
            self.done.set()

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        log_event("ssh", f"mux-{op}", ctl=self.ctl, spec=request.get("spec"))
        if op == "check":
            return {"ok": True, "pid": os.getpid()}
        if op == "exit":
            self.code = 0
            return {"ok": True}
        if op == "run":
            return {"ok": True, "code": 0}
        spec = request.get("spec", "")
        with self.lock:
            if op == "forward":
                try:
                    self.forwards[spec] = Forward(spec)
                except OSError as e:
                    return {"ok": False, "error": _bind_error(spec, e)}
                return {"ok": True}
            if op == "cancel" and spec in self.forwards:
                self.forwards.pop(spec).close()
                return {"ok": True}
        return {"ok": False, "error": f"unknown request {op} {spec}"}

    def run(self) -> None:
        # The handler only records the signal: taking a lock (Event.set) there could deadlock
        # with the interrupted main thread.
        signals: list[int] = []
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda signum, _frame: signals.append(signum))
        while not signals and not self.done.is_set():
            time.sleep(0.02)
        if signals:
            eprint(f"Killed by signal {signals[0]}.")
            self.finish(255, "signal")
        self.finish(self.code, "exit request")

    def finish(self, code: int, why: str) -> None:
        if getattr(self, "server", None) is not None:
            assert self.server is not None
            self.server.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.ctl)
        for forward in self.forwards.values():
            forward.close()
        log_event("ssh", "master-exit", ctl=self.ctl, code=code, why=why)
        os._exit(code)


def _refused(direction: str) -> str | None:
    """The refusal the test set up for a master of this direction, if any."""
    said = flag(f"ssh_refuse_{direction}")
    if said is None:
        return None
    count = flag(f"ssh_refuse_{direction}_count")
    if count is not None:
        if int(count) <= 0:
            return None
        with open(path("ctl", f"ssh_refuse_{direction}_count"), "w") as f:
            f.write(str(int(count) - 1))
    return said or "Permission denied (publickey)."


def _mux(ctl: str, request: dict[str, Any]) -> dict[str, Any] | None:
    try:
        sock = _connect(("unix", ctl))
    except OSError as e:
        eprint(f"Control socket connect({ctl}): {e.strerror}")
        return None
    with sock, sock.makefile("rw") as f:
        f.write(json.dumps(request) + "\n")
        f.flush()
        return json.loads(f.readline() or '{"ok": false, "error": "no answer"}')  # type: ignore[no-any-return]


def main(argv: list[str]) -> int:
    log_call("ssh", argv)
    opts, flags, host, command = parse_argv(argv)
    ctl = opts.get("-S", "")
    op = opts.get("-O")
    if op:
        specs = opts["-L"] or opts["-R"]
        answer = _mux(ctl, {"op": op, "spec": specs[0] if specs else ""})
        if answer is None:
            return 255
        if not answer.get("ok"):
            eprint(f"mux_client_forward: forwarding request failed: {answer.get('error')}")
            return 255
        if op == "check":
            eprint(f"Master running (pid={answer['pid']})")
        elif op == "exit":
            eprint("Exit request sent.")
        return 0
    if "M" in flags:
        direction = "reverse" if opts["-R"] and not opts["-L"] else "forward"
        refusal = _refused(direction)
        if refusal is not None:
            log_event("ssh", "refused", direction=direction, host=host)
            eprint(refusal if "@" in refusal or ":" in refusal else f"{host}: {refusal}")
            return 255
        Master(ctl, host, opts["-L"] + opts["-R"]).run()
        return 255  # not reached: the master exits through finish()
    if ctl and command:
        answer = _mux(ctl, {"op": "run", "cmd": command})
        return 255 if answer is None else int(answer.get("code", 0))
    eprint(f"fake ssh: unsupported invocation {argv}")
    return 255
