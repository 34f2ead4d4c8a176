"""Exit statuses of the ``simcal`` command, one place for every subcommand.

0 done; 1 runtime failure (scheduler lost, storage unusable, the Kubernetes API refused);
2 bad config or arguments (also: the model fails alike for every seed at the probe); 3 a run
that completed no trial (every trial it ran failed) or that `stop_after_failures` stopped;
141 (128 + SIGPIPE) the reader of stdout went away, as ``simcal results | head``: quietly,
as Unix tools do; 130 (128 + SIGINT) Ctrl-C before a run's first trial (a run stopped by
Ctrl-C once running tells what finished and exits 0), 143 SIGTERM then.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_NO_TRIAL = 3
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE
EXIT_INTERRUPTED = 128 + signal.SIGINT


def quiet_on_broken_pipe(command: Callable[[], int]) -> int:
    """Run ``command``; if stdout's reader is gone, stop writing and exit without a traceback."""
    try:
        status = command()
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return status
    except BrokenPipeError:
        # Python flushes stdout again at exit: point it at /dev/null so that cannot fail.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
