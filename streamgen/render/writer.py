"""Render outputs: frames → scaled → H.264 (PyAV) into an MP4 file, an HLS playlist or an RTMP(S) URL,
with an AAC track beside them for audio-driven models, and the latents file (safetensors).

- MP4 (`out.mp4`) and the latents are written to a temporary file next to the target and renamed into
  place when complete, so a failed or interrupted render leaves nothing behind (never a truncated file
  under the real name).
- HLS (`out.m3u8`): MPEG-TS segments of KEYFRAME_S beside the playlist (`out_00000.ts` …), a VOD playlist;
  a failed render removes the playlist and its segments.
- RTMP (`rtmp://host/app/key`, `rtmps://…`): FLV pushed to the server in real time — frame n is sent no
  earlier than n / fps after the first (platforms ingest live streams, not bursts), with real timestamps.
HLS and RTMP are encoded without B-frames (`tune=zerolatency`): live players and ingest servers expect
decode order = presentation order, and no frame waits for a later one.

Video: libx264, yuv420p (even sides), BT.709 tagged, constant quality CRF 18 by default (visually
lossless for generated content; `bitrate` switches to a capped average bitrate instead), preset
"medium", a keyframe every 2 s, `+faststart` (the index up front, so players start at once).

Audio (`audio_rate` set): mono AAC-LC at 64 kb/s, sample k at k / rate, so the samples written with
frame n play beside frame n; the encoder's priming delay is undone by the MP4 edit list (players and
FFmpeg start the track at 0).
"""
from __future__ import annotations

import fractions
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..bundles.family import parse_size

if TYPE_CHECKING:  # torch, numpy and av are imported where used: the CLI parser imports this module
    import numpy as np
    from torch import Tensor

SCALE_FILTERS = ("auto", "nearest", "bilinear", "bicubic", "area")
PIXEL_ART_MAX_SIDE = 128  # frames this small (embedded / tiny models, latent previews) are pixel art
DEFAULT_CRF = 18
DEFAULT_PRESET = "medium"
KEYFRAME_S = 2.0
AAC_BITRATE = 64_000  # ample for mono speech at 16 kHz
X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow", "placebo")


# --- sizes and scaling -----------------------------------------------------------------------------
def parse_output_size(text: str) -> int | tuple[int, int]:
    """`render --size`: `parse_size`'s "N" (longer side N, even; the other side keeps the aspect, rounded to
    even) or "WxH" (exact; both even, as yuv420p needs). An odd size is refused, not silently rounded."""
    size = parse_size(text)
    if min((size,) if isinstance(size, int) else size) < 2:
        raise ValueError(f"a side must be at least 2 pixels, got {text!r}")
    if isinstance(size, int) and size % 2:
        raise ValueError(f"the longer side must be even (yuv420p), got {size}: use {size - 1} or {size + 1}")
    if isinstance(size, tuple) and (size[0] % 2 or size[1] % 2):
        raise ValueError(f"width and height must be even (yuv420p), got {size[0]}x{size[1]}")
    return size


def _even(x: float) -> int:
    return max(2, round(x / 2) * 2)


SMALL_FRAMES_SIDE = 256  # frames smaller than this are shown (and written, by default) at a whole multiple: the page's size


def output_size(width: int, height: int, size: int | tuple[int, int] | None) -> tuple[int, int]:
    """Output (width, height) for frames of width × height: by default native (rounded to even sides), or
    for small frames (the embedded model's 32×32) the whole multiple that reaches SMALL_FRAMES_SIDE,
    as the page shows them; longer side `size` keeping the aspect, or exactly `size` = (W, H)."""
    if size is None:
        k = max(1, SMALL_FRAMES_SIDE // max(width, height))
        return (width * k + width * k % 2, height * k + height * k % 2)
    if isinstance(size, tuple):
        return size
    scale = size / max(width, height)
    return (_even(width * scale), _even(height * scale))


def choose_filter(name: str, src: tuple[int, int], dst: tuple[int, int]) -> str:
    """`auto`: nearest for pixel art (small frames, or whole-number upscales, which it keeps exact),
    area when shrinking, bicubic when enlarging."""
    if name not in SCALE_FILTERS:
        raise ValueError(f"unknown scale filter {name!r}; known: {', '.join(SCALE_FILTERS)}")
    if name != "auto":
        return name
    (sw, sh), (dw, dh) = src, dst
    if max(sw, sh) <= PIXEL_ART_MAX_SIDE or (dw % sw == 0 and dh % sh == 0):
        return "nearest"
    return "area" if dw <= sw and dh <= sh else "bicubic"


def scale_frames(frames: Tensor, size: tuple[int, int], filter: str) -> Tensor:
    """uint8 [N, H, W, 3] → uint8 [N, size[1], size[0], 3] with a concrete filter."""
    import torch

    w, h = size
    if frames.shape[1:3] == (h, w):
        return frames
    x = frames.permute(0, 3, 1, 2)
    if filter == "nearest":  # integer indices: exact (a 4× upscale repeats each pixel 4×4)
        rows = torch.arange(h) * frames.shape[1] // h
        cols = torch.arange(w) * frames.shape[2] // w
        return frames[:, rows][:, :, cols]
    y = torch.nn.functional.interpolate(x.float(), size=(h, w), mode=filter,
                                        **({"align_corners": False, "antialias": True} if filter != "area" else {}))
    return y.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


# --- atomic files ----------------------------------------------------------------------------------
def _temp_beside(path: Path) -> Path:
    """A fresh hidden name next to `path` (same filesystem, so the final rename is atomic); the file is
    created by its writer, with the usual permissions (mkstemp would make it 0600)."""
    return path.parent / f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial"


@dataclass(frozen=True)
class Output:
    """Where the video goes: `kind` mp4 | hls | rtmp, `target` the file path or the URL."""

    kind: str
    target: str

    @property
    def path(self) -> Path:
        if self.kind == "rtmp":
            raise ValueError(f"{self.target} is a URL, not a file")
        return Path(self.target)

    @property
    def is_file(self) -> bool:
        return self.kind != "rtmp"


def parse_output(target: str | Path | Output) -> Output:
    """`out.mp4`, `out.m3u8` or `rtmp[s]://host/app/key`; anything else is refused naming the three."""
    if isinstance(target, Output):
        return target
    text = str(target)
    if text.lower().startswith(("rtmp://", "rtmps://")):
        from urllib.parse import urlsplit

        if not urlsplit(text).hostname:
            raise ValueError(f"{text}: an RTMP URL needs a host (rtmp://host/app/stream-key)")
        return Output("rtmp", text)
    suffix = Path(text).suffix.lower()
    if suffix in (".mp4", ".m3u8"):
        return Output("mp4" if suffix == ".mp4" else "hls", text)
    raise ValueError(f"{text}: the video is written as MP4 (*.mp4), HLS (*.m3u8) or pushed to rtmp://host/app/key "
                     f"(got suffix {Path(text).suffix or '(none)'!r})")


def check_writable(path: str | Path) -> Path:
    """Fail before rendering (ValueError) when `path` cannot be written: missing folder, a folder."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder, expected a file name")
    if not path.parent.exists():
        raise ValueError(f"cannot write {path}: folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK):
        raise ValueError(f"cannot write {path}: folder {path.parent} is not writable")
    return path


# --- audio -----------------------------------------------------------------------------------------
class AacTrack:
    """A mono AAC track of an open container: `write(samples)` places them right after the previous ones
    (pts = samples written so far, time base 1 / rate), so the track's timing is its sample count."""

    def __init__(self, container: Any, rate: int, bitrate: int = AAC_BITRATE) -> None:
        stream = container.add_stream("aac", rate=rate)
        stream.layout = "mono"
        stream.time_base = fractions.Fraction(1, rate)
        stream.bit_rate = bitrate
        self._container, self._stream, self.rate, self.samples = container, stream, rate, 0

    def write(self, samples: Tensor | np.ndarray) -> None:
        """Encode float samples [N] in [-1, 1]; packets are muxed as the encoder emits them (1,024 samples each)."""
        import av
        import numpy as np

        x = np.ascontiguousarray(np.asarray(samples, np.float32).reshape(1, -1))
        frame = av.AudioFrame.from_ndarray(x, format="flt", layout="mono")
        frame.sample_rate, frame.time_base, frame.pts = self.rate, self._stream.time_base, self.samples
        self._container.mux(self._stream.encode(frame))
        self.samples += x.shape[1]

    def flush(self) -> None:
        """The encoder's last, padded packet; the muxer records its real length, so the track ends with the video."""
        self._container.mux(self._stream.encode())


# --- video -----------------------------------------------------------------------------------------
class VideoWriter:
    """`write(frames uint8 [N, H, W, 3])` any number of times, then `close()` (an MP4 is renamed into place);
    `abort()` (or an exception inside `with`) deletes the partial output. Frames are scaled to `size`
    (see `output_size`) with `scale_filter` on the first write. `path` is an `Output` or its text.

    With `audio_rate` (Hz) the file gets an AAC track and every `write` takes the frames' audio too:
    exactly audio_rate / fps samples per frame, so the track never drifts from the video."""

    def __init__(self, path: str | Path, fps: float, size: int | tuple[int, int] | None = None,
                 scale_filter: str = "auto", crf: int | None = DEFAULT_CRF, bitrate: int | None = None,
                 preset: str = DEFAULT_PRESET, audio_rate: int | None = None) -> None:
        if scale_filter not in SCALE_FILTERS:
            raise ValueError(f"unknown scale filter {scale_filter!r}; known: {', '.join(SCALE_FILTERS)}")
        if fps <= 0:
            raise ValueError(f"fps must be > 0, got {fps}")
        self.output = parse_output(path)
        self.rate = fractions.Fraction(fps).limit_denominator(1001)
        self.audio_rate = audio_rate
        self.samples_per_frame = None if audio_rate is None else fractions.Fraction(audio_rate) / self.rate
        if self.samples_per_frame is not None and self.samples_per_frame.denominator != 1:
            raise ValueError(f"audio at {audio_rate} Hz is not a whole number of samples per frame at {fps:g} fps")
        self.size_spec, self.scale_filter = size, scale_filter
        self.crf, self.bitrate, self.preset = (None if bitrate else crf), bitrate, preset
        self.size: tuple[int, int] | None = None
        self.filter: str | None = None
        self.frames = 0
        self._tmp: Path | None = None
        self._container: Any = None
        self._stream: Any = None
        self._audio: AacTrack | None = None
        self._clock: float | None = None  # RTMP: wall time of frame 0

    @property
    def path(self) -> Path:
        return self.output.path

    def _open_container(self) -> Any:
        import av

        out = self.output
        if out.kind == "mp4":
            self._tmp = _temp_beside(out.path)
            return av.open(str(self._tmp), "w", format="mp4", options={"movflags": "+faststart"})
        if out.kind == "hls":
            return av.open(out.target, "w", format="hls", options={
                "hls_time": f"{KEYFRAME_S:g}", "hls_playlist_type": "vod", "hls_list_size": "0",
                "hls_segment_type": "mpegts", "hls_segment_filename": str(self._segment_pattern())})
        try:
            return av.open(out.target, "w", format="flv", timeout=(10.0, 10.0))
        except av.error.FFmpegError as exc:
            raise ValueError(f"cannot connect to {out.target}: {exc}") from None

    def _segment_pattern(self) -> Path:
        path = self.output.path
        return path.with_name(f"{path.stem}_%05d.ts")

    def _open(self, width: int, height: int) -> None:
        self.size = output_size(width, height, self.size_spec)
        self.filter = choose_filter(self.scale_filter, (width, height), self.size)
        self._container = self._open_container()
        s = self._container.add_stream("libx264", rate=self.rate)
        s.width, s.height = self.size
        s.pix_fmt = "yuv420p"
        cc = s.codec_context
        cc.gop_size = max(1, round(KEYFRAME_S * float(self.rate)))
        cc.colorspace = cc.color_primaries = cc.color_trc = 1  # BT.709
        cc.color_range = 1  # limited ("tv"), what players assume
        options = {"preset": self.preset}
        if self.output.kind != "mp4":
            options.update(tune="zerolatency", bf="0")  # live outputs: no B-frames, no look-ahead
        if self.bitrate:
            cc.bit_rate = int(self.bitrate)
            options.update(maxrate=str(int(self.bitrate * 1.5)), bufsize=str(int(self.bitrate * 2)))
        else:
            options["crf"] = str(self.crf if self.crf is not None else DEFAULT_CRF)
        s.options = options
        self._stream = s
        if self.audio_rate is not None:  # every stream is added before the first packet (the header)
            self._audio = AacTrack(self._container, self.audio_rate)

    def write(self, frames: Tensor | np.ndarray, audio: Tensor | np.ndarray | None = None) -> None:
        """Frames uint8 [N, H, W, 3]; with an audio track, `audio` = their N × samples_per_frame samples."""
        import av
        import numpy as np
        import torch

        frames = torch.as_tensor(frames)
        if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[-1] != 3:
            raise ValueError(f"expected uint8 frames [N, H, W, 3], got {frames.dtype} {list(frames.shape)}")
        self._check_audio(len(frames), audio)
        if self._stream is None:
            self._open(frames.shape[2], frames.shape[1])
        if self._audio is not None:
            self._audio.write(audio)
        assert self.size is not None and self.filter is not None
        for image in scale_frames(frames, self.size, self.filter).numpy():
            self._pace()
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            frame = frame.reformat(format="yuv420p", dst_colorspace="ITU709", interpolation="AREA")  # box chroma: no bleed
            frame.pts = self.frames
            self._container.mux(self._stream.encode(frame))
            self.frames += 1

    def _pace(self) -> None:
        """RTMP is live: frame n leaves no earlier than n / fps after frame 0 (files are written at once)."""
        if self.output.kind != "rtmp":
            return
        if self._clock is None:
            self._clock = time.monotonic()
        wait = self._clock + self.frames / float(self.rate) - time.monotonic()
        if wait > 0:
            time.sleep(wait)

    def _check_audio(self, frames: int, audio: Tensor | np.ndarray | None) -> None:
        """Audio exactly when the file has a track, and exactly the frames' share of it: a short or long
        write would shift every later sample against its frame."""
        if self.samples_per_frame is None:
            if audio is not None:
                raise ValueError("this MP4 has no audio track: open the writer with audio_rate")
            return
        expected = frames * int(self.samples_per_frame)
        got = None if audio is None else len(audio)
        if got != expected:
            raise ValueError(f"{frames} frames at {float(self.rate):g} fps take {expected} audio samples at "
                             f"{self.audio_rate} Hz, got {got if got is not None else 'none'}")

    def close(self) -> Path | str:
        """Flush, finish the output (an MP4 is moved to its name); returns the path, or the URL."""
        if self._container is None:
            raise ValueError(f"no frames were written to {self.output.target}")
        try:
            self._container.mux(self._stream.encode())
            if self._audio is not None:
                self._audio.flush()
            self._container.close()
        except BaseException:
            self.abort()
            raise
        self._container = None
        if self._tmp is not None:
            os.replace(self._tmp, self.output.path)
            self._tmp = None
        return self.output.path if self.output.is_file else self.output.target

    def abort(self) -> None:
        if self._container is not None:
            try:
                self._container.close()
            except Exception:
                pass
            self._container = None
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None
        if self.output.kind == "hls":
            self.output.path.unlink(missing_ok=True)
            for segment in self.output.path.parent.glob(f"{self.output.path.stem}_*.ts"):
                segment.unlink(missing_ok=True)

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


# --- latents ---------------------------------------------------------------------------------------
def save_latents(path: str | Path, latents: Tensor, metadata: dict[str, Any]) -> Path:
    """Write {"latents": [1, F, C, h, w]} with string metadata (non-strings as JSON), atomically."""
    import json

    from safetensors.torch import save

    path = Path(path)
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    data = save({"latents": latents.detach().cpu().contiguous()}, metadata=meta)  # bytes: save_file makes 0600 files
    tmp = _temp_beside(path)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def load_latents(path: str | Path) -> tuple[Tensor, dict[str, str]]:
    """(latents, metadata) of a `save_latents` file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor("latents"), dict(f.metadata() or {})
