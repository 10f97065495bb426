"""The ``p2pnode`` command line (click): one console script, one group of commands.

Exit codes: 0 success, 1 error, 2 usage error, 3 daemon not running, 4 not delivered within
``--timeout`` (see ``p2pnode --help``).
"""

from p2pnode.cli import local, remote, testnet
from p2pnode.cli.common import main

__all__ = ["local", "main", "remote", "testnet"]
