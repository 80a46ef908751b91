"""The procedural world: vocabulary and prompt grammar, rendering, motion, clips and training batches."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from streamgen.world import (COLOURS, DIRECTIONS, FPS, FRAME_SIZE, GRID, NULL_TOKEN, PALETTE, SHAPES, SPEED_PX,
                             TOKEN_SIZE, VOCAB, VOCAB_SIZE, Prompt, WorldState, all_prompts, make_clip, parse_prompt,
                             prompt_from_tokens, prompt_tokens, render, render_stream, sample_batch, sample_clips,
                             shape_masks, step)
from streamgen.world.render import local_shape_masks


# ---------------------------------------------------------------------------------------------- constants, vocab

def test_constants():
    assert (FRAME_SIZE, TOKEN_SIZE, GRID, SPEED_PX, FPS) == (32, 4, 8, 4, 8)
    assert SPEED_PX == TOKEN_SIZE  # whole-token motion


def test_vocab_layout_and_tokens():
    assert VOCAB[NULL_TOKEN] == "<null>" and NULL_TOKEN == 0
    assert VOCAB_SIZE == len(VOCAB) == 1 + len(COLOURS) + len(SHAPES) + len(DIRECTIONS) == 15
    assert len(set(VOCAB)) == VOCAB_SIZE
    assert prompt_tokens(Prompt("red", "circle", "left")) == [VOCAB.index("red"), VOCAB.index("circle"), VOCAB.index("left")]
    seen = set()
    for p in all_prompts():
        ids = prompt_tokens(p)
        assert len(ids) == 3 and NULL_TOKEN not in ids
        assert [VOCAB[i] for i in ids] == [p.colour, p.shape, p.direction]
        assert prompt_from_tokens(ids) == p == Prompt.from_tokens(ids)
        assert p.tokens() == ids
        seen.add(tuple(ids))
    assert len(seen) == 7 * 3 * 4
    assert prompt_tokens("blue ball up") == prompt_tokens(Prompt("blue", "circle", "up"))
    with pytest.raises(ValueError):
        prompt_from_tokens([VOCAB.index("circle"), VOCAB.index("red"), VOCAB.index("left")])  # wrong slots
    with pytest.raises(ValueError):
        prompt_from_tokens([0, 8, 11])
    with pytest.raises(ValueError):
        prompt_from_tokens([1, 8])


def test_prompt_validation_and_text():
    assert Prompt() == Prompt("white", "circle", "right")
    assert Prompt("red", "circle", "left").text() == "a red circle moving left"
    assert str(Prompt("cyan", "triangle", "up")) == "a cyan triangle moving up"
    with pytest.raises(ValueError):
        Prompt("purple", "circle", "left")
    with pytest.raises(ValueError):
        Prompt("red", "hexagon", "left")
    with pytest.raises(ValueError):
        Prompt("red", "circle", "sideways")
    assert Prompt().replace(colour="blue") == Prompt("blue", "circle", "right")
    with pytest.raises(TypeError):
        Prompt().replace(size="big")
    for p in all_prompts():
        parsed = parse_prompt(p.text())
        assert parsed.prompt == p and parsed.unknown_words == () and parsed.defaulted == ()


# ---------------------------------------------------------------------------------------------- parsing

@pytest.mark.parametrize("text", [
    "a red circle moving left", "A RED CIRCLE MOVING LEFT", "Red Circle Left", "the red circle is going to the left",
    "left red circle", "circle, moving left; red!", "  red   circle\tleft\n", "an red circle heading towards left",
    "red ball moving left",
])
def test_parse_case_articles_order_fillers(text):
    parsed = parse_prompt(text)
    assert parsed.prompt == Prompt("red", "circle", "left"), text
    assert parsed.unknown_words == () and parsed.defaulted == () and parsed.overridden == ()


def test_parse_unknown_words_reported_and_ignored():
    parsed = parse_prompt("A big red box moving quickly up, big BIG 3d")
    assert parsed.prompt == Prompt("red", "square", "up")
    assert parsed.unknown_words == ("big", "quickly", "3d")  # lower-cased, unique, first-appearance order


def test_parse_defaults():
    assert parse_prompt("").prompt == Prompt("white", "circle", "right")
    assert parse_prompt("").defaulted == ("colour", "shape", "direction")
    p = parse_prompt("the blue one")
    assert p.prompt == Prompt("blue", "circle", "right") and p.defaulted == ("shape", "direction")
    assert p.unknown_words == ("one",)
    p = parse_prompt("triangle going down")
    assert p.prompt == Prompt("white", "triangle", "down") and p.defaulted == ("colour",)
    assert parse_prompt("moving").prompt == Prompt()


def test_parse_last_mention_wins():
    p = parse_prompt("red blue square up left")
    assert p.prompt == Prompt("blue", "square", "left")
    assert p.overridden == ("red", "up")
    assert parse_prompt("red red circle").overridden == ()


# ---------------------------------------------------------------------------------------------- rendering

def test_shapes_fit_their_box_and_are_distinct():
    local = local_shape_masks()
    assert local.shape == (3, 12, 12)
    areas = dict(zip(SHAPES, local.sum((1, 2)).tolist()))
    assert areas == {"circle": 112, "square": 144, "triangle": 84}
    circle, square, triangle = local
    for m in (circle, square):
        assert (m == m[::-1]).all() and (m == m[:, ::-1]).all() and (m == m.T).all()
    assert (triangle == triangle[:, ::-1]).all() and not (triangle == triangle[::-1]).all()
    assert triangle[-1].all() and triangle[0].sum() == 2  # base at the bottom, apex up
    for m in local:  # every row and column of the 12×12 box is used: the box is tight
        assert m.any(0).all() and m.any(1).all()


@pytest.mark.parametrize("shape", SHAPES)
def test_render_is_exact_and_token_aligned(shape):
    for colour in COLOURS:
        for row, col in [(0, 0), (3, 5), (7, 7), (0, 7), (7, 0)]:
            state = WorldState(Prompt(colour, shape, "left"), row, col)
            f = render(state)
            assert f.shape == (3, FRAME_SIZE, FRAME_SIZE) and f.dtype == np.float32
            fg = f.max(0) > 0
            rgb = f.reshape(3, -1).T
            assert set(np.unique(f).tolist()) <= {0.0, 1.0}
            assert (rgb[fg.reshape(-1)] == np.array(PALETTE[colour], np.float32)).all()  # exact colour
            assert (rgb[~fg.reshape(-1)] == 0).all()                                        # black background
            assert fg.sum() == local_shape_masks()[SHAPES.index(shape)].sum()
            # the object lies in the 3×3 tokens around its token (wrapped); circle and square touch all 9
            tokens = fg.reshape(GRID, TOKEN_SIZE, GRID, TOKEN_SIZE).any((1, 3))
            expect = np.zeros((GRID, GRID), bool)
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    expect[(row + dr) % GRID, (col + dc) % GRID] = True
            assert not (tokens & ~expect).any()
            assert (tokens == expect).all() or shape == "triangle"
            assert tokens[row, col] and tokens[(row + 1) % GRID].sum() == 3  # centre token, full bottom row
            u8 = render(state, dtype=np.uint8)
            assert u8.dtype == np.uint8 and (u8 == (f * 255).astype(np.uint8)).all()


def test_shape_masks_are_pre_rendered_shifts():
    m = shape_masks()
    assert m.shape == (3, GRID, GRID, FRAME_SIZE, FRAME_SIZE) and not m.flags.writeable
    for s in range(3):
        for r in range(GRID):
            for c in range(GRID):
                assert (m[s, r, c] == np.roll(m[s, 0, 0], (4 * r, 4 * c), (0, 1))).all()


def test_world_state_validation():
    with pytest.raises(ValueError):
        WorldState(Prompt(), 8, 0)
    with pytest.raises(ValueError):
        WorldState(Prompt(), 0, -1)
    with pytest.raises(TypeError):
        WorldState("a red circle", 0, 0)


@pytest.mark.parametrize("direction,delta", [("left", (0, -1)), ("right", (0, 1)), ("up", (-1, 0)), ("down", (1, 0))])
def test_step_moves_one_token_with_wrap(direction, delta):
    for row in range(GRID):
        for col in range(GRID):
            s = WorldState(Prompt("green", "triangle", direction), row, col)
            n = step(s)
            assert (n.row, n.col) == ((row + delta[0]) % GRID, (col + delta[1]) % GRID)
            assert n.prompt == s.prompt
            # one step = a 4-px torus shift of the frame
            assert (render(n) == np.roll(render(s), (4 * delta[0], 4 * delta[1]), (1, 2))).all()
    s = WorldState(Prompt(direction=direction), 2, 5)
    x = s
    for _ in range(GRID):
        x = step(x)
    assert x == s  # a full lap of the torus


def test_step_switches_prompt_first():
    s = WorldState(Prompt("red", "circle", "left"), 4, 4)
    n = step(s, Prompt("blue", "square", "down"))
    assert n == WorldState(Prompt("blue", "square", "down"), 5, 4)


# ---------------------------------------------------------------------------------------------- clips

def test_make_clip_motion_and_switch_semantics():
    rng = np.random.default_rng(123)
    n_switch = 0
    for _ in range(200):
        clip = make_clip(rng, 12, 0.5)
        frames, prompts, s = clip
        assert frames.shape == (12, 3, 32, 32) and len(prompts) == 12
        if s is None:
            assert all(p == prompts[0] for p in prompts)
        else:
            n_switch += 1
            assert 1 <= s <= 11
            assert all(p == prompts[0] for p in prompts[:s]) and all(p == prompts[s] for p in prompts[s:])
            assert prompts[s] != prompts[s - 1]
        # every frame = previous frame's object moved one token in the direction in force, re-rendered
        for t in range(1, 12):
            dr, dc = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}[prompts[t].direction]
            prev_mask = frames[t - 1].max(0) > 0
            moved = np.roll(prev_mask, (4 * dr, 4 * dc), (0, 1))
            if prompts[t].shape == prompts[t - 1].shape:
                assert ((frames[t].max(0) > 0) == moved).all()
            assert (frames[t].reshape(3, -1).max(1) == np.array(PALETTE[prompts[t].colour])).all()
    assert 70 <= n_switch <= 130


def test_clip_is_a_rollout_of_its_prompts():
    cb = sample_clips(7, 32, 10, 0.5)
    video = cb.video()
    for b in range(cb.batch):
        states = cb.states(b)
        frames, states2 = render_stream(cb.prompts(b), states[0].row, states[0].col)
        assert states2 == states
        assert (frames == video[b]).all()


def test_switch_distribution():
    cb = sample_clips(0, 4000, 9, 0.3)
    has = cb.switch_frame >= 0
    assert abs(has.mean() - 0.3) < 0.03
    assert (cb.changed.any(1) == has).all()
    subsets = {tuple(r) for r in cb.changed[has].tolist()}
    assert len(subsets) == 7  # colour, shape, direction alone and every combination
    assert set(cb.switch_frame[has].tolist()) == set(range(1, 9))
    b = np.flatnonzero(has)
    s = cb.switch_frame[b]
    for name, arr in (("colour", cb.colour), ("shape", cb.shape), ("direction", cb.direction)):
        i = ("colour", "shape", "direction").index(name)
        before, after = arr[b, s - 1], arr[b, s]
        assert ((before != after) == cb.changed[b, i]).all()
    assert (sample_clips(0, 100, 9, 0.0).switch_frame == -1).all()
    assert (sample_clips(0, 100, 9, 1.0).switch_frame >= 1).all()
    assert (sample_clips(0, 100, 1, 1.0).switch_frame == -1).all()  # no room for a switch
    aligned = sample_clips(0, 500, 12, 1.0, switch_align=3).switch_frame
    assert set(aligned.tolist()) == {3, 6, 9}
    # the start prompt and position depend on the seed only, not on switch_prob
    a, z = sample_clips(5, 50, 6, 0.0), sample_clips(5, 50, 6, 1.0)
    assert (a.colour[:, 0] == z.colour[:, 0]).all() and (a.row[:, 0] == z.row[:, 0]).all()


def test_covers_every_value():
    cb = sample_clips(1, 2000, 4, 0.3)
    assert set(cb.colour.ravel().tolist()) == set(range(7))
    assert set(cb.shape.ravel().tolist()) == set(range(3))
    assert set(cb.direction.ravel().tolist()) == set(range(4))
    assert set((cb.row * 8 + cb.col).ravel().tolist()) == set(range(64))


# ---------------------------------------------------------------------------------------------- batches

def test_sample_batch_shapes_and_tokens():
    video, tokens, cb = sample_batch(3, 16, 12, 0.3, with_meta=True)
    assert video.shape == (16, 12, 3, 32, 32) and video.dtype == torch.float32
    assert tokens.shape == (16, 12, 3) and tokens.dtype == torch.int64
    assert set(torch.unique(video).tolist()) <= {0.0, 1.0}
    for b in range(16):
        prompts = cb.prompts(b)
        for t in range(12):
            assert tokens[b, t].tolist() == prompt_tokens(prompts[t])
    assert (tokens[..., 0] >= 1).all() and (tokens[..., 0] <= 7).all()
    assert (tokens[..., 1] >= 8).all() and (tokens[..., 1] <= 10).all()
    assert (tokens[..., 2] >= 11).all() and (tokens[..., 2] <= 14).all()
    v8, t8 = sample_batch(3, 16, 12, 0.3, dtype=torch.uint8)
    assert v8.dtype == torch.uint8 and torch.equal(v8.float() / 255, video) and torch.equal(t8, tokens)


def test_sample_batch_is_deterministic():
    a = sample_batch(42, 8, 12, 0.3)
    b = sample_batch(42, 8, 12, 0.3)
    c = sample_batch(43, 8, 12, 0.3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[1], c[1])
    g = sample_batch(np.random.default_rng(42), 8, 12, 0.3)
    assert torch.equal(g[0], a[0]) and torch.equal(g[1], a[1])
    # make_clip(seed) is clip 0 of sample_batch(seed, 1)
    clip = make_clip(9, 12, 0.3)
    v, t = sample_batch(9, 1, 12, 0.3)
    assert np.array_equal(clip.frames, v[0].numpy())
    assert [prompt_tokens(p) for p in clip.prompts] == t[0].tolist()
    with pytest.raises(TypeError):
        sample_batch(None, 1, 2, 0.0)


def test_sample_batch_timing():
    """Timing is measured and printed, not asserted (target: < 20 ms for 16 × 12 frames)."""
    sample_batch(0, 16, 12, 0.3)
    times = []
    for i in range(50):
        t0 = time.perf_counter()
        sample_batch(i, 16, 12, 0.3)
        times.append(time.perf_counter() - t0)
    print(f"\nsample_batch(seed, 16, 12, 0.3): median {1e3 * np.median(times):.2f} ms, max {1e3 * max(times):.2f} ms")
