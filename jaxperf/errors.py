"""Errors that are the user's to fix: bad flags, bad config, bad data.

The CLI prints them as one clear line and exits non-zero, without a traceback.
"""


class UserError(Exception):
  """Something the user gave us is wrong; the message says what and where."""


class ConfigError(UserError):
  """A config file, --set override or flag is invalid."""


class DataError(UserError):
  """A dataset on disk is missing, empty or malformed."""


class TrainingError(RuntimeError):
  """Training cannot go on (non-finite loss, failed checkpoint)."""
