"""The errors a user can act on: every command-line entry point prints them as one line.

Raise one of these (never a bare exception) for bad input, a stopped run or a missing
checkpoint; the message names the file or setting and the reason, and `cli.run` prints
`error: <message>` and exits with status 1, without a traceback.
"""

import sys


class UserError(Exception):
  """Base of the one-line errors the command-line entry points report."""


class DataError(UserError, ValueError):
  """A problem with the user's data or paths, naming the file and the reason."""


class ConfigError(UserError, ValueError):
  """An experiment-config setting that cannot work, naming the field."""


class CheckpointError(UserError, RuntimeError):
  """A checkpoint that is missing or cannot be restored."""


class TrainingError(UserError, RuntimeError):
  """Training cannot go on (e.g. a non-finite loss)."""


class WriteError(UserError, OSError):
  """An output (checkpoint, metrics, report, ...) that could not be written: a full disk, no
  permission. Whatever was written before it is left as it was."""


def one_line(e: BaseException, limit: int = 200) -> str:
  """An exception's message on one line, at most `limit` characters (its type if empty)."""
  text = " ".join(str(e).split()) or type(e).__name__
  return text if len(text) <= limit else text[: limit - 3] + "..."


def warn(message: str) -> None:
  """A one-line warning on stderr: something went wrong and the run copes with it."""
  print(f"warning: {message}", file=sys.stderr, flush=True)
