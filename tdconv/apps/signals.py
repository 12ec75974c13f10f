"""SIGINT / SIGTERM as a flag that training checks at safe points, so that a stopped run has saved
its checkpoint first."""
from __future__ import annotations

import contextlib
import signal
import threading

__all__ = ["Interrupted", "stop_on_signals"]


class Interrupted(KeyboardInterrupt):
    """Training stopped by SIGINT / SIGTERM after saving its checkpoint (``.checkpoint``)."""

    def __init__(self, signum: int, checkpoint: str | None):
        super().__init__(f"stopped by signal {signum}; " +
                         (f"checkpoint saved to {checkpoint}" if checkpoint else "no checkpoint path was given"))
        self.signum = signum
        self.checkpoint = checkpoint


_SIGNAL_STATE = []


@contextlib.contextmanager
def stop_on_signals():
    """Turn SIGINT / SIGTERM into a flag (``state["signum"]``) that loops check at safe points (main
    thread only). Nested uses share the outermost flag, so a signal that arrives during the last step
    of :func:`tdconv.apps.train.fit` is still seen by the program around it."""
    if _SIGNAL_STATE:
        yield _SIGNAL_STATE[-1]
        return
    state = {"signum": 0}
    if not (hasattr(signal, "SIGTERM") and _in_main_thread()):
        yield state
        return

    def handler(signum, frame):
        if state["signum"]:  # a second signal: give up at once
            raise KeyboardInterrupt
        state["signum"] = signum

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    _SIGNAL_STATE.append(state)
    try:
        yield state
    finally:
        _SIGNAL_STATE.pop()
        for s, h in old.items():
            signal.signal(s, h)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()
