"""Errors cxflax raises for bad input, so that callers (and users) can tell them from bugs."""


class CxflaxError(Exception):
  """Base class: something the user gave cxflax is wrong, and the message says what."""


class ConfigError(CxflaxError, ValueError):
  """A config value is missing, unknown or out of range."""


class DataError(CxflaxError, ValueError):
  """A dataset file, row or image is missing, unreadable or out of range."""


class CheckpointError(CxflaxError, ValueError):
  """A checkpoint is missing or does not fit the model and config being run."""


class DivergenceError(CxflaxError, FloatingPointError):
  """Training produced a non-finite loss, gradient, updated state or prediction."""


class WorkdirError(CxflaxError, OSError):
  """The workdir, or a file or checkpoint in it, cannot be created or written (a read-only or full
  disk), or another run holds it."""


class Interrupted(KeyboardInterrupt):
  """Ctrl-C stopped a training run after it saved a checkpoint (the command exits with 130, as
  interrupted commands do, where a preempted one exits with 0)."""
