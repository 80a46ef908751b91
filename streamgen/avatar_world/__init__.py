"""The avatar world: a procedural talking face whose identity comes from a reference image and whose mouth
follows the loudness of the driving audio, with a non-learned checker (contract: docs/avatar_world.md)."""
from .checker import FrameReading, lag_and_correlation, read_frames, score_clip
from .clips import AvatarClip, make_clip, random_identity, sample_clip
from .drive import (DRIVE_DIM, FPS, SAMPLES_PER_FRAME, BlinkSchedule, babble, blink_schedule, drive_features, loudness_db,
                    mouth_openings, opening_for_db)
from .face import HEAD_SHAPES, MAX_OPENING, Identity, head_masks, identity_from_image, reference_frame, render_face

__all__ = [
    "DRIVE_DIM", "FPS", "HEAD_SHAPES", "MAX_OPENING", "SAMPLES_PER_FRAME", "AvatarClip", "BlinkSchedule", "FrameReading", "Identity",
    "babble", "blink_schedule", "drive_features", "head_masks", "identity_from_image", "lag_and_correlation",
    "loudness_db", "make_clip", "mouth_openings", "opening_for_db", "random_identity", "read_frames",
    "reference_frame", "render_face", "sample_clip", "score_clip",
]
