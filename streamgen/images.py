"""Still pictures in (PNG, JPEG, …): a reference picture from a file or a data URL, decoded by PyAV
(FFmpeg's decoders: nothing else to install), with limits that hold before anything is decoded."""
from __future__ import annotations

import base64
import binascii
import io
import re
from pathlib import Path

import numpy as np

from .errors import InputError

MAX_IMAGE_BYTES = 4 * 1024 * 1024  # an encoded picture
MAX_IMAGE_PIXELS = 4096 * 4096
DATA_URL = re.compile(r"^data:image/(png|jpeg|jpg|webp|bmp);base64,", re.IGNORECASE)


def decode_image(data: bytes, what: str = "picture") -> np.ndarray:
    """Encoded picture bytes → uint8 [H, W, 3] (RGB); a clear InputError for anything else."""
    import av

    if len(data) > MAX_IMAGE_BYTES:
        raise InputError(f"the {what} is {len(data) / 1e6:.1f} MB, over the {MAX_IMAGE_BYTES / 1e6:.0f} MB limit")
    if not data:
        raise InputError(f"the {what} is empty")
    try:
        with av.open(io.BytesIO(data), "r") as container:
            stream = container.streams.video[0]
            if (stream.width or 0) * (stream.height or 0) > MAX_IMAGE_PIXELS:
                raise InputError(f"the {what} is {stream.width}×{stream.height} px, over the {MAX_IMAGE_PIXELS:,}-pixel limit")
            frame = next(container.decode(stream))
            return frame.to_ndarray(format="rgb24")
    except InputError:
        raise
    except (av.error.FFmpegError, IndexError, StopIteration, ValueError) as e:
        raise InputError(f"the {what} could not be decoded as an image (PNG or JPEG): {type(e).__name__}") from None


def read_image(path: str | Path) -> np.ndarray:
    """A picture file → uint8 [H, W, 3]."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"picture file {path} does not exist")
    if path.stat().st_size > MAX_IMAGE_BYTES:
        raise InputError(f"picture file {path} is over the {MAX_IMAGE_BYTES / 1e6:.0f} MB limit")
    return decode_image(path.read_bytes(), f"picture {path.name}")


def image_from_data_url(url: str, what: str = "reference") -> np.ndarray:
    """A `data:image/png;base64,…` (or jpeg) URL → uint8 [H, W, 3]; the length is checked before decoding."""
    if not isinstance(url, str) or not DATA_URL.match(url):
        raise InputError(f"the {what} must be a data URL of a PNG or JPEG picture (data:image/png;base64,…)")
    payload = url[url.index(",") + 1:]
    if len(payload) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise InputError(f"the {what} is over the {MAX_IMAGE_BYTES / 1e6:.0f} MB limit")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(f"the {what} data URL is not valid base64") from None
    return decode_image(data, what)


DEFAULT_REFERENCE = "a white disc on black (the embedded avatar reads it as a white round face)"


def default_reference(size: int = 128) -> np.ndarray:
    """The reference picture an avatar gets when none is given: a white disc (radius 0.4·size) on black,
    uint8 [size, size, 3]."""
    c = np.arange(size) + 0.5 - size / 2
    disc = (c[:, None] ** 2 + c[None, :] ** 2) <= (0.4 * size) ** 2
    return np.repeat(disc[..., None], 3, axis=2).astype(np.uint8) * 255


def encode_png(image: np.ndarray) -> bytes:
    """uint8 [H, W, 3] → PNG bytes (tests, the client's reference upload)."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="image2pipe") as out:
        stream = out.add_stream("png", rate=1)
        stream.width, stream.height, stream.pix_fmt = image.shape[1], image.shape[0], "rgb24"
        for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")):
            out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()
