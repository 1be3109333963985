"""ExaBGP's API process for the ``exabgp`` announcer: ``python -m caplance.announcers.relay SOCKET``.

ExaBGP runs it and talks to it on stdin/stdout; it connects to the balancer's unix socket
``SOCKET`` and copies lines both ways: the balancer's commands to stdout (to ExaBGP), ExaBGP's
acknowledgements and events from stdin to the balancer. It ends when either side closes,
and then stops ExaBGP (its parent, with SIGTERM: ExaBGP closes its sessions and the routers
drop the routes at once). ExaBGP 5 itself keeps running, and announcing, when its API
process ends -- a killed balancer would leave its routes behind.
"""

from __future__ import annotations

import os
import selectors
import signal
import socket
import sys


def main(path: str) -> int:
    exabgp = os.getppid()
    try:
        relay(path)
    except OSError as exc:  # the balancer's socket refused or broke
        print(f"caplance relay: {exc}", file=sys.stderr)
    if os.getppid() == exabgp != 1:  # still ExaBGP's child (not adopted by init)
        os.kill(exabgp, signal.SIGTERM)
    return 0


def relay(path: str) -> None:
    """Copy lines until the balancer or ExaBGP closes."""
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    connection.connect(path)
    watch = selectors.DefaultSelector()
    stdin = sys.stdin.buffer.fileno()
    watch.register(connection, selectors.EVENT_READ)
    watch.register(stdin, selectors.EVENT_READ)
    while True:
        for key, _ in watch.select():
            if key.fileobj is connection:
                data = connection.recv(65536)
                if not data:
                    return  # the balancer is gone
                sys.stdout.buffer.write(data)
                sys.stdout.buffer.flush()
            else:
                data = os.read(stdin, 65536)
                if not data:
                    return  # ExaBGP is gone
                connection.sendall(data)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
