"""torchrun whose rendezvous store listens on the loopback interface only: `python -m headline_bench.techniques.torchrun
--master-addr 127.0.0.1 --master-port P ...` takes torchrun's arguments (tensor_parallel.launch_command, one node).

Why: torchrun's static rendezvous starts a TCPStore server that listens on every interface whatever --master-addr says
(seen with `ss -ltnp`: *:P), so another machine could reach the store. Here that server is started first, on a socket
bound to --master-addr, and torchrun's own store (multi_tenant: one server per port in a process) uses it.
"""

from __future__ import annotations

import datetime
import socket
import sys


def main(argv: list[str]) -> None:
    import torch.distributed as dist
    from torch.distributed.run import main as torchrun

    addr, port = argv[argv.index("--master-addr") + 1], int(argv[argv.index("--master-port") + 1])
    listening = socket.create_server((addr, port), backlog=128).detach()  # the store's server owns the socket from here on
    store = dist.TCPStore(addr, port, 1, True, datetime.timedelta(minutes=10), wait_for_workers=False, multi_tenant=True,
                          master_listen_fd=listening)
    torchrun(argv)
    del store


if __name__ == "__main__":
    main(sys.argv[1:])
