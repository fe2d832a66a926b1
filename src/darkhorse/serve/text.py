"""Text-side helpers of the server: stop strings cut out of streaming text."""

from __future__ import annotations

from collections.abc import Sequence


class StopText:
    """Streaming text cut at the first stop string; what could still be the start of one is held back
    until the next piece shows it is not (the stop string itself is never sent)."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [stop for stop in stops if stop]
        self.pending = ""
        self.stopped = False

    def push(self, piece: str) -> str:
        """The text that is now safe to send."""
        if self.stopped:
            return ""
        self.pending += piece
        cuts = [at for at in (self.pending.find(stop) for stop in self.stops) if at >= 0]
        if cuts:
            sent, self.pending, self.stopped = self.pending[: min(cuts)], "", True
            return sent
        hold = max((self._held(stop) for stop in self.stops), default=0)
        sent = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(sent) :]
        return sent

    def _held(self, stop: str) -> int:
        """Length of the longest end of the pending text that begins `stop`."""
        for length in range(min(len(stop) - 1, len(self.pending)), 0, -1):
            if self.pending.endswith(stop[:length]):
                return length
        return 0

    def flush(self) -> str:
        """What is left once the reply ended without a stop string."""
        sent, self.pending = self.pending, ""
        return sent
