#!/bin/sh
# Start, stop or restart one simulated node's containerd, the same way every time.
#
# Usage: containerd_ctl.sh start|stop|restart|status NODE_STATE_DIR
#
# Why a script: the product restarts containerd with a user-supplied command
# (`--restart "command:containerd_ctl.sh restart DIR"`), exactly as it would run
# `systemctl restart containerd` on a real node.  The Python harness uses this
# same script, so a test exercises one start path only.
#
# NODE_STATE_DIR holds launch.sh (written by tests/harness/containerd.py), which
# runs containerd in a private mount namespace where the node's etc/containerd is
# bind-mounted over /etc/containerd.  containerd runs detached (own session,
# stdin from /dev/null, output appended to NODE_STATE_DIR/containerd.log) so this
# script returns at once and never holds its caller's pipes open.
#
# Every process of the node carries REGMIRROR_HARNESS_NODE=<dir> in its
# environment; `stop` kills all of them, so a pid file overwritten by a racing
# restart cannot leak a containerd.
set -eu
# This script and its subshells must never look like node processes themselves.
[ -z "${REGMIRROR_HARNESS_NODE+x}" ] || exec env -u REGMIRROR_HARNESS_NODE "$0" "$@"

usage() { echo "usage: $0 start|stop|restart|status NODE_STATE_DIR" >&2; exit 2; }
[ $# -eq 2 ] || usage
action=$1
[ -d "$2" ] || { echo "$0: no such node state dir: $2" >&2; exit 2; }
dir=$(cd "$2" && pwd -P)
launch=$dir/launch.sh
pidfile=$dir/containerd.pid
log=$dir/containerd.log
marker="REGMIRROR_HARNESS_NODE=$dir"
[ -x "$launch" ] || { echo "$0: $launch missing or not executable" >&2; exit 2; }

# Print the pids of live (non-zombie) processes that belong to this node.
# One grep over every /proc/PID/environ (NUL-separated): cheap enough to poll.
# A zombie has an empty environ, so it never matches: dead is dead.
node_pids() {
    grep -lzxF "$marker" /proc/[0-9]*/environ 2>/dev/null \
        | sed -n 's#^/proc/\([0-9]*\)/environ$#\1#p' | grep -vx "$$" || true
}

do_stop() {
    pids=$(node_pids)
    [ -n "$pids" ] || { rm -f "$pidfile"; return 0; }
    # shellcheck disable=SC2086
    kill -TERM $pids 2>/dev/null || true
    i=0
    while [ -n "$(node_pids)" ] && [ $i -lt 100 ]; do  # up to 10 s for a clean shutdown
        sleep 0.1; i=$((i + 1))
    done
    pids=$(node_pids)
    if [ -n "$pids" ]; then
        # shellcheck disable=SC2086
        kill -KILL $pids 2>/dev/null || true
        i=0
        while [ -n "$(node_pids)" ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
    fi
    [ -z "$(node_pids)" ] || { echo "$0: could not stop containerd of $dir" >&2; return 1; }
    rm -f "$pidfile"
}

do_start() {
    if [ -n "$(node_pids)" ]; then
        echo "$0: containerd of $dir already running" >&2
        return 0
    fi
    # The bind-mount target must exist on the host.
    mkdir -p /etc/containerd
    rm -f "$pidfile"
    echo "=== regmirror harness: start $(date -u +%Y-%m-%dT%H:%M:%SZ) ===" >>"$log"
    REGMIRROR_HARNESS_NODE=$dir setsid "$launch" </dev/null >>"$log" 2>&1 &
    # launch.sh writes its own pid before exec'ing containerd (same pid all the way).
    i=0
    while [ ! -s "$pidfile" ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
    [ -s "$pidfile" ] || { echo "$0: launch.sh did not write $pidfile" >&2; return 1; }
}

case "$action" in
    start) do_start ;;
    stop) do_stop ;;
    restart) do_stop && do_start ;;
    status)
        if [ -n "$(node_pids)" ]; then echo running; else echo stopped; exit 3; fi ;;
    *) usage ;;
esac
