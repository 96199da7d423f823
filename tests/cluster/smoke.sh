#!/usr/bin/env bash
# shellcheck disable=SC2015 # "A && B || fail": a failure of either A or B is the failure meant
# Check, as the test user alice, that the cluster up.sh stood up behaves like a real one: jobs land on c1,
# ssh to c1 needs no prompt, a server bound to c1's loopback is reachable from the login side only through an
# ssh -L tunnel (to a Unix socket and to a TCP port), and an impossible request is rejected at once.
# Run as root after up.sh; leaves nothing behind.
set -Eeuo pipefail
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
trap 'printf "smoke: FAILED (exit %s) at line %s: %s\n" "$?" "$LINENO" "$BASH_COMMAND" >&2' ERR

[[ -r /run/spunnel-test/cluster.env ]] || { echo "smoke: no /run/spunnel-test/cluster.env: run up.sh" >&2; exit 1; }
# shellcheck disable=SC1091
. /run/spunnel-test/cluster.env
U=alice
fail() { echo "smoke: FAIL: $*" >&2; exit 1; }
ok() { echo "smoke: ok: $*"; }
as_user() { (cd / && exec runuser -u "$U" -- "$@"); }

out=$(as_user srun -p interact hostname 2>&1) && [[ $out == "$NODE" ]] || fail "srun hostname: $out"
ok "srun -p interact hostname -> $out"
out=$(as_user ssh -o BatchMode=yes "$NODE" hostname 2>&1) && [[ $out == "$NODE" ]] || fail "ssh $NODE hostname: $out"
ok "ssh -o BatchMode=yes $NODE hostname -> $out"

out=$(as_user srun -p interact --mem 9000 true 2>&1) && fail "srun --mem 9000 succeeded"
[[ $out == *"Requested node configuration is not available"* ]] || fail "srun --mem 9000: unexpected error: $out"
ok "srun --mem 9000 rejected: Requested node configuration is not available"

# A server in a job on c1, on a Unix socket and on c1's 127.0.0.1, and an ssh ControlMaster forwarding both.
d=$(as_user mktemp -d /tmp/spunnel-smoke.XXXXXX)
port_u=$((20000 + RANDOM % 10000)) port_t=$((30000 + RANDOM % 10000)) port_s=$((40000 + RANDOM % 10000))
job=smoke-$$
cleanup() {
    as_user ssh -S "$d/ctl" -O exit "$NODE" >/dev/null 2>&1 || true
    as_user scancel -n "$job" >/dev/null 2>&1 || true
    rm -rf "$d"
}
trap cleanup EXIT
cat >"$d/srv.py" <<'EOF'
import http.server, socket, socketserver, sys, threading
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"{socket.gethostname()} {self.server.kind}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
    def address_string(self): return "-"
class U(socketserver.ThreadingMixIn, socketserver.UnixStreamServer): kind = "unix"
class T(socketserver.ThreadingMixIn, socketserver.TCPServer): kind = "tcp"; allow_reuse_address = True
t = T(("127.0.0.1", int(sys.argv[2])), H)
threading.Thread(target=t.serve_forever, daemon=True).start()
U(sys.argv[1], H).serve_forever()
EOF
chown "$U:" "$d/srv.py"
(cd / && exec runuser -u "$U" -- setsid srun -p interact -J "$job" -t 5 python3 "$d/srv.py" "$d/srv.sock" "$port_s" \
    </dev/null >"$d/job.out" 2>&1 &)
for _ in $(seq 100); do [[ -S $d/srv.sock ]] && break; sleep 0.1; done
[[ -S $d/srv.sock ]] || fail "server in job did not start: $(cat "$d/job.out")"
curl -s -m 2 "http://127.0.0.1:$port_s/" >/dev/null 2>&1 && fail "c1's 127.0.0.1:$port_s is reachable from the login side"
ok "c1's 127.0.0.1 is not reachable from the login side"

(cd / && exec runuser -u "$U" -- setsid ssh -N -M -S "$d/ctl" -o BatchMode=yes -o ExitOnForwardFailure=yes \
    -L "127.0.0.1:$port_u:$d/srv.sock" -L "127.0.0.1:$port_t:127.0.0.1:$port_s" "$NODE" </dev/null >"$d/ssh.out" 2>&1 &)
for _ in $(seq 100); do as_user ssh -S "$d/ctl" -O check "$NODE" >/dev/null 2>&1 && break; sleep 0.1; done
as_user ssh -S "$d/ctl" -O check "$NODE" >/dev/null 2>&1 || fail "ssh master did not come up: $(cat "$d/ssh.out")"
out=$(curl -sS -m 5 "http://127.0.0.1:$port_u/") && [[ $out == "$NODE unix" ]] || fail "tunnel to Unix socket: $out"
ok "ssh -L 127.0.0.1:PORT:/unix.sock on $NODE -> '$out'"
out=$(curl -sS -m 5 "http://127.0.0.1:$port_t/") && [[ $out == "$NODE tcp" ]] || fail "tunnel to TCP: $out"
ok "ssh -L 127.0.0.1:PORT:127.0.0.1:PORT on $NODE -> '$out'"
echo "smoke: all passed"
