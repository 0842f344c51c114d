"""The evaluation's user-facing error (its command line prints it without a traceback, exit 2)."""

__all__ = ['EvaluationError']


class EvaluationError(Exception):
    """An error the user can fix (bad option, unknown model, ...)."""
