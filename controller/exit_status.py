"""The exit statuses of ``streamsaga watch`` and ``submit --watch``, and their help text.

A module of its own so that building the CLI's parser imports neither aiohttp nor rich.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """How ``streamsaga watch`` (and ``submit --watch``) ends."""

    COMPLETED = 0
    ERROR = 1  # the API is unreachable, the workflow unknown, a stream refused
    USAGE = 2
    COMPENSATED = 3
    FAILED = 4
    NEEDS_ATTENTION = 5
    TIMEOUT = 6
    INTERRUPTED = 130  # Ctrl-C or SIGTERM before the outcome


EXIT_STATUS_HELP = """\
exit status:
  0    the workflow completed
  1    error: the API cannot be reached, no such workflow, a stream was refused
  2    usage error
  3    the workflow was compensated
  4    the workflow failed (there was nothing to undo)
  5    the workflow needs attention (a compensation ran out of retries); with
       --until-terminal, watch instead waits through an operator's retry for
       completed, compensated or failed
  6    --timeout passed before the outcome
  130  interrupted (Ctrl-C or SIGTERM)"""
ALL_EXIT_STATUS_HELP = """\
watch --all runs until interrupted or --timeout passes, and exits 0 (1 if the
API cannot be used)."""
