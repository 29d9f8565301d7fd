"""Free loopback ports for the servers the tests start (moto, the proxy, chromedriver...)."""

import pathlib
import random
import socket



def _below_ephemeral():
    """12,000 ports just below the kernel's ephemeral range (where outgoing connections get
    their ports: 32768 and up by default), so that no outgoing connection, of this test or
    another process, takes one between the check here and the bind of the server it is for."""
    try:
        low = int(pathlib.Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return (max(1024, low - 12000), max(1025, low))


PORT_RANGE = _below_ephemeral()
# Never the same port twice in a run.
_handed_out = set()


def free_port():
    """A loopback port (TCP and UDP) nobody holds now, below the ephemeral range."""
    for _ in range(200):
        port = random.randrange(*PORT_RANGE)
        if port in _handed_out:
            continue
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp, \
                    socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                tcp.bind(("127.0.0.1", port))
                udp.bind(("127.0.0.1", port))
        except OSError:
            continue
        _handed_out.add(port)
        return port
    raise AssertionError(f"no free loopback port in {PORT_RANGE} after 200 tries")
