"""What every command-line entry point shares: quiet libraries, huge pages, one-line errors.

Each entry point defines its flags, then calls `cli.run(main)` under `if __name__ == "__main__"`,
so importing any module of the package defines no flags and never restarts the interpreter.
"""

import logging as std_logging
import os
import sys
from collections.abc import Callable

from absl import app, flags, logging

from vnet_jax.errors import UserError

_HUGE_PAGES_HELP = (
  "On Linux, restart the command once with glibc's malloc on transparent huge pages: XLA:CPU's "
  "per-step scratch memory then costs far fewer page faults (CPU steps 15-20% faster). "
  "Opt out with --nohuge_pages or GLIBC_TUNABLES=glibc.malloc.hugetlb=0. Never done under a "
  "debugger or profiler."
)


def _define_huge_pages_flag() -> None:
  if "huge_pages" not in flags.FLAGS:
    # Registered under the running program, so its --help lists it with the program's flags.
    flags.DEFINE_bool("huge_pages", True, _HUGE_PAGES_HELP, module_name=sys.argv[0])


def _orbax_noise(record: std_logging.LogRecord) -> bool:
  """False for Orbax's log records that repeat what the package reports itself: the traceback of
  a failed save (logged several times, then raised to the package, which reports it on one
  line), and the warning on each save without metrics (only evaluated steps have them)."""
  if f"{os.sep}orbax{os.sep}" not in record.pathname:
    return True
  return not (record.exc_info or "did not provide metrics" in str(record.msg))


def run(
  main: Callable[[list[str]], object],
  flags_parser: Callable | None = None,
  huge_pages: bool = True,
) -> None:
  """`absl.app.run(main)` with the package's conventions for a command-line entry point.

  - Library chatter (Orbax's and Grain's INFO lines, Orbax's repetitions of errors the package
    reports itself) is hidden unless --verbosity is given;
  - with `huge_pages` (for commands that run XLA) the command gets a --huge_pages flag, on by
    default, and restarts once on huge pages (see its --help);
  - a `UserError` is printed as `error: <one line>` on stderr, exit status 1, no traceback;
    Ctrl-C outside training's own handling is `error: interrupted`, exit status 130.
  """
  if huge_pages:
    _define_huge_pages_flag()

  def wrapped(argv: list[str]) -> object:
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)
      logging.get_absl_logger().addFilter(_orbax_noise)
    try:
      if huge_pages and flags.FLAGS.huge_pages:
        from vnet_jax import runtime  # imports JAX, which commands without XLA work don't need

        runtime.exec_with_huge_pages()
      return main(argv)
    except UserError as e:
      print(f"error: {e}", file=sys.stderr, flush=True)
      sys.exit(1)
    except KeyboardInterrupt:
      print("error: interrupted", file=sys.stderr, flush=True)
      sys.exit(130)

  if flags_parser is None:
    app.run(wrapped)
  else:
    app.run(wrapped, flags_parser=flags_parser)
