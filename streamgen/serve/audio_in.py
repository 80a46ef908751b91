"""A viewer's microphone as an avatar session's audio: the client sends on the offer's audio section
(sendrecv, the avatar's audio comes back on it); aiortc decodes it (Opus: 48 kHz stereo `av.AudioFrame`s), which
are resampled to the model's rate by one filter kept for the whole track, averaged to mono, and pushed into
the session's audio buffer as they arrive (real time: the avatar speaks what the viewer says).

Audio that arrives in real time is taken by chunks that may start before all of theirs has arrived: the
missing part would be played as silence, cutting the speech. So, like a jitter buffer's prefill, MIC_LEAD_S of
silence is pushed ahead of the microphone's first samples (one chunk's audio, 187.5 ms at 16 fps, plus the
arrival jitter of 20 ms frames): the chunks find the microphone's audio waiting instead. The other way, while
the video holds (a chunk computed late) the microphone keeps coming and its lead grows; past MIC_MAX_LEAD_S
quiet frames (below QUIET_DBFS) are skipped until it is back, so the delay does not creep up over a
conversation and no speech is cut.

The microphone is the session's source only while no agent's WebSocket is (one source at a time); frames
that find another source, or a full buffer (a paused session stops taking audio), are dropped and counted.
"""
from __future__ import annotations

import logging

import numpy as np
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError

from ..errors import InputError
from .avatar import SessionAvatar
from .pcm import Resampler

log = logging.getLogger(__name__)

MIC_LEAD_S = 0.25
MIC_MAX_LEAD_S = 0.5
QUIET_DBFS = -50.0


async def receive(track: MediaStreamTrack, avatar: SessionAvatar, sid: str) -> None:
    """Feed the session's audio with the client's microphone until the track ends."""
    resampler = Resampler(avatar.audio.sample_rate)
    counts = avatar.microphone = dict.fromkeys(("frames", "refused", "skipped", "overflow"), 0)
    max_lead = round(MIC_MAX_LEAD_S * avatar.audio.sample_rate)
    try:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            counts["frames"] += 1
            samples = resampler(frame)
            if not avatar.holds(track):  # taking the source (first, or after an agent's socket let it go)
                if not avatar.claim(track, "microphone"):
                    counts["refused"] += 1
                    continue
                samples = np.concatenate([np.zeros(round(MIC_LEAD_S * avatar.audio.sample_rate), np.float32), samples])
            elif avatar.audio.held > max_lead and _quiet(samples):
                counts["skipped"] += 1
                continue
            try:
                avatar.audio.push(samples)
            except InputError as exc:  # AudioOverflowError: no chunk takes audio (paused)
                if not counts["overflow"]:
                    log.warning("session %s: microphone audio dropped: %s", sid, exc)
                counts["overflow"] += 1
    finally:
        avatar.release(track)
        log.info("session %s: microphone ended: %s", sid, counts)


def _quiet(samples: np.ndarray) -> bool:
    return not len(samples) or 10 * np.log10(float(np.mean(samples.astype(np.float64) ** 2)) + 1e-12) < QUIET_DBFS
