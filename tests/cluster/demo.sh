#!/usr/bin/env bash
# Set up the real test cluster and run the main job as the test user alice:
#   spunnel-notebook -p interact --mem 4000 -t 2:00:00
# on a terminal; Ctrl-C ends the session. Extra arguments replace the default options.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bash "$here/up.sh"
args=("$@")
((${#args[@]})) || args=(-p interact --mem 4000 -t 2:00:00)
cd /home/alice
exec runuser -u alice -- env HOME=/home/alice USER=alice LOGNAME=alice \
    PATH=/usr/local/bin:/usr/bin:/bin TERM="${TERM:-xterm}" spunnel-notebook "${args[@]}"
