"""Who owns the other end of a loopback TCP connection: one netlink sock_diag query per connection.

The relay's port on 127.0.0.1 is reachable by every user of a shared login host; the kernel knows
which uid created the connecting socket. ``PeerOwner.uid`` asks it the way ``ss -e`` does:
NETLINK_SOCK_DIAG, SOCK_DIAG_BY_FAMILY, an ``inet_diag_req_v2`` naming the peer's socket by its
exact 4-tuple (seen from the peer: source = its address and port, destination = ours). The kernel
answers synchronously, inside the send, so a query costs two syscalls on a netlink socket kept open
(no descriptor to find when the process is out of them), and never blocks. Linux only; standard
library only (it runs in the supervisor).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import socket
import struct

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLMSG_ERROR = 2
NLM_F_REQUEST = 1
INET_DIAG_NOCOOKIE = 0xFFFFFFFF
# TCP states a connecting socket can be in while we hold its accepted end. A lookup that misses the
# connection may fall back to a LISTEN socket on the peer's port; a TIME_WAIT entry reports uid 0.
_STATES = frozenset({1, 4, 5, 8, 9, 11})  # ESTABLISHED FIN_WAIT1/2 CLOSE_WAIT LAST_ACK CLOSING

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
# inet_diag_req_v2: family, protocol, ext, pad, states; inet_diag_sockid: sport, dport (big
# endian), src[16], dst[16], if, cookie[2].
_REQ = struct.Struct("=IHHII BBBxI")
_SOCKID_PORTS = struct.Struct(">HH")
_TAIL = struct.pack("=III", 0, INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE)
_PAD12 = bytes(12)
_MSG_LEN = 16 + 72  # nlmsghdr + inet_diag_msg
_UID_AT = 16 + 64  # idiag_uid in inet_diag_msg (after family..retrans, sockid, expires, r/wqueue)
_REQ_LEN = _REQ.size + _SOCKID_PORTS.size + 32 + len(_TAIL)


class OwnerCheckUnavailable(OSError):
    """The kernel does not name a connection's owner here (sock_diag blocked or broken)."""


class PeerOwner:
    """A netlink socket for sock_diag queries; ``uid`` answers one, ``close`` frees it."""

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._seq = itertools.count(1)
        self._buf = bytearray(8192)
        with contextlib.suppress(OSError):  # opened again at the first query if this fails
            self._open()

    def _open(self) -> socket.socket:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG)
        sock.setblocking(False)
        self._sock = sock
        return sock

    def uid(self, peer: tuple[str, int], local: tuple[str, int]) -> int:
        """The uid that owns the IPv4 TCP socket at ``peer`` connected to our ``local``.

        Raises OSError when the kernel cannot tell (no such socket, EPERM, no answer)."""
        sock = self._sock or self._open()
        seq = next(self._seq) & 0xFFFFFFFF
        request = b"".join(
            (
                _REQ.pack(
                    _REQ_LEN,
                    SOCK_DIAG_BY_FAMILY,
                    NLM_F_REQUEST,
                    seq,
                    0,
                    socket.AF_INET,
                    socket.IPPROTO_TCP,
                    0,
                    0xFFFFFFFF,
                ),
                _SOCKID_PORTS.pack(peer[1], local[1]),
                socket.inet_aton(peer[0]),
                _PAD12,
                socket.inet_aton(local[0]),
                _PAD12,
                _TAIL,
            )
        )
        try:
            sock.send(request)
            while True:  # the answer is queued before send returns; skip stale ones
                n = sock.recv_into(self._buf)
                if n >= 16 and _NLMSGHDR.unpack_from(self._buf)[3] == seq:
                    return self._parse(n, peer, local)
        except BlockingIOError:
            raise OSError(errno.ETIMEDOUT, "no answer from sock_diag") from None
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ETIMEDOUT):  # overrun or worse: start afresh
                self.close()
            raise

    def _parse(self, n: int, peer: tuple[str, int], local: tuple[str, int]) -> int:
        buf = self._buf
        kind = _NLMSGHDR.unpack_from(buf)[1]
        if kind == NLMSG_ERROR and n >= 20:
            code = -struct.unpack_from("=i", buf, 16)[0]
            raise OSError(code, f"sock_diag: {errno.errorcode.get(code, code)}")
        if kind != SOCK_DIAG_BY_FAMILY or n < _MSG_LEN:
            raise OSError(errno.EPROTO, "sock_diag: unexpected answer")
        if buf[16] != socket.AF_INET or _SOCKID_PORTS.unpack_from(buf, 20) != (peer[1], local[1]):
            raise OSError(errno.EPROTO, "sock_diag: answer for another socket")
        if buf[17] not in _STATES:
            raise OSError(errno.ENOENT, f"sock_diag: the peer's socket is in TCP state {buf[17]}")
        return int(struct.unpack_from("=I", buf, _UID_AT)[0])

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
