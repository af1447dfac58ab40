"""Atomic file writes: a reader (or a later run) sees the old file or the complete new one.

A write that fails (full disk, no permission, read-only filesystem) raises a one-line
`WriteError` naming the file and the reason, and leaves the old file as it was.
"""

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vnet_jax.errors import WriteError, one_line


@contextlib.contextmanager
def reporting_write_errors(path: str | Path) -> Iterator[None]:
  """Turns an OSError raised inside into a WriteError naming `path` and the reason."""
  try:
    yield
  except WriteError:
    raise
  except OSError as e:
    raise WriteError(f"{path}: cannot write ({e.strerror or one_line(e)})") from e


@contextlib.contextmanager
def replacing(path: str | Path, suffix: str = "") -> Iterator[Path]:
  """Yields a hidden temporary path beside `path`, ending in `suffix` (writers choose the format
  by it); once the block has written it, it is synced and renamed over `path`. Readers see the
  old file or the complete new one, never half of one nor the temporary one (hidden files are
  skipped as cases). On failure the temporary file is removed; an OSError becomes a WriteError
  naming `path`. Created by a plain open, not mkstemp's owner-only mode: outputs are shared."""
  path = Path(path)
  stem = path.name[: len(path.name) - len(suffix)]
  tmp = path.with_name(f".{stem}.{os.getpid()}.tmp{suffix}")
  with reporting_write_errors(path):
    try:
      path.parent.mkdir(parents=True, exist_ok=True)
      yield tmp
      with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
      os.replace(tmp, path)
    finally:
      with contextlib.suppress(OSError):
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
  """Writes `text` to `path` through `replacing`."""
  with replacing(path) as tmp:
    tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | Path, obj: Any, indent: int = 2) -> None:
  write_text_atomic(path, json.dumps(obj, indent=indent) + "\n")
