#!/usr/bin/python3
"""A desktop app's view of entrupy-tokend, in Python with Gio (PyGObject).

    /usr/bin/python3 examples/python_client.py [--session ID] [--listen SECONDS] [MIN_SECONDS]

1. asks IsAuthorizationValid,
2. calls EnsureValid(MIN_SECONDS) (default 60) and prints the expiry (never the token,
   only its length),
3. prints the session's signals (LoginSucceeded, LoginFailed, AuthorizationExpired,
   ReauthorizationRequired) for SECONDS (default 30) with a GLib main loop, then exits 0.

The bus is the session bus of $DBUS_SESSION_BUS_ADDRESS. The session defaults to
$ENTRUPY_SESSION, else "default"; the listening time to $ENTRUPY_LISTEN_SECONDS.
Any D-Bus error is printed on stderr with its short name (NotAuthorized, ...) and the
example exits 1; a usage error exits 2. Needs python3-gi (Debian/Ubuntu) or pygobject.
"""

import argparse
import datetime
import os
import signal
import sys
import time

from gi.repository import Gio, GLib

BUS_NAME = "com.entrupy.TokenDaemon1"
MANAGER_PATH = "/com/entrupy/TokenDaemon1"
MANAGER_IFACE = "com.entrupy.TokenDaemon1.Manager"
SESSION_IFACE = "com.entrupy.TokenDaemon1.Session"
ERROR_PREFIX = "com.entrupy.TokenDaemon1.Error."


def utc(t):
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def describe(err):
    """NotAuthorized: message, for an error of the daemon; the plain message otherwise."""
    name = Gio.DBusError.get_remote_error(err)
    if not name:
        return err.message
    message = err.message
    prefix = "GDBus.Error:%s: " % name
    if message.startswith(prefix):
        message = message[len(prefix):]
    short = name[len(ERROR_PREFIX):] if name.startswith(ERROR_PREFIX) else name
    return "%s: %s" % (short, message)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--session", default=os.environ.get("ENTRUPY_SESSION", "default"), metavar="ID")
    p.add_argument("--listen", type=int, default=int(os.environ.get("ENTRUPY_LISTEN_SECONDS", "30")),
                   metavar="SECONDS", help="how long to print signals")
    p.add_argument("min_seconds", type=int, nargs="?", default=60, metavar="MIN_SECONDS",
                   help="EnsureValid's minimum remaining validity")
    return p.parse_args()  # exits 2 on a usage error


def main():
    args = parse_args()
    step = "cannot connect to the session bus"
    try:
        # The session bus, from $DBUS_SESSION_BUS_ADDRESS.
        bus = Gio.bus_get_sync(Gio.BusType.SESSION, None)
        step = "GetSession"
        manager = Gio.DBusProxy.new_sync(bus, Gio.DBusProxyFlags.DO_NOT_LOAD_PROPERTIES, None,
                                         BUS_NAME, MANAGER_PATH, MANAGER_IFACE, None)
        (path,) = manager.call_sync("GetSession", GLib.Variant("(s)", (args.session,)),
                                    Gio.DBusCallFlags.NONE, -1, None).unpack()
        print("session %s: %s" % (args.session, path), flush=True)

        # The proxy subscribes to the object's signals as it is made, before the calls below,
        # so no signal is lost between them and the listening.
        step = "Session"
        session = Gio.DBusProxy.new_sync(bus, Gio.DBusProxyFlags.NONE, None,
                                         BUS_NAME, path, SESSION_IFACE, None)

        def on_signal(_proxy, _sender, name, params):
            if name == "LoginSucceeded":
                (exp,) = params.unpack()
                print("LoginSucceeded expires_at=%d (%s)" % (exp, utc(exp)), flush=True)
            elif name == "LoginFailed":
                code, desc = params.unpack()
                print("LoginFailed error_code=%s description=%s" % (code, desc), flush=True)
            elif name in ("AuthorizationExpired", "ReauthorizationRequired"):
                print(name, flush=True)

        session.connect("g-signal", on_signal)

        step = "IsAuthorizationValid"
        (valid,) = session.call_sync("IsAuthorizationValid", None, Gio.DBusCallFlags.NONE, -1, None).unpack()
        print("IsAuthorizationValid: %s" % ("true" if valid else "false"), flush=True)

        step = "EnsureValid"
        # Two out-arguments: the reply is the tuple (token, expires_at).
        (token, exp) = session.call_sync("EnsureValid", GLib.Variant("(u)", (args.min_seconds,)),
                                            Gio.DBusCallFlags.NONE, -1, None).unpack()
    except GLib.Error as e:
        print("python_client: %s: %s" % (step, describe(e)), file=sys.stderr)
        return 1
    # A real app hands the token to the Entrupy SDK; it is a secret, so it is not printed.
    print("EnsureValid(%d): token of %d bytes, expires_at %d (%s, in %d s)"
          % (args.min_seconds, len(token.encode()), exp, utc(exp), max(0, exp - int(time.time()))), flush=True)
    del token

    loop = GLib.MainLoop()
    GLib.timeout_add_seconds(args.listen, loop.quit)
    GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signal.SIGINT, loop.quit)
    print("listening for signals for %d s" % args.listen, flush=True)
    loop.run()
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
