"""ExaBGP's API process for the ``exabgp`` announcer: ``python -m caplance.announcers.relay SOCKET``.

ExaBGP runs it and talks to it on stdin/stdout; it connects to the balancer's unix socket
``SOCKET`` and copies lines both ways: the balancer's commands to stdout (to ExaBGP), ExaBGP's
acknowledgements and events from stdin to the balancer. It ends when either side closes --
and ExaBGP, told to end with its API process, ends with it.
"""

from __future__ import annotations

import os
import selectors
import socket
import sys


def main(path: str) -> int:
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
                    return 0  # the balancer is gone
                sys.stdout.buffer.write(data)
                sys.stdout.buffer.flush()
            else:
                data = os.read(stdin, 65536)
                if not data:
                    return 0  # ExaBGP is gone
                connection.sendall(data)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
