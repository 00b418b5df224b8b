"""The ``unmask`` command (and ``python -m unmask``): process-wide settings, then :mod:`unmask.cli`."""

import os
import sys


def wait_passively() -> None:
    """OpenMP threads that wait for work spin by default. On a machine where another process is busy, two
    spinning torch threads made a training step 2-3x slower than one thread; sleeping waits (PASSIVE) cost
    5-30 % on an idle machine (``benchmarks/threads.py``; docs/results/performance-peers.md, "Threads"). The
    command takes the safe side: PASSIVE, unless the user chose a policy or a spin count. OpenMP reads these
    once, when torch loads, so this is done before anything imports torch; a library user's process is left
    alone."""
    if "torch" not in sys.modules and not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & os.environ.keys():
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


def main() -> int:
    """The ``unmask`` command: set the OpenMP wait policy, then run :func:`unmask.cli.main`."""
    wait_passively()
    from .cli import main as run  # after the OpenMP setting: importing the command line loads torch

    return run()


if __name__ == "__main__":
    sys.exit(main())
