"""Preemption: a stop signal (SIGTERM from ``kill`` or SLURM at the time limit, SIGUSR1/2 from SLURM's
``--signal`` warning, SIGINT from Ctrl-C) only raises a flag while training runs; the Trainer reads it once
per optimizer step, saves, and raises :class:`TrainingInterrupted`."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

PREEMPTION_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2") if hasattr(signal, name)
)


class TrainingInterrupted(Exception):
    """``fit()`` stopped on a stop signal after saving its state; resume from ``checkpoint``.

    ``exit_code`` is the conventional status of a process ended by the signal (143 SIGTERM, 130 SIGINT).
    """

    def __init__(self, signum: int, checkpoint: Path | None, message: str) -> None:
        super().__init__(message)
        self.signum = signum
        self.checkpoint = checkpoint
        self.exit_code = 128 + signum


class PreemptionSignals:
    """While :meth:`installed`, stop signals set :attr:`received` instead of ending the process.

    A second SIGINT raises KeyboardInterrupt at once, a second SIGTERM kills; a signal the process was told
    to ignore (nohup, a background job) stays ignored.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        """The first stop signal received (None: none); set by the handler at any moment."""
        self._previous: dict[int, Any] = {}

    @contextlib.contextmanager
    def installed(self, enabled: bool = True) -> Iterator[None]:
        """Handle the stop signals while the block runs (only in the main thread, and only if ``enabled``)."""
        self.received = None
        if not enabled or threading.current_thread() is not threading.main_thread():
            yield
            return
        # torchrun forwards the terminal's Ctrl-C, so each worker gets it twice within milliseconds.
        debounce_s = 2.0 if "TORCHELASTIC_RUN_ID" in os.environ else 0.0
        first = {"time": 0.0}

        def handler(signum: int, frame: Any) -> None:
            if self.received is not None:
                if signum == self.received and time.monotonic() - first["time"] < debounce_s:
                    return
                if signum == signal.SIGINT:
                    raise KeyboardInterrupt
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
            first["time"] = time.monotonic()
            self.received = signum

        handled = [sig for sig in PREEMPTION_SIGNALS if signal.getsignal(sig) is not signal.SIG_IGN]
        self._previous = {sig: signal.signal(sig, handler) for sig in handled}
        try:
            yield
        finally:
            for sig, old in self._previous.items():
                signal.signal(sig, old)
            self._previous = {}

    def hand_over(self, signum: int) -> None:
        """Run the handler another tool installed for ``signum`` before training started (e.g. submitit's,
        which requeues a SLURM job); called after the state is saved."""
        previous = self._previous.get(signum)
        if callable(previous) and previous is not signal.default_int_handler:
            previous(signum, None)
