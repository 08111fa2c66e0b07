"""The errors a user can cause and fix (a bad config value, a damaged or mismatched file, a busy
workdir), as opposed to bugs. The command lines print them as one line, `error: ...`, and exit 2
(`--verbose` or INSTRUCTRL_VERBOSE=1 shows the traceback); anything else keeps its traceback.

Each concrete error also derives from the builtin it used to be (ValueError, OSError, ...), so
code and tests that catch those still do.
"""

from __future__ import annotations

import os
import sys


class UserError(Exception):
  """An expected failure: the message says what is wrong, where, and what was expected."""


class ConfigError(UserError, ValueError):
  """A config value out of its range, of the wrong type, or inconsistent with another one."""


class MissingInput(UserError, FileNotFoundError):
  """A file or folder a command reads is not there (a stage not run yet, a mistyped path)."""


def one_line(error) -> str:
  text = " ".join(str(error).split())
  return f"error: {text or type(error).__name__}"


def verbose(argv=None) -> bool:
  argv = sys.argv if argv is None else argv
  return os.environ.get("INSTRUCTRL_VERBOSE", "") not in ("", "0") or any(
      a in ("--verbose", "--verbose=true", "--verbose=True", "--verbose=1") for a in argv)


def _parse_flags(argv):
  """absl's flag parsing, with its errors (an unknown preset, a bad --config.x value) as one `error:` line."""
  from absl import flags
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    if verbose(argv):
      raise
    message = str(e)
    if "Traceback (most recent call last)" in message:
      # config_flags wraps the config file's exception in its traceback: keep the flag and the last line.
      lines = [l.strip() for l in message.splitlines() if l.strip()]
      message = f"{lines[0].split(': Error whilst')[0]}: {lines[-1].split(': ', 1)[-1]}"
    sys.stderr.write(one_line(message) + " (flags: --helpfull)\n")
    sys.exit(2)


def run_app(main) -> None:
  """`absl.app.run(main)` for the command lines: a UserError (and a flag error) is one `error:` line and
  exit status 2, unless --verbose or INSTRUCTRL_VERBOSE=1 asks for the traceback; any other exception
  keeps its traceback."""
  from absl import app
  try:
    app.run(main, flags_parser=_parse_flags)
  except UserError as e:
    if verbose():
      raise
    sys.stderr.write(one_line(e) + "\n")
    sys.exit(2)
