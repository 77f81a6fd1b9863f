"""Wall-clock deadlines and stop requests of long runs (``--stop_at``, SIGTERM/SIGINT).

A run that must end by a given time (a session, a lease, a queue slot) stops at a
point it can resume from exactly: training after a step (checkpointed there),
evaluation and certification before a chunk that would not end in time.  Nothing
here is installed at import; :meth:`StopRequest.catch_signals` is called by an
entry point's ``main``.
"""
from __future__ import annotations

import datetime
import signal
import sys
import time


def parse(stop_at: str) -> float:
  """``--stop_at`` (ISO 8601; without a UTC offset: local time) as seconds since
  the epoch."""
  try:
    return datetime.datetime.fromisoformat(stop_at).timestamp()
  except (TypeError, ValueError):
    raise ValueError(f"stop_at must be an ISO 8601 time such as 2026-12-04T12:05 or "
                     f"2026-12-04T12:05+00:00, got {stop_at!r}") from None


def seconds_left(stop_at: str) -> float:
  """Seconds until ``stop_at`` (negative once it has passed)."""
  return parse(stop_at) - time.time()


def fits(stop_at: str, expected_seconds: float | None, what: str) -> bool:
  """Whether ``what`` (e.g. "chunk 3 of SETTING"), expected to take
  ``expected_seconds`` (None: never timed, then it starts while the deadline is
  ahead), ends before ``stop_at``; says why not on stderr."""
  left = seconds_left(stop_at)
  if left > (expected_seconds or 0.0):
    return True
  print(f"--stop_at {stop_at}: {what} not started ({left / 60:.1f} min left, a chunk "
        f"here has taken up to {(expected_seconds or 0.0) / 60:.1f} min)", file=sys.stderr)
  return False


class StopRequest:
  """``stop()`` is True once the deadline has passed or a stop signal arrived.

  Args:
    stop_at: ISO 8601 deadline (:func:`parse`), or None for none.
  """

  def __init__(self, stop_at: str | None = None):
    self.deadline = None if stop_at is None else parse(stop_at)
    self.signal: int | None = None  # the signal that asked to stop, if any

  def catch_signals(self, signals=(signal.SIGTERM, signal.SIGINT)) -> None:
    """The first of ``signals`` asks the run to stop at its next resumable point;
    a second one acts as it would have without this (SIGINT: KeyboardInterrupt)."""

    def handler(signum, frame):  # pylint: disable=unused-argument
      if self.signal is not None:  # asked twice: do not wait for the step
        for s in signals:
          signal.signal(s, signal.SIG_DFL if s != signal.SIGINT else signal.default_int_handler)
        signal.raise_signal(signum)
        return
      self.signal = signum
      print(f"{signal.Signals(signum).name}: stopping at the next point the run resumes "
            "from exactly (send it again to stop at once)", file=sys.stderr, flush=True)

    for s in signals:
      signal.signal(s, handler)

  def reason(self) -> str | None:
    """Why the run should stop now (a sentence), or None to go on."""
    if self.signal is not None:
      return f"{signal.Signals(self.signal).name} received"
    if self.deadline is not None and time.time() >= self.deadline:
      stamp = datetime.datetime.fromtimestamp(self.deadline).astimezone().isoformat(
          timespec="seconds")
      return f"--stop_at {stamp} reached"
    return None

  def __call__(self) -> bool:
    return self.reason() is not None

  def exit_status(self) -> int:
    """0 after a deadline (the stop asked for), 128 + signal after a signal (so
    that a calling script stops too)."""
    return 0 if self.signal is None else 128 + self.signal
