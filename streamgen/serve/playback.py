"""The playback lifecycle of pushed audio (LiveKit's avatar contract, spec avatar.md §6): utterances
("segments") of an agent's audio, and when each one has been shown.

Positions are samples in the session's pushed audio (see `audio_buffer.py`). A segment opens at its first
push and ends at a `flush`; once the frames sent to the viewer have shown audio up to its end, it is
finished: `playback_finished` with its whole length and `interrupted: false`. A `clear` interrupts every
segment not finished (the open one and those flushed but not yet shown): `interrupted: true`, with the
position shown of each. A flush without audio since the previous one is a segment of length 0.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .protocol import PlaybackFinished


@dataclass
class Segment:
    start: int
    end: int | None = None  # set by the flush


class Playback:
    def __init__(self, sample_rate: int) -> None:
        self.sample_rate = sample_rate
        self.open: Segment | None = None
        self.flushed: deque[Segment] = deque()  # ended, not yet shown, oldest first

    def pushed(self, start: int) -> None:
        """Audio was pushed from `start` on: it opens a segment unless one is open."""
        if self.open is None:
            self.open = Segment(start)

    def flush(self, position: int, shown: int) -> list[PlaybackFinished]:
        """End the open segment at `position` (all pushed so far); returns what is finished already."""
        segment, self.open = self.open or Segment(position), None
        segment.end = position
        self.flushed.append(segment)
        return self.played(shown)

    def played(self, shown: int) -> list[PlaybackFinished]:
        """Audio up to `shown` has been shown: the flushed segments it finished."""
        done = []
        while self.flushed and shown >= self.flushed[0].end:
            done.append(self._finished(self.flushed.popleft(), shown, False))
        return done

    def interrupt(self, position: int, shown: int) -> list[PlaybackFinished]:
        """A clear (or the session's end) after `position` samples were pushed: every segment not finished,
        at the position shown."""
        if self.open is not None:
            self.open.end = position
            self.flushed.append(self.open)
            self.open = None
        segments, self.flushed = list(self.flushed), deque()
        return [self._finished(s, shown, True) for s in segments]

    def _finished(self, segment: Segment, shown: int, interrupted: bool) -> PlaybackFinished:
        assert segment.end is not None
        played = min(max(shown - segment.start, 0), segment.end - segment.start)
        return PlaybackFinished(position=round(played / self.sample_rate, 4), interrupted=interrupted)
