"""The argument parser every `streamgen` command and subcommand uses (torch-free: the CLI parser stays light).

Plain argparse hands a subcommand's unknown flags up to the top-level parser, which prints the top-level
usage and no hint (`streamgen serve --prot 9000`). `CommandParser` refuses them where they were given,
with that subcommand's usage and the closest known flag.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence


class CommandParser(argparse.ArgumentParser):
    """An `ArgumentParser` whose unknown arguments are errors of the (sub)command they were given to,
    naming the nearest known flag ("did you mean --port?"). `add_subparsers` makes its children this class."""

    def parse_known_args(self, args: Sequence[str] | None = None,
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        parsed, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(_unrecognized(extras, list(self._option_string_actions)))
        return parsed, extras


def _unrecognized(extras: list[str], known: list[str]) -> str:
    """The error line for unknown arguments, with a suggestion for the first mistyped flag."""
    message = f"unrecognized arguments: {' '.join(extras)}"
    for extra in extras:
        flag = extra.split("=", 1)[0]
        if flag.startswith("-"):
            distance, close = min((_edits(flag, k), k) for k in known)
            if distance <= max(1, len(flag.lstrip("-")) // 3):
                return f"{message}; did you mean {close}?"
    return message


def _edits(a: str, b: str) -> int:
    """Typing edits from a to b: insert, delete, replace or swap two neighbours (`--prot` is 1 from `--port`,
    2 from `--prompt`; difflib's ratio would pick `--prompt`)."""
    d = [[i + j if not i * j else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1)
    return d[-1][-1]
