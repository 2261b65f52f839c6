#!/usr/bin/env bash
# A desktop app's view of entrupy-tokend, from the shell with busctl (calls) and gdbus
# monitor (signals; busctl monitor when gdbus is not installed).
#
#   examples/shell_client.sh [--session ID] [--listen SECONDS] [MIN_SECONDS]
#
# 1. asks IsAuthorizationValid,
# 2. calls EnsureValid(MIN_SECONDS) (default 60) and prints the expiry (never the token, only
#    its length),
# 3. prints the session's signals (LoginSucceeded, LoginFailed, AuthorizationExpired,
#    ReauthorizationRequired) for SECONDS (default 30), bounded with timeout(1), then exits 0.
#
# The bus is the session bus of $DBUS_SESSION_BUS_ADDRESS (else $XDG_RUNTIME_DIR/bus). The
# session defaults to $ENTRUPY_SESSION, else "default"; the listening time to
# $ENTRUPY_LISTEN_SECONDS. ENTRUPY_MONITOR=busctl forces busctl monitor. A failed call prints
# busctl's message on stderr and exits 1; a usage error exits 2.
set -euo pipefail

NAME=com.entrupy.TokenDaemon1
MANAGER_PATH=/com/entrupy/TokenDaemon1
MANAGER_IFACE=com.entrupy.TokenDaemon1.Manager
SESSION_IFACE=com.entrupy.TokenDaemon1.Session

session=${ENTRUPY_SESSION:-default}
listen=${ENTRUPY_LISTEN_SECONDS:-30}
min_seconds=60

usage() {
    echo "usage: $0 [--session ID] [--listen SECONDS] [MIN_SECONDS]" >&2
    exit 2
}
is_number() { [[ $1 =~ ^[0-9]+$ ]]; }

while (($#)); do
    case $1 in
        --session) (($# >= 2)) || usage; session=$2; shift 2 ;;
        --listen) (($# >= 2)) && is_number "$2" || usage; listen=$2; shift 2 ;;
        -h | --help) usage ;;
        -*) echo "$0: unknown option $1" >&2; usage ;;
        *) is_number "$1" || usage; min_seconds=$1; shift ;;
    esac
done
is_number "$listen" || usage

die() {
    echo "shell_client: $*" >&2
    exit 1
}
command -v busctl >/dev/null || die "busctl (systemd) is needed"

# busctl --user talks to $DBUS_SESSION_BUS_ADDRESS when it is set.
call() {
    local what=$1
    shift
    busctl --user call "$NAME" "$@" || die "$what failed"
}

utc() { date -u -d "@$1" +%Y-%m-%dT%H:%M:%SZ; }

# GetSession → `o "/com/entrupy/TokenDaemon1/session/default"`
out=$(call GetSession "$MANAGER_PATH" "$MANAGER_IFACE" GetSession s "$session")
path=${out#o \"}
path=${path%\"}
echo "session $session: $path"

# IsAuthorizationValid → `b true`
out=$(call IsAuthorizationValid "$path" "$SESSION_IFACE" IsAuthorizationValid)
echo "IsAuthorizationValid: ${out#b }"

# EnsureValid → two out-arguments: `st "TOKEN" 1700000000`. A real app hands the token to the
# Entrupy SDK; it is a secret, so only its length is printed.
out=$(call EnsureValid "$path" "$SESSION_IFACE" EnsureValid u "$min_seconds")
expires_at=${out##* }
token=${out#st \"}
token=${token%\" *}
now=$(date +%s)
echo "EnsureValid($min_seconds): token of ${#token} bytes, expires_at $expires_at ($(utc "$expires_at"), in $((expires_at > now ? expires_at - now : 0)) s)"
unset token out

# Prints one line per signal of the session, read from the monitor's output on stdin.
print_signals() {
    local line exp rest
    while IFS= read -r line; do
        case $line in
            # gdbus monitor, once it has subscribed and looked up the owner:
            *"is owned by"*) echo "listening for signals for $listen s" ;;
            # gdbus: `PATH: com.entrupy.TokenDaemon1.Session.LoginSucceeded (uint64 1700000000,)`
            # busctl --json=short: `{..."member":"LoginSucceeded","payload":{"type":"t","data":[1700000000]}}`
            *".Session.LoginSucceeded "* | *'"member":"LoginSucceeded"'*)
                exp=${line##*uint64 }
                exp=${exp##*\"data\":[}
                exp=${exp%%[,\]]*}
                echo "LoginSucceeded expires_at=$exp ($(utc "$exp"))"
                ;;
            *".Session.LoginFailed "* | *'"member":"LoginFailed"'*)
                rest=${line#*LoginFailed }
                rest=${rest#*\"data\":}
                echo "LoginFailed $rest"
                ;;
            *".Session.AuthorizationExpired "* | *'"member":"AuthorizationExpired"'*) echo "AuthorizationExpired" ;;
            *".Session.ReauthorizationRequired "* | *'"member":"ReauthorizationRequired"'*) echo "ReauthorizationRequired" ;;
        esac
    done
}

monitor=${ENTRUPY_MONITOR:-auto}
if [[ $monitor == auto ]]; then
    if command -v gdbus >/dev/null; then monitor=gdbus; else monitor=busctl; fi
fi
rc=0
case $monitor in
    gdbus)
        # gdbus monitor follows the name's owner and prints each signal on one line.
        timeout "$listen" gdbus monitor --session --dest "$NAME" --object-path "$path" | print_signals || rc=$?
        ;;
    busctl)
        # busctl monitor (BecomeMonitor) says "Monitoring bus message stream." on stderr once
        # it is subscribed.
        errfile=$(mktemp)
        trap 'rm -f "$errfile"' EXIT
        {
            for _ in $(seq 100); do
                grep -q Monitoring "$errfile" 2>/dev/null && break
                sleep 0.05
            done
            echo "listening for signals for $listen s"
        } &
        timeout "$listen" busctl --user monitor --json=short \
            --match "type='signal',sender='$NAME',path='$path',interface='$SESSION_IFACE'" 2>"$errfile" |
            print_signals || rc=$?
        wait
        ;;
    *) die "ENTRUPY_MONITOR must be gdbus, busctl or auto" ;;
esac
# timeout(1) exits 124 when the listening time is over: that is the normal end.
((rc == 0 || rc == 124)) || die "the monitor failed (exit $rc)"
echo "done"
