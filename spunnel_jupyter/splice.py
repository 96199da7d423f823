"""Moving one relayed connection's bytes: splice(2) through a pipe in each direction, no copy
through Python, a few syscalls per 64 KB (relay.py accepts the connections and runs the loop)."""

from __future__ import annotations

import contextlib
import os
import selectors
import socket

# Bytes per splice: a default pipe's capacity (about 1 GB/s here). 1 MB pipes were no faster,
# and they count against the user's pipe-user-pages-soft, shared with all their programs.
_CHUNK = 1 << 16
_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK


class Flow:
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


class Pair:
    """A client connection and its upstream: two flows, one per direction."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.socks = (client, upstream)
        first = Flow(client, upstream)
        try:
            self.flows = (first, Flow(upstream, client))
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
