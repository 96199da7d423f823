"""The login-side listener of a forward-mode tunnel: 127.0.0.1:PORT -> ssh's local Unix socket.

Why it exists: ssh sets no TCP_NODELAY on a ``-L`` connection whose target is a Unix socket. Jupyter
sends a kernel's replies as several small websocket frames; with Nagle on, each frame after the
first waits for the browser's delayed ACK, which costs a kernel execute about 40 ms instead of 5.
So we accept the TCP connection ourselves, with TCP_NODELAY, and hand its bytes to ssh's
``-L <local.sock>:<node's jupyter.sock>`` forward with splice(2): no copy through Python, a few
syscalls per 64 KB. Holding the port ourselves also keeps it (and the URL) ours while ssh
reconnects.

The relay runs on its own thread with its own selector, so a busy event loop in the process that
owns the session (the CLI or a Jupyter server) never stalls the notebook's traffic. Linux only.
"""

from __future__ import annotations

import contextlib
import errno
import os
import selectors
import socket
import threading

# Bytes per splice: a default pipe's capacity (about 1 GB/s here). 1 MB pipes were no faster,
# and they count against the user's pipe-user-pages-soft, shared with all their programs.
_CHUNK = 1 << 16
_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK


def _nodelay(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Flow:
    """One direction of one connection: ``src`` -> pipe -> ``dst``."""

    def __init__(self, src: socket.socket, dst: socket.socket) -> None:
        self.src, self.dst = src, dst
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.buffered = 0  # bytes in the pipe, not yet written to dst
        self.eof = False

    def pump(self) -> None:
        """Move what can move now without blocking. Raises OSError when a side is broken."""
        more = not self.eof
        while True:
            while self.buffered:
                try:
                    self.buffered -= os.splice(
                        self.r, self.dst.fileno(), self.buffered, flags=_FLAGS
                    )
                except BlockingIOError:
                    return  # dst is full: wait until it is writable
            if not more:
                return
            try:
                n = os.splice(self.src.fileno(), self.w, _CHUNK, flags=_FLAGS)
            except BlockingIOError:
                return  # nothing to read: wait until src is readable
            if n == 0:
                self.eof = True
                with contextlib.suppress(OSError):
                    self.dst.shutdown(socket.SHUT_WR)
                return
            self.buffered = n
            more = n == _CHUNK  # a short read drained src; epoll (level-triggered) tells of more

    @property
    def done(self) -> bool:
        return self.eof and not self.buffered

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


class _Pair:
    """A client connection and its upstream: two flows, one per direction."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.socks = (client, upstream)
        first = _Flow(client, upstream)
        try:
            self.flows = (first, _Flow(upstream, client))
        except OSError:
            first.close()
            raise
        self.watched: dict[socket.socket, int] = {}  # the events registered with the selector

    def interest(self, sock: socket.socket) -> int:
        """What ``sock`` waits for: readable when its outbound pipe is empty, writable when its
        inbound pipe holds bytes it could not take yet."""
        out, inbound = self.flows if sock is self.socks[0] else self.flows[::-1]
        events = 0
        if not out.eof and not out.buffered:
            events |= selectors.EVENT_READ
        if inbound.buffered:
            events |= selectors.EVENT_WRITE
        return events

    def close(self) -> None:
        for flow in self.flows:
            flow.close()
        for sock in self.socks:
            sock.close()


class Relay:
    """Listen on 127.0.0.1:``port`` and relay each connection to the Unix socket ``target``."""

    def __init__(self, port: int, target: str) -> None:
        self.port = port
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", port), backlog=128)
        _nodelay(self._listener)  # accepted sockets inherit it on Linux; set again below anyway
        self._listener.setblocking(False)
        self._wake_r, self._wake_w = socket.socketpair()
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ, None)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._pairs: set[_Pair] = set()
        self._stopping = False
        self._thread = threading.Thread(
            target=self._loop, name=f"spunnel-relay-{port}", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        """Stop accepting, close every connection, wait for the thread."""
        if self._stopping:
            return
        self._stopping = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        try:
            while not self._stopping:
                for key, events in self._selector.select():
                    if key.fileobj is self._listener:
                        self._accept()
                    elif key.data is not None:
                        self._service(key.data, key.fileobj, events)
        finally:
            for pair in list(self._pairs):
                self._drop(pair)
            for sock in (self._listener, self._wake_r, self._wake_w):
                sock.close()
            self._selector.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as e:  # EMFILE and the like: drop this one, keep listening
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    return
                continue
            _nodelay(client)
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                upstream.settimeout(2)  # ssh accepts at once; this only bounds a wedged ssh
                upstream.connect(self.target)
            except OSError:  # ssh is down or reconnecting: the browser sees a closed connection
                upstream.close()
                client.close()
                continue
            client.setblocking(False)
            upstream.setblocking(False)
            try:
                pair = _Pair(client, upstream)
            except OSError:  # out of pipes (EMFILE): refuse this connection
                upstream.close()
                client.close()
                continue
            self._pairs.add(pair)
            self._service(pair)

    def _service(self, pair: _Pair, sock: object = None, events: int = 0) -> None:
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

    def _drop(self, pair: _Pair) -> None:
        if pair not in self._pairs:
            return
        self._pairs.discard(pair)
        for sock, events in pair.watched.items():
            if events:
                self._selector.unregister(sock)
        pair.close()
