"""Speech for the avatar tests: espeak-ng phrases (Debian `espeak-ng`, installed by .ci/run) and int16 WAVs."""
from __future__ import annotations

import subprocess
import wave
from pathlib import Path

import numpy as np

from streamgen.audio import write_wav  # noqa: F401  (the tests' WAV writer)


def espeak(text: str, folder: Path) -> tuple[np.ndarray, int]:
    """One phrase spoken by espeak-ng (22,050 Hz mono int16)."""
    path = folder / "phrase.wav"
    subprocess.run(["espeak-ng", "-w", str(path), text], check=True, capture_output=True)
    with wave.open(str(path), "rb") as f:
        rate, data = f.getframerate(), np.frombuffer(f.readframes(f.getnframes()), np.int16)
    path.unlink()
    return data, rate
