"""``sd_notify``: tell systemd we are ready, alive, busy with what, and stopping.

Uses the ``sdnotify`` package when it is installed, else the protocol directly (one
datagram to the unix socket in ``$NOTIFY_SOCKET``; ``@`` means the abstract namespace).
Without ``$NOTIFY_SOCKET`` (not under systemd) every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.address = env.get("NOTIFY_SOCKET") or None
        self._sock: socket.socket | None = None
        self._sdnotify = None
        self.watchdog_interval: float | None = None
        usec = env.get("WATCHDOG_USEC")
        pid = env.get("WATCHDOG_PID")
        if usec and (not pid or pid == str(os.getpid())):
            try:
                # Ping at half the timeout, as sd_watchdog_enabled(3) recommends.
                self.watchdog_interval = max(0.05, int(usec) / 2e6)
            except ValueError:
                log.warning("ignoring WATCHDOG_USEC=%r: not a number", usec)
        if self.address and environ is None:
            try:
                import sdnotify  # optional dependency

                self._sdnotify = sdnotify.SystemdNotifier()
            except ImportError:
                pass

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> bool:
        """Send ``fields`` (``"READY=1"``, ``"STATUS=..."``) as one message; False if not sent."""
        if not self.address:
            return False
        msg = "\n".join(fields)
        if self._sdnotify is not None and self._sdnotify.socket is not None:
            self._sdnotify.notify(msg)
            return True
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            addr = "\0" + self.address[1:] if self.address.startswith("@") else self.address
            self._sock.sendto(msg.encode(), addr)
            return True
        except OSError as exc:
            log.debug("sd_notify %r failed: %s", msg, exc)
            return False

    def ready(self, status: str | None = None) -> bool:
        return self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={text}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def reloading(self) -> bool:
        usec = int(time.clock_gettime(time.CLOCK_MONOTONIC) * 1e6)
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self, status: str | None = None) -> bool:
        return self.send("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
