"""The avatar world's contract (docs/avatar_world.md): geometry, the mouth rule, drive features, blinks,
the reference path, and a checker that reads rendered frames exactly and measures lag."""
from __future__ import annotations

import numpy as np
import pytest

from streamgen.avatar_world import (DRIVE_DIM, FPS, HEAD_SHAPES, MAX_OPENING, SAMPLES_PER_FRAME, Identity, babble,
                                    blink_schedule, drive_features, head_masks, identity_from_image, lag_and_correlation,
                                    loudness_db, make_clip, mouth_openings, opening_for_db, read_frames, reference_frame,
                                    render_face, sample_clip, score_clip)
from streamgen.avatar_world.drive import OPEN_DB


def tone(db: float, frames: int, hz: float = 220.0) -> np.ndarray:
    t = np.arange(frames * SAMPLES_PER_FRAME) / 16000
    return (np.sqrt(2) * 10 ** (db / 20) * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def test_the_clock_is_16_fps_and_1000_samples_per_frame() -> None:
    assert FPS >= 16 and SAMPLES_PER_FRAME * FPS == 16000


def test_head_shapes_are_distinct_and_hold_the_eyes_and_mouth() -> None:
    masks = head_masks()
    for a in HEAD_SHAPES:
        for b in HEAD_SHAPES:
            if a < b:
                assert (masks[a] & masks[b]).sum() / (masks[a] | masks[b]).sum() < 0.9
    for shape in HEAD_SHAPES:
        frame = render_face(Identity((1.0, 1.0, 1.0), shape), MAX_OPENING, True)
        reading = read_frames(frame[None])[0]
        assert reading.opening == MAX_OPENING and reading.eyes_open and reading.shape == shape


def test_the_mouth_follows_loudness_and_is_closed_in_silence() -> None:
    assert opening_for_db(np.array([-90.0, OPEN_DB - 0.1, OPEN_DB, OPEN_DB + 6, 0.0])).tolist() == [0, 0, 1, 2, MAX_OPENING]
    assert mouth_openings(np.zeros(4 * SAMPLES_PER_FRAME)).tolist() == [0, 0, 0, 0]
    levels = loudness_db(tone(-20.0, 3))
    assert np.allclose(levels, -20.0, atol=0.2)
    assert mouth_openings(tone(-23.0, 3)).tolist() == [4, 4, 4]  # −23 dB: four 6-dB levels above −44


def test_drive_features_are_per_frame_and_causal() -> None:
    audio = babble(3, 2.0)
    blinks = blink_schedule(5, 32)
    whole = drive_features(audio, blinks)
    assert whole.shape == (32, DRIVE_DIM) and whole.dtype == np.float32
    parts = np.concatenate([drive_features(audio[i * 3000:(i + 1) * 3000], blinks[i * 3:(i + 1) * 3], 3)
                            for i in range(10)])
    assert np.array_equal(parts, whole[:30])
    changed = audio.copy()
    changed[20 * SAMPLES_PER_FRAME:] = 0.5
    assert np.array_equal(drive_features(changed, blinks)[:20], whole[:20])
    assert np.array_equal(whole[:, -1], blinks.astype(np.float32))


def test_blinks_come_from_the_seed_and_never_stop() -> None:
    closed = blink_schedule(7, 16 * 60)
    assert np.array_equal(blink_schedule(7, 100, start=400), closed[400:500])
    assert not np.array_equal(blink_schedule(8, 16 * 60), closed)
    starts = np.flatnonzero(closed[1:] & ~closed[:-1]) + 1
    gaps = np.diff(starts) / FPS
    assert len(starts) >= 10 and gaps.min() >= 2.0 and gaps.max() <= 5.0 + 3 / FPS


def test_a_picture_of_a_disc_becomes_a_round_face_of_its_colour() -> None:
    yy, xx = np.mgrid[:240, :320]
    disc = np.zeros((240, 320, 3), np.uint8)
    disc[(yy - 120) ** 2 + (xx - 160) ** 2 <= 90 ** 2] = (30, 200, 60)
    identity = identity_from_image(disc)
    assert identity.shape == "round" and np.allclose(identity.colour, np.array([30, 200, 60]) / 255, atol=0.01)
    square = np.zeros((64, 80, 3), np.uint8)
    square[8:56, 16:64] = (0, 0, 120)
    dark = identity_from_image(square)
    assert dark.shape == "square" and max(dark.colour) == pytest.approx(0.5)  # brightened to MIN_BRIGHTNESS
    for shape in HEAD_SHAPES:
        ref = (reference_frame(Identity((0.9, 0.4, 0.2), shape)).transpose(1, 2, 0) * 255).round().astype(np.uint8)
        assert identity_from_image(ref).shape == shape
    with pytest.raises(ValueError, match="black"):
        identity_from_image(np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        identity_from_image(np.zeros((32, 32), np.uint8))


def test_the_checker_reads_ground_truth_exactly_and_finds_a_shift() -> None:
    clip = sample_clip(11, 160)
    frames = (clip.frames * 255).round().astype(np.uint8).transpose(0, 2, 3, 1)
    scores = score_clip(frames, clip.samples, clip.identity, clip.blinks)
    assert scores["lipsync_corr"] == pytest.approx(1.0) and scores["lag_frames"] == 0
    assert scores["identity"] == 1.0 and scores["eyes_match"] == 1.0 and scores["opening_mae"] == 0.0
    assert scores["mouth_speech"] > 1.0 and scores["mouth_silence"] == 0.0
    late = np.concatenate([frames[:2], frames[:-2]])
    assert score_clip(late, clip.samples, clip.identity)["lag_frames"] == 2
    frozen = np.repeat(frames[:1], len(frames), axis=0)
    assert score_clip(frozen, clip.samples, clip.identity)["lipsync_corr"] == 0.0
    other = make_clip(Identity((0.2, 0.2, 1.0), "oval"), clip.samples, clip.blinks)
    assert score_clip(other.frames, clip.samples, clip.identity)["identity"] == 0.0


def test_lag_sign_and_correlation() -> None:
    target = np.sin(np.arange(100) / 3.0)
    assert lag_and_correlation(np.roll(target, 3), target)[0] == 3
    assert lag_and_correlation(np.roll(target, -2), target)[0] == -2
