"""Render outputs: frames → scaled → H.264 MP4 (PyAV), and the latents file (safetensors).

Both are written to a temporary file next to the target and renamed into place when complete, so a
failed or interrupted render leaves nothing behind (and never a truncated file under the real name).

Video: libx264, yuv420p (even sides), BT.709 tagged, constant quality CRF 18 by default (visually
lossless for generated content; `bitrate` switches to a capped average bitrate instead), preset
"medium", a keyframe every 2 s, `+faststart` (the index up front, so players start at once).
"""
from __future__ import annotations

import fractions
import os
import uuid
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


def check_mp4_name(path: str | Path) -> Path:
    """The video is always an MP4 (H.264): a name ending in another suffix would mislabel the file."""
    path = Path(path)
    if path.suffix.lower() != ".mp4":
        raise ValueError(f"{path}: the video is written as MP4 (H.264); name it *.mp4 "
                         f"(got suffix {path.suffix or '(none)'!r})")
    return path


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


# --- video -----------------------------------------------------------------------------------------
class Mp4Writer:
    """`write(frames uint8 [N, H, W, 3])` any number of times, then `close()` (renames into place);
    `abort()` (or an exception inside `with`) deletes the partial file. Frames are scaled to `size`
    (see `output_size`) with `scale_filter` on the first write."""

    def __init__(self, path: str | Path, fps: float, size: int | tuple[int, int] | None = None,
                 scale_filter: str = "auto", crf: int | None = DEFAULT_CRF, bitrate: int | None = None,
                 preset: str = DEFAULT_PRESET) -> None:
        if scale_filter not in SCALE_FILTERS:
            raise ValueError(f"unknown scale filter {scale_filter!r}; known: {', '.join(SCALE_FILTERS)}")
        if fps <= 0:
            raise ValueError(f"fps must be > 0, got {fps}")
        self.path = Path(path)
        self.rate = fractions.Fraction(fps).limit_denominator(1001)
        self.size_spec, self.scale_filter = size, scale_filter
        self.crf, self.bitrate, self.preset = (None if bitrate else crf), bitrate, preset
        self.size: tuple[int, int] | None = None
        self.filter: str | None = None
        self.frames = 0
        self._tmp: Path | None = None
        self._container: Any = None
        self._stream: Any = None

    def _open(self, width: int, height: int) -> None:
        import av

        self.size = output_size(width, height, self.size_spec)
        self.filter = choose_filter(self.scale_filter, (width, height), self.size)
        self._tmp = _temp_beside(self.path)
        self._container = av.open(str(self._tmp), "w", format="mp4", options={"movflags": "+faststart"})
        s = self._container.add_stream("libx264", rate=self.rate)
        s.width, s.height = self.size
        s.pix_fmt = "yuv420p"
        cc = s.codec_context
        cc.gop_size = max(1, round(KEYFRAME_S * float(self.rate)))
        cc.colorspace = cc.color_primaries = cc.color_trc = 1  # BT.709
        cc.color_range = 1  # limited ("tv"), what players assume
        options = {"preset": self.preset}
        if self.bitrate:
            cc.bit_rate = int(self.bitrate)
            options.update(maxrate=str(int(self.bitrate * 1.5)), bufsize=str(int(self.bitrate * 2)))
        else:
            options["crf"] = str(self.crf if self.crf is not None else DEFAULT_CRF)
        s.options = options
        self._stream = s

    def write(self, frames: Tensor | np.ndarray) -> None:
        import av
        import numpy as np
        import torch

        frames = torch.as_tensor(frames)
        if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[-1] != 3:
            raise ValueError(f"expected uint8 frames [N, H, W, 3], got {frames.dtype} {list(frames.shape)}")
        if self._stream is None:
            self._open(frames.shape[2], frames.shape[1])
        assert self.size is not None and self.filter is not None
        for image in scale_frames(frames, self.size, self.filter).numpy():
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            frame = frame.reformat(format="yuv420p", dst_colorspace="ITU709", interpolation="AREA")  # box chroma: no bleed
            frame.pts = self.frames
            self._container.mux(self._stream.encode(frame))
            self.frames += 1

    def close(self) -> Path:
        """Flush, finish the file and move it to `path`; returns `path`."""
        if self._container is None:
            raise ValueError(f"no frames were written to {self.path}")
        try:
            self._container.mux(self._stream.encode())
            self._container.close()
        except BaseException:
            self.abort()
            raise
        self._container = None
        assert self._tmp is not None
        os.replace(self._tmp, self.path)
        self._tmp = None
        return self.path

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

    def __enter__(self) -> Mp4Writer:
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
