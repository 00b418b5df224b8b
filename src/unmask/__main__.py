"""The ``unmask`` command (and ``python -m unmask``): process-wide settings, then :mod:`unmask.cli`."""

import os
import sys


def set_wait_policy(argv: list[str]) -> None:
    """How OpenMP threads wait for work, decided by the command unless the user chose a policy or a spin count.
    Spinning (OpenMP's default) made a training step 2-3x slower than one thread on a machine where another
    process is busy, while sleeping waits (PASSIVE) cost 5-30 % on an idle machine (``benchmarks/threads.py``;
    docs/results/performance-peers.md, "Threads"): commands take the safe side, PASSIVE. ``unmask serve`` keeps
    OpenMP's default (spin a while, then sleep): a server is latency bound and its decoding runs many small
    kernels, where sleeping waits made a request of the quickstart model 1.8x slower (0.149 against 0.084 s of
    decoding), and unlike ACTIVE the default lets an idle server's threads sleep (docs/guides/serving.md,
    "Threads"). OpenMP reads these once, when torch loads, so this is done before anything imports torch; a
    library user's process is left alone."""
    command = next((a for a in argv if not a.startswith("-")), None)
    if "torch" not in sys.modules and not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & os.environ.keys() and \
            command != "serve":
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


def main() -> int:
    """The ``unmask`` command: set the OpenMP wait policy, then run :func:`unmask.cli.main`."""
    set_wait_policy(sys.argv[1:])
    from .cli import main as run  # after the OpenMP setting: importing the command line loads torch

    return run()


if __name__ == "__main__":
    sys.exit(main())
