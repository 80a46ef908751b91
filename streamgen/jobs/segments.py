"""A job's output as committed segments: video joined at the end without re-encoding, latents concatenated.

A segment is a pair of files with one stem (`seg_000120`: its first video frame): the video of its
chunks (`.mp4`) and their latents (`.latents.safetensors`), so a checkpoint never rewrites what earlier
segments hold — its cost does not grow with the render's length. Each video is its own H.264 MP4 (`render.writer.VideoWriter`: written to a temporary name, renamed
when complete), so it starts with an IDR frame and no frame refers across a boundary: a closed GOP.
A segment is committed (both files renamed into place, fsynced) before the checkpoint that covers
it, so after a crash every segment the checkpoint lists is whole, and any other file is work after
the checkpoint, deleted on resume. `join` remuxes the packets (PyAV, pts/dts shifted by
each segment's start) into one `+faststart` MP4.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..render.writer import VideoWriter, load_latents, save_latents

VIDEO, LATENTS = ".mp4", ".latents.safetensors"


def segment_stem(first_frame: int) -> str:
    return f"seg_{first_frame:06d}"


def drop_uncommitted(folder: Path, committed: list[str]) -> None:
    """Delete partial files and the segments a checkpoint does not list (work done after it)."""
    keep = set(committed)
    for path in folder.glob("*seg_*"):
        if path.name.startswith(".") or path.name.split(".")[0] not in keep:
            path.unlink(missing_ok=True)


def joined_latents(folder: Path, stems: list[str]) -> torch.Tensor:
    """Every committed segment's latents, in order: [1, F, C, h, w]."""
    return torch.cat([load_latents(folder / f"{stem}{LATENTS}")[0] for stem in stems], dim=1)


def join(segments: list[Path], out: Path) -> int:
    """Concatenate closed-GOP MP4 segments of one size and rate into `out` (atomically); returns the frames."""
    import av

    tmp = out.with_name(f".{out.name}.partial")
    frames = 0
    try:
        with av.open(str(tmp), "w", format="mp4", options={"movflags": "+faststart"}) as dst:
            ostream = None
            offset = 0  # in the output stream's time base
            for path in segments:
                with av.open(str(path)) as src:
                    istream = src.streams.video[0]
                    if ostream is None:
                        ostream = dst.add_stream_from_template(istream)
                    end = offset
                    for packet in src.demux(istream):
                        if packet.dts is None:
                            continue  # the demuxer's flush packet
                        packet.stream = ostream
                        packet.pts += offset
                        packet.dts += offset
                        end = max(end, packet.pts + packet.duration)
                        dst.mux(packet)
                        frames += 1
                    offset = end
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return frames


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


class SegmentWriter:
    """Chunks in (frames + latents), one segment per `commit()`; the open segment is discarded by `abort()`."""

    def __init__(self, folder: Path, fps: float, size, crf: int | None, preset: str, first_frame: int) -> None:
        self.folder, self.fps, self.size, self.crf, self.preset = folder, fps, size, crf, preset
        self.first_frame = first_frame  # of the open segment
        self.frames = 0  # in the open segment
        self._writer: VideoWriter | None = None
        self._latents: list[torch.Tensor] = []

    def write(self, frames: torch.Tensor, latents: torch.Tensor) -> None:
        if self._writer is None:
            self._writer = VideoWriter(self.folder / f"{segment_stem(self.first_frame)}{VIDEO}", self.fps, self.size, "auto",
                                     self.crf, None, self.preset)
        self._writer.write(frames)
        self._latents.append(latents.detach().cpu())
        self.frames += len(frames)

    def commit(self) -> str | None:
        """Close the open segment (both files renamed into place and fsynced: durable before the checkpoint
        that lists it); its stem, or None when it had no frames."""
        if self._writer is None:
            return None
        stem = segment_stem(self.first_frame)
        _fsync(save_latents(self.folder / f"{stem}{LATENTS}", torch.cat(self._latents, dim=1), {}))
        _fsync(self._writer.close())
        self._writer, self._latents = None, []
        self.first_frame += self.frames
        self.frames = 0
        return stem

    def abort(self) -> None:
        self._latents = []
        if self._writer is not None:
            self._writer.abort()
            self._writer = None
