"""The errors a user can cause and fix (a bad config value, a damaged or mismatched file, a busy
workdir), as opposed to bugs. The command lines print them as one line, `error: ...`, and exit 2
(`--verbose` or INSTRUCTRL_VERBOSE=1 shows the traceback); anything else keeps its traceback.

Each concrete error also derives from the builtin it used to be (ValueError, OSError, ...), so
code and tests that catch those still do.
"""


class UserError(Exception):
  """An expected failure: the message says what is wrong, where, and what was expected."""


class ConfigError(UserError, ValueError):
  """A config value out of its range, of the wrong type, or inconsistent with another one."""
