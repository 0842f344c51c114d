"""Exit status and error messages of every ``timm-edl`` command.

One rule for all commands (``train``, ``eval``, ``certify``, ``export``, ``push``, ``convert``, ``demo``):

* ``0``: done.
* ``1``: a failure while running: a check failed (``eval --strict``), an upload or a file
  write failed, a training run stopped before its end (``stop_after_steps``), a demo step
  that did not reproduce; an unexpected exception also exits 1 (with its traceback).
* ``2``: a usage error: a bad flag (argparse's own errors), a bad ``KEY=VALUE``, a missing or
  invalid input the user gave (unknown model, a checkpoint that does not fit or is a
  pickle without ``--allow-pickle``, an unknown recipe key, a dataset not found, an output
  folder that is not empty).
* ``75``: stopped unfinished on purpose, its progress saved: ``certify --time-budget-min``
  reached a chunk boundary with points left (rerun the same command to continue; 75 is
  ``EX_TEMPFAIL`` of ``sysexits.h``, "try again later").
* ``130``: interrupted (``train --resume`` continues from the state a first Ctrl-C saved at the next
  optimizer step; ``eval`` resumes AutoAttack and ``certify`` its finished chunks when rerun).

Errors are one line on stderr, ``timm-edl <command>: error: <message>``, written by
:func:`fail`; :func:`run` calls a command's body and maps its exceptions to the status:
:func:`usage_errors` (``ValueError`` and the package's other input errors) -> 2;
:class:`CommandFailed` and the ``failures`` a command names -> 1.
"""
import sys
from typing import Callable, Optional, Tuple, Type

__all__ = ['EXIT_OK', 'EXIT_FAILED', 'EXIT_USAGE', 'EXIT_INCOMPLETE', 'EXIT_INTERRUPTED', 'UsageError', 'CommandFailed',
           'usage_errors', 'fail', 'run']

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INCOMPLETE, EXIT_INTERRUPTED = 0, 1, 2, 75, 130


class UsageError(ValueError):
    """A wrong input the user gave, found by the command itself (exit status 2)."""


class CommandFailed(RuntimeError):
    """A failure while running (exit status 1)."""


def usage_errors() -> Tuple[Type[BaseException], ...]:
    """The exceptions that mean "the input is wrong": ``ValueError`` (which the package's
    input errors derive from: ``ModelSpecError``, ``ConfigError``, ``KwargsError``, ...),
    plus the input errors with other bases and the files the user named that are missing
    or already there."""
    from ..data.errors import DatasetError
    from ..evaluation.errors import EvaluationError
    from ..hub.load import ArchitectureNotRegisteredError
    from ..models.edlnet import PretrainedWeightsUnavailable
    from ..weights import StateDictMismatchError
    return (ValueError, DatasetError, EvaluationError, ArchitectureNotRegisteredError, PretrainedWeightsUnavailable,
            StateDictMismatchError, FileNotFoundError, FileExistsError, NotADirectoryError)


def fail(command: Optional[str], message: object, code: int = EXIT_USAGE) -> int:
    """Print ``timm-edl <command>: error: <message>`` to stderr; returns ``code``."""
    prefix = f"timm-edl {command}" if command else 'timm-edl'
    print(f"{prefix}: error: {message}", file=sys.stderr)
    return code


def run(command: str, body: Callable[[], Optional[int]],
        failures: Tuple[Type[BaseException], ...] = ()) -> int:
    """``body()``'s exit status, with its usage errors (2) and failures (1) reported by :func:`fail`.
    ``failures``: the exceptions that mean a failed step of this command (e.g. ``OSError`` for
    an upload); anything else propagates with its traceback."""
    try:
        return int(body() or EXIT_OK)
    except usage_errors() as error:
        return fail(command, error, EXIT_USAGE)
    except (CommandFailed, *failures) as error:
        return fail(command, error, EXIT_FAILED)
