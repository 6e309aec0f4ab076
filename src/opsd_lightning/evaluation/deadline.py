"""A call under a wall-clock deadline: its result, or False once the deadline has passed.

Grading runs untrusted answers through sympy, whose pure-Python work can take unbounded time.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from typing import Any


class _GradingTimeout(BaseException):
    """Raised by the alarm handler; a BaseException so that library `except Exception` cannot swallow it."""


def call_with_deadline(function: Callable[[], bool], timeout_s: float) -> bool:
    """`function()` or False once `timeout_s` seconds have passed.

    In the main thread a one-shot `SIGALRM` timer interrupts pure-Python work (the previous handler is
    restored, and a timer armed before is re-armed with what was left of it). Signals are main-thread
    only, so elsewhere the work runs in a daemon thread that is abandoned, still running, at the
    deadline; `sympy_guards.safe_for_sympy` keeps the known unbounded cases (huge integers, which also
    hold the GIL) from ever starting.
    """
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer"):
        return _call_with_alarm(function, timeout_s)
    outcome: list[bool] = []

    def run() -> None:
        try:
            outcome.append(function())
        except BaseException:  # noqa: B036 - a daemon thread must not die noisily on bad input
            outcome.append(False)

    worker = threading.Thread(target=run, name="opsd-grading", daemon=True)
    worker.start()
    worker.join(timeout_s)
    return bool(outcome and outcome[0])


def _call_with_alarm(function: Callable[[], bool], timeout_s: float) -> bool:
    """`function()` under a one-shot real-time timer; the handler disarms itself so it fires at most once."""
    armed = [True]

    def on_alarm(signum: int, frame: Any) -> None:
        if armed[0]:
            armed[0] = False
            raise _GradingTimeout

    started = time.monotonic()
    previous_delay, previous_interval = 0.0, 0.0
    previous_handler = signal.signal(signal.SIGALRM, on_alarm)
    try:
        previous_delay, previous_interval = signal.setitimer(signal.ITIMER_REAL, timeout_s)
        try:
            return function()
        finally:
            armed[0] = False
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _GradingTimeout:
        return False
    finally:
        # None: a handler installed from C, which cannot be reinstated; ours stays, disarmed and inert.
        if previous_handler is not None:
            signal.signal(signal.SIGALRM, previous_handler)
        if previous_delay > 0:
            left = max(previous_delay - (time.monotonic() - started), 1e-3)
            signal.setitimer(signal.ITIMER_REAL, left, previous_interval)
