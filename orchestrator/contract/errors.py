"""One exception hierarchy for errors a user can fix.

The CLI prints any :class:`MLAError` as one message without a traceback and exits non-zero;
set ``MLA_TRACEBACK=1`` to see the traceback as well.
"""

from __future__ import annotations


class MLAError(Exception):
    """Base class of every user-facing error (bad config, bad data, impossible layout...)."""

    exit_code = 2


class ConfigError(MLAError):
    """The job configuration (YAML or ``--set``) is invalid."""


class DataError(MLAError):
    """The training data is missing, empty or malformed."""


class PlanError(MLAError):
    """No parallel layout satisfies the request, or a pinned layout is impossible."""


class ClusterError(MLAError):
    """The Ray cluster (or Kubernetes API) cannot be reached or refused the request."""


class JobFailedError(MLAError):
    """A training job ran and failed; the message carries the cause."""

    exit_code = 1


class CheckpointError(MLAError):
    """A checkpoint, run folder or export is missing, incomplete or unreadable."""
