"""UDP helper run inside testbed namespaces by the NAT tests (a script, not a test module).

  listen PORT TIMEOUT                 print {"from": [ip, port]} of the first datagram, or null
  send SRC_PORT DST DST_PORT          send one datagram from SRC_PORT
  punch SRC_PORT TIMEOUT DST PORT...  send from SRC_PORT to each DST PORT pair, then print every
                                      datagram received on that socket within TIMEOUT
"""

from __future__ import annotations

import json
import socket
import sys
import time


def _sock(port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    return s


def main(argv: list[str]) -> None:
    mode = argv[0]
    if mode == "listen":
        s = _sock(int(argv[1]))
        s.settimeout(float(argv[2]))
        print("ready", flush=True)
        try:
            _, peer = s.recvfrom(2048)
            print(json.dumps({"from": list(peer)}), flush=True)
        except socket.timeout:
            print("null", flush=True)
    elif mode == "send":
        _sock(int(argv[1])).sendto(b"hello", (argv[2], int(argv[3])))
    elif mode == "punch":
        s = _sock(int(argv[1]))
        deadline = time.monotonic() + float(argv[2])
        pairs = argv[3:]
        for i in range(0, len(pairs), 2):
            s.sendto(b"punch", (pairs[i], int(pairs[i + 1])))
        print("sent", flush=True)
        got = []
        while (left := deadline - time.monotonic()) > 0:
            s.settimeout(left)
            try:
                _, peer = s.recvfrom(2048)
                got.append(list(peer))
            except socket.timeout:
                break
        print(json.dumps(got), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
