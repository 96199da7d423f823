"""Run a command (as root) in a user namespace that maps every uid and gid to itself but lets no
further user namespace be made (user.max_user_namespaces=0 there): a node "with unprivileged user
namespaces switched off", without touching the machine's own limit. Execs the command in place
(the caller's pid is the daemon's): a child still outside writes the maps."""

import ctypes
import os
import sys

CLONE_NEWUSER = 0x10000000
parent = os.getpid()
ready_r, ready_w = os.pipe()
done_r, done_w = os.pipe()
if os.fork() == 0:  # outside: map the parent's new namespace once it exists
    os.close(ready_w)
    os.close(done_r)
    os.read(ready_r, 1)
    for name in ("uid_map", "gid_map"):
        with open(f"/proc/{parent}/{name}", "w") as f:
            f.write("0 0 4294967295")
    os.write(done_w, b"x")
    os._exit(0)
os.close(ready_r)
os.close(done_w)
if ctypes.CDLL(None, use_errno=True).unshare(CLONE_NEWUSER) != 0:
    sys.exit(f"no-userns: unshare: {os.strerror(ctypes.get_errno())}")
os.write(ready_w, b"x")
if os.read(done_r, 1) != b"x":
    sys.exit("no-userns: the maps were not written")
os.wait()
with open("/proc/sys/user/max_user_namespaces", "w") as f:
    f.write("0")
os.execvp(sys.argv[1], sys.argv[1:])  # noqa: S606 (the command line we were given)
