"""The world's language: palette, shapes, directions, the shared token vocabulary and the prompt grammar.

Everything here is part of the embedded model's contract (docs/world.md): the order of `VOCAB` is
baked into trained checkpoints, so it only ever grows at the end.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, NamedTuple, Sequence

import numpy as np

# ----------------------------------------------------------------------------------------------
# Attribute values (order = index used everywhere: masks, palette rows, token offsets)

COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "white", "cyan", "magenta")
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "white": (1.0, 1.0, 1.0),
    "cyan": (0.0, 1.0, 1.0),
    "magenta": (1.0, 0.0, 1.0),
}
PALETTE_ARRAY = np.array([PALETTE[c] for c in COLOURS], dtype=np.float32)  # [7, 3]
PALETTE_ARRAY.flags.writeable = False

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")

ATTRIBUTES: tuple[str, ...] = ("colour", "shape", "direction")
VALUES: dict[str, tuple[str, ...]] = {"colour": COLOURS, "shape": SHAPES, "direction": DIRECTIONS}

# ----------------------------------------------------------------------------------------------
# Shared token vocabulary: id 0 is the null token (caption dropout / unconditional), then colours,
# shapes, directions. A prompt is always exactly 3 ids: [colour_id, shape_id, direction_id].

NULL_TOKEN_TEXT = "<null>"
VOCAB: tuple[str, ...] = (NULL_TOKEN_TEXT, *COLOURS, *SHAPES, *DIRECTIONS)
VOCAB_SIZE = len(VOCAB)  # 15
NULL_TOKEN = 0
TOKEN_OFFSET: dict[str, int] = {
    "colour": 1,
    "shape": 1 + len(COLOURS),
    "direction": 1 + len(COLOURS) + len(SHAPES),
}
TOKENS_PER_PROMPT = 3
TOKEN_IDS: dict[str, int] = {w: i for i, w in enumerate(VOCAB)}

# ----------------------------------------------------------------------------------------------
# Grammar

ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})
FILLER_WORDS: frozenset[str] = frozenset({"moving", "going", "heading", "to", "towards", "toward", "is"})
SYNONYMS: dict[str, str] = {"box": "square", "ball": "circle"}

DEFAULTS: dict[str, str] = {"colour": "white", "shape": "circle", "direction": "right"}

_WORD_ATTRIBUTE: dict[str, str] = {v: a for a, vals in VALUES.items() for v in vals}
_WORD_RE = re.compile(r"[^\W_]+(?:'[^\W_]+)*")


@dataclass(frozen=True)
class Prompt:
    """One fully specified world prompt. Fields are the attribute names (see COLOURS/SHAPES/DIRECTIONS)."""

    colour: str = DEFAULTS["colour"]
    shape: str = DEFAULTS["shape"]
    direction: str = DEFAULTS["direction"]

    def __post_init__(self) -> None:
        for attr in ATTRIBUTES:
            value = getattr(self, attr)
            if value not in VALUES[attr]:
                raise ValueError(f"unknown {attr} {value!r}; known: {', '.join(VALUES[attr])}")

    def text(self) -> str:
        """Canonical text, e.g. "a red circle moving left"; parse_prompt(p.text()).prompt == p."""
        return f"a {self.colour} {self.shape} moving {self.direction}"

    def indices(self) -> tuple[int, int, int]:
        """(colour, shape, direction) indices into COLOURS, SHAPES, DIRECTIONS."""
        return COLOURS.index(self.colour), SHAPES.index(self.shape), DIRECTIONS.index(self.direction)

    def tokens(self) -> list[int]:
        return prompt_tokens(self)

    def replace(self, **changes: str) -> "Prompt":
        unknown = set(changes) - set(ATTRIBUTES)
        if unknown:
            raise TypeError(f"unknown prompt attribute(s) {sorted(unknown)}; known: {', '.join(ATTRIBUTES)}")
        return Prompt(**{a: changes.get(a, getattr(self, a)) for a in ATTRIBUTES})

    @classmethod
    def from_indices(cls, colour: int, shape: int, direction: int) -> "Prompt":
        return cls(COLOURS[int(colour)], SHAPES[int(shape)], DIRECTIONS[int(direction)])

    @classmethod
    def from_tokens(cls, ids: Sequence[int]) -> "Prompt":
        return prompt_from_tokens(ids)

    def __str__(self) -> str:
        return self.text()


DEFAULT_PROMPT = Prompt()


class ParsedPrompt(NamedTuple):
    """Result of parse_prompt.

    prompt: the resolved Prompt (missing attributes filled from DEFAULTS).
    unknown_words: words that are neither vocabulary, synonyms, articles nor fillers, lower-cased,
        unique, in order of first appearance (the server echoes them in its ack).
    defaulted: attributes the text did not mention, in ATTRIBUTES order.
    overridden: words superseded by a later word for the same attribute ("red blue ball" → ("red",)).
    """

    prompt: Prompt
    unknown_words: tuple[str, ...] = ()
    defaulted: tuple[str, ...] = ()
    overridden: tuple[str, ...] = ()


def words(text: str) -> list[str]:
    """Lower-cased words of `text`: runs of letters/digits (apostrophes inside a word kept); the rest is a separator."""
    return _WORD_RE.findall(text.lower())


def parse_prompt(text: str) -> ParsedPrompt:
    """Parse free text into a Prompt. Case-insensitive, order-free, articles and fillers skipped,
    synonyms mapped, unknown words ignored and reported, last mention of an attribute wins,
    unmentioned attributes take DEFAULTS."""
    found: dict[str, str] = {}
    found_word: dict[str, str] = {}
    unknown: list[str] = []
    overridden: list[str] = []
    for word in words(text):
        if word in ARTICLES or word in FILLER_WORDS:
            continue
        canonical = SYNONYMS.get(word, word)
        attr = _WORD_ATTRIBUTE.get(canonical)
        if attr is None:
            if word not in unknown:
                unknown.append(word)
            continue
        if attr in found and found[attr] != canonical:
            overridden.append(found_word[attr])
        found[attr], found_word[attr] = canonical, word
    defaulted = tuple(a for a in ATTRIBUTES if a not in found)
    prompt = Prompt(**{a: found.get(a, DEFAULTS[a]) for a in ATTRIBUTES})
    return ParsedPrompt(prompt, tuple(unknown), defaulted, tuple(overridden))


def prompt_tokens(prompt: Prompt | str) -> list[int]:
    """[colour_id, shape_id, direction_id] in VOCAB (a string is parsed first)."""
    if isinstance(prompt, str):
        prompt = parse_prompt(prompt).prompt
    c, s, d = prompt.indices()
    return [TOKEN_OFFSET["colour"] + c, TOKEN_OFFSET["shape"] + s, TOKEN_OFFSET["direction"] + d]


def prompt_from_tokens(ids: Iterable[int]) -> Prompt:
    """Inverse of prompt_tokens; raises ValueError on a null or misplaced id."""
    ids = [int(i) for i in ids]
    if len(ids) != TOKENS_PER_PROMPT:
        raise ValueError(f"a prompt is {TOKENS_PER_PROMPT} token ids, got {len(ids)}")
    values = []
    for attr, i in zip(ATTRIBUTES, ids):
        j = i - TOKEN_OFFSET[attr]
        if not 0 <= j < len(VALUES[attr]):
            raise ValueError(f"token id {i} ({VOCAB[i] if 0 <= i < VOCAB_SIZE else '?'}) is not a {attr}")
        values.append(VALUES[attr][j])
    return Prompt(*values)


def all_prompts() -> list[Prompt]:
    """Every prompt (7 colours × 3 shapes × 4 directions = 84), in index order."""
    return [Prompt(c, s, d) for c in COLOURS for s in SHAPES for d in DIRECTIONS]
