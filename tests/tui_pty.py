"""Run a command in a pseudo-terminal of a given size (a real terminal without tmux), for the TUI's tests."""

from __future__ import annotations

import fcntl
import os
import select
import struct
import subprocess
import termios
import time


def run_in_pty(argv: list[str], *, env: dict[str, str], size: tuple[int, int] = (80, 24), keys: list[tuple[bytes, bytes]] = (),
               timeout: float = 60.0) -> tuple[int | None, bytes]:
    """Start ``argv`` on a new pty (``size`` = columns, rows); for each ``(marker, key)`` of ``keys``, in order,
    send ``key`` once the output contains ``marker``. Returns (exit status, or None if it ran past
    ``timeout``; everything it wrote)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", size[1], size[0], 0, 0))
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True)
    os.close(slave)
    output = bytearray()
    start = time.monotonic()
    pending = list(keys)
    try:
        while time.monotonic() - start < timeout:
            if pending and pending[0][0] in output:
                time.sleep(0.3)  # the app reads keys once it is drawn; give it a moment past the marker
                os.write(master, pending.pop(0)[1])
            ready, _, _ = select.select([master], [], [], 0.05)
            if ready:
                try:
                    output += os.read(master, 65536)
                except OSError:  # EIO: every process on the terminal closed it (the child exited)
                    return proc.wait(timeout=max(1.0, timeout - (time.monotonic() - start))), bytes(output)
            elif proc.poll() is not None:
                return proc.returncode, bytes(output)
        return None, bytes(output)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
