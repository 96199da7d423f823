"""The login-side listener of a forward-mode tunnel: 127.0.0.1:PORT -> ssh's local Unix socket,
for the session owner's connections only.

Why it exists: ssh sets no TCP_NODELAY on a ``-L`` connection whose target is a Unix socket. Jupyter
sends a kernel's replies as several small websocket frames; with Nagle on, each frame after the
first waits for the browser's delayed ACK, which costs a kernel execute about 40 ms instead of 5.
So we accept the TCP connection ourselves, with TCP_NODELAY, and hand its bytes to ssh's
``-L <local.sock>:<node's jupyter.sock>`` forward with splice(2): no copy through Python, a few
syscalls per 64 KB. Holding the port ourselves also keeps it (and the URL) ours while ssh
reconnects.

Every user of a shared login host can connect to 127.0.0.1:PORT, so a connection is kept only if
the kernel says the owner made it (peers.py), and reset unread otherwise. A laptop's ``ssh -L``
into the login host still works: the user's own sshd process makes that connection. Out of
descriptors or memory, the relay stops accepting for a while instead of spinning; past
``max_connections`` new connections wait in the kernel's backlog until one ends.

The relay runs on its own thread with its own selector, so a busy event loop in the process that
owns the session (the CLI or a Jupyter server) never stalls the notebook's traffic. Linux only.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable

from .peers import OwnerCheckUnavailable, PeerOwner
from .splice import Pair

# Errors that say "not now": the process or the host is out of descriptors or memory.
_SCARCE = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_PAUSE_FIRST, _PAUSE_MAX = 0.05, 1.0  # accepting stops this long, doubling while it persists
_RETRY_FIRST, _RETRY_MAX = 0.01, 0.25  # an upstream connect that could not be made yet
_CONNECT_WITHIN = 2.0  # then the client is closed (ssh wedged or its backlog never drains)
# accept(2) errors about one connection only (Linux passes pending network errors on).
_GONE = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ENETDOWN, errno.ETIMEDOUT})
_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close sends RST


def raise_nofile_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; return the soft limit.

    Each relayed connection holds six descriptors (two sockets, two pipes); a soft limit of 1024
    would cap a relay at about 170 connections. Idempotent; the Relay constructor calls it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):  # a hard limit the kernel refuses
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft


def _nodelay(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Connecting:
    """An accepted client whose upstream is not connected yet: ssh's backlog was full (a Unix
    connect then fails with EAGAIN and does not go on in the background, so it is retried on a
    timer), or a descriptor was missing."""

    def __init__(self, client: socket.socket) -> None:
        self.client = client
        self.upstream: socket.socket | None = None
        self.connected = False
        self.delay = _RETRY_FIRST
        self.retry_at = 0.0
        self.give_up = 0.0

    def close(self) -> None:
        self.client.close()
        if self.upstream is not None:
            self.upstream.close()


class Relay:
    """Listen on 127.0.0.1:``port`` and relay each of ``owner_uid``'s (and root's, unless
    ``allow_root`` is False) connections to the Unix socket ``target``.

    ``on_refused(uid)`` is called for each connection refused (``uid`` None when the kernel could
    not tell whose it was), ``on_death(exc)`` once if the relay thread ends on an unexpected
    exception; both run on the relay thread and must not block. Counters: ``refused``; state:
    ``alive``, ``error``."""

    def __init__(
        self,
        port: int,
        target: str,
        *,
        owner_uid: int | None = None,
        allow_root: bool = True,
        max_connections: int = 512,
        on_refused: Callable[[int | None], object] | None = None,
        on_death: Callable[[BaseException], object] | None = None,
    ) -> None:
        self.target = target
        self.owner_uid = os.getuid() if owner_uid is None else owner_uid
        # root can read the session's token file anyway: refusing it would protect nothing, and
        # an administrator's tools (and this project's tests, run as root) keep working.
        self.allowed = {self.owner_uid, 0} if allow_root else {self.owner_uid}
        self.max_connections = max_connections
        self.refused = 0
        self.error: BaseException | None = None
        self._on_refused, self._on_death = on_refused, on_death
        raise_nofile_limit()
        self._listener = socket.create_server(("127.0.0.1", port), backlog=128)
        self.port = self._listener.getsockname()[1]
        self._local = ("127.0.0.1", self.port)
        _nodelay(self._listener)  # accepted sockets inherit it on Linux; set again below anyway
        self._peers = PeerOwner()
        try:
            self._self_test()
        except OSError:
            self._listener.close()
            self._peers.close()
            raise
        self._listener.setblocking(False)
        self._wake_r, self._wake_w = socket.socketpair()
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ, None)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._listening = True
        self._pairs: set[Pair] = set()
        self._waiting: list[_Connecting] = []  # upstream connects to retry
        self._open = 0  # accepted clients not closed yet: pairs and waiting
        self._resume_at = 0.0  # accepting paused until then (0: not paused)
        self._pause_for = _PAUSE_FIRST
        self._stopping = False
        self._running = True
        self._thread = threading.Thread(
            target=self._loop, name=f"spunnel-relay-{self.port}", daemon=True
        )
        self._thread.start()

    def _self_test(self) -> None:
        """Check once that the kernel names our own connection's owner, so that a host where it
        cannot (sock_diag blocked by a seccomp or LSM policy) gives one clear error now instead of
        every connection refused later. Raises OwnerCheckUnavailable."""
        self._listener.settimeout(2)
        with socket.create_connection(self._local, timeout=2) as probe:
            mine = probe.getsockname()
            for _ in range(self.max_connections):  # others may have come first: reset, unread
                client, peer = self._listener.accept()
                if peer == mine:
                    break
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
                client.close()
            else:
                raise OwnerCheckUnavailable(errno.EAGAIN, "our own test connection never came")
            with client:
                try:
                    uid = self._peers.uid(peer, self._local)
                except OSError as e:
                    raise OwnerCheckUnavailable(e.errno, f"sock_diag: {e.strerror}") from e
        if uid != os.getuid():
            raise OwnerCheckUnavailable(0, f"sock_diag named uid {uid} for our own connection")

    @property
    def alive(self) -> bool:
        """True while the relay thread serves (False after close() or its death)."""
        return self._running

    def close(self) -> None:
        """Stop accepting, close every connection, wait for the thread, free the port. From a
        callback (on the relay thread) it only tells the loop to end; the loop frees the rest."""
        if self._stopping:
            return
        self._stopping = True
        if threading.current_thread() is self._thread:
            if not self._running:  # from on_death: the loop is over
                self._release()
            return
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        self._thread.join(timeout=5)
        if not self._thread.is_alive():  # else wedged: its descriptors stay with it (a daemon)
            self._release()

    def _release(self) -> None:
        for sock in (self._listener, self._wake_r, self._wake_w):
            sock.close()
        self._selector.close()
        self._peers.close()

    def _loop(self) -> None:
        try:
            while not self._stopping:
                timeout = self._run_timers() if self._resume_at or self._waiting else None
                for key, events in self._selector.select(timeout):
                    if key.fileobj is self._listener:
                        self._accept()
                    elif key.data is not None:
                        self._service(key.data, key.fileobj, events)
        except BaseException as exc:
            self.error = exc
        finally:
            self._running = False
            self._close_connections()
            if self._stopping:
                self._release()
        # After a death the listener stays bound until close(): a port let go could be taken by
        # another user, whom the browser would then hand its Jupyter token.
        if self.error is not None and self._on_death is not None:
            with contextlib.suppress(Exception):
                self._on_death(self.error)

    def _close_connections(self) -> None:
        for pair in list(self._pairs):
            with contextlib.suppress(Exception):
                self._drop(pair)
        for job in self._waiting:
            job.close()
        self._waiting.clear()

    def _run_timers(self) -> float | None:
        """Resume accepting, retry the upstream connects that are due; return the time to the
        next timer."""
        now = time.monotonic()
        if self._resume_at and now >= self._resume_at:
            self._resume_at = 0.0
            self._listen()
        due = [job for job in self._waiting if job.retry_at <= now]
        if due:
            self._waiting = [job for job in self._waiting if job.retry_at > now]
            for job in due:
                self._attempt(job)
        times = [job.retry_at for job in self._waiting]
        if self._resume_at:
            times.append(self._resume_at)
        return max(0.0, min(times) - time.monotonic()) if times else None

    def _listen(self) -> None:
        """Watch the listener when accepting makes sense: not paused, under the cap."""
        wanted = not self._resume_at and self._open < self.max_connections
        if wanted != self._listening:
            if wanted:
                self._selector.register(self._listener, selectors.EVENT_READ, None)
            else:
                self._selector.unregister(self._listener)
            self._listening = wanted

    def _pause(self) -> None:
        """Out of descriptors or memory: stop accepting for a while rather than spin on it."""
        if not self._resume_at:
            self._resume_at = time.monotonic() + self._pause_for
            self._pause_for = min(self._pause_for * 2, _PAUSE_MAX)
            self._listen()

    def _accept(self) -> None:
        while self._open < self.max_connections and not self._resume_at:
            try:
                client, peer = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno in _SCARCE:  # it stays in the backlog; accept it after a pause
                    self._pause()
                    return
                if e.errno in _GONE:  # that connection is gone
                    continue
                raise
            if not self._owned(client, peer):
                continue
            self._open += 1
            job = _Connecting(client)
            try:
                _nodelay(client)
                client.setblocking(False)
            except OSError:
                self._give_up(job)
                continue
            job.give_up = time.monotonic() + _CONNECT_WITHIN
            self._attempt(job)
        self._listen()

    def _owned(self, client: socket.socket, peer: tuple[str, int]) -> bool:
        """Whether the owner made this connection; if not (or if the kernel cannot tell), reset it
        unread and count it."""
        uid = None
        with contextlib.suppress(OSError):
            uid = self._peers.uid(peer, self._local)
        if uid in self.allowed:
            return True
        with contextlib.suppress(OSError):
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
        client.close()
        self.refused += 1
        if self._on_refused is not None:
            with contextlib.suppress(Exception):
                self._on_refused(uid)
        return False

    def _attempt(self, job: _Connecting) -> None:
        """Connect ``job``'s upstream and start relaying, or schedule a retry, or give up."""
        try:
            if job.upstream is None:
                job.upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                job.upstream.setblocking(False)
            if not job.connected:
                job.upstream.connect(self.target)
                job.connected = True
            pair = Pair(job.client, job.upstream)
        except OSError as e:
            # EAGAIN: ssh's backlog is full. Others: ssh is down or reconnecting, the browser
            # sees a closed connection.
            if e.errno != errno.EAGAIN and e.errno not in _SCARCE:
                self._give_up(job)
                return
            if e.errno in _SCARCE:
                self._pause()
            now = time.monotonic()
            if now + job.delay > job.give_up:
                self._give_up(job)
                return
            job.retry_at = now + job.delay
            job.delay = min(job.delay * 2, _RETRY_MAX)
            self._waiting.append(job)
            return
        self._pause_for = _PAUSE_FIRST
        self._pairs.add(pair)
        self._service(pair)

    def _give_up(self, job: _Connecting) -> None:
        job.close()
        self._open -= 1
        self._listen()

    def _service(self, pair: Pair, sock: object = None, events: int = 0) -> None:
        """Pump the flows ``sock`` is ready for (all of them when ``sock`` is None)."""
        if pair not in self._pairs:  # dropped earlier in this round: its fds may be reused
            return
        try:
            for flow in pair.flows:
                reading = flow.src is sock and events & selectors.EVENT_READ
                if sock is None or reading or (flow.dst is sock and events & selectors.EVENT_WRITE):
                    flow.pump()
        except OSError:
            self._drop(pair)
            return
        if all(flow.done for flow in pair.flows):
            self._drop(pair)
            return
        for one in pair.socks:
            wanted, now = pair.interest(one), pair.watched.get(one, 0)
            if wanted == now:
                continue
            if wanted and now:
                self._selector.modify(one, wanted, pair)
            elif wanted:
                self._selector.register(one, wanted, pair)
            else:  # both of its flows wait on the other socket
                self._selector.unregister(one)
            pair.watched[one] = wanted

    def _drop(self, pair: Pair) -> None:
        if pair not in self._pairs:
            return
        self._pairs.discard(pair)
        self._open -= 1
        for sock, events in pair.watched.items():
            if events:
                self._selector.unregister(sock)
        pair.close()
        if not self._listening:
            self._listen()
