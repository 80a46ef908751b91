"""A new user's first hour (issue 16): built-in models visible, client input checked, one meaning per flag,
help that helps, render edges refused with a clear line and exit 2."""
from __future__ import annotations

import argparse
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from streamgen.argparsing import CommandParser
from streamgen.cli import build_parser, main
from streamgen.models.checkpoint import CheckpointError, read_lazy
from streamgen.names import SCHEDULES
from streamgen.render.writer import load_latents

from .test_cli import subparsers

ROOT = Path(__file__).resolve().parents[1]


def _parser(*names: str) -> argparse.ArgumentParser:
    """The subcommand parser `streamgen NAME…`."""
    return dict(subparsers(build_parser()))[" ".join(names)]


def _option(parser: argparse.ArgumentParser, flag: str) -> argparse.Action:
    return parser._option_string_actions[flag]


def _exit_2(argv: list[str], capsys) -> str:
    """Run `streamgen ARGV`, expect argparse's exit 2, return stderr."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    return capsys.readouterr().err


# --- (4) built-in models -------------------------------------------------------------------------
def test_models_list_shows_the_builtins(capsys) -> None:
    main(["models", "list"])
    lines = capsys.readouterr().out.splitlines()
    for name, policy in (("embedded", "window_sink(capacity_frames=9"), ("tiny-random", "ema_sink(")):
        row = next(line for line in lines if line.startswith(name + " "))
        assert " built-in " in row and policy in row, row
    assert "default: embedded" in lines[-1]


def test_models_list_imports_no_torch() -> None:
    """`models list` reads the YAMLs and the built-ins' settings without torch (≈0.4 s instead of ≈3 s)."""
    code = ("import sys; from streamgen.cli import main; rc = main(['models', 'list']); "
            "assert rc == 0 and 'torch' not in sys.modules, (rc, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False)
    assert done.returncode == 0, done.stderr
    assert "embedded " in done.stdout and "self-forcing " in done.stdout


def test_the_builtins_list_what_their_bundles_run_with() -> None:
    from streamgen.bundles.builtins import BUILTINS
    from streamgen.bundles.bundle import BUNDLES

    assert list(BUILTINS) == list(BUNDLES)
    for name, builtin in BUILTINS.items():
        assert builtin.stream_config() == BUNDLES[name]().stream, name  # the embedded weights record theirs


def test_models_show_a_builtin(capsys) -> None:
    assert main(["models", "show", "embedded"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("embedded: built-in model (the default)")
    assert "32x32 (WxH) at 8 fps" in out and "window_sink(capacity_frames=9, sink_frames=0, rope=relative)" in out
    assert main(["models", "show", "no-such-model"]) == 2
    assert "built-in models: tiny-random, embedded, embedded-avatar" in capsys.readouterr().err


# --- (5) the Python client checks its input ------------------------------------------------------
@pytest.mark.parametrize("argv,message", [
    (["http://127.0.0.1:1", "--seconds", "0"], "argument --seconds: must be a finite number of seconds > 0, got 0"),
    (["http://127.0.0.1:1", "--seconds", "-3"], "argument --seconds: must be a finite number of seconds > 0, got -3"),
    (["notaurl"], "argument url: notaurl is not an http(s) URL"),
    (["ftp://host/x"], "ftp://host/x is not an http(s) URL"),
    (["http://127.0.0.1:1", "--prompts-at", "soon:a cat"], "--prompts-at item 'soon:a cat' is not SECONDS:PROMPT"),
])
def test_client_arguments_are_checked(capsys, argv, message) -> None:
    err = _exit_2(["client", *argv], capsys)
    last = err.strip().splitlines()[-1]
    assert err.startswith("usage: streamgen client") and last.startswith("streamgen client: error: ") and message in last, err
    assert "Traceback" not in err


def test_client_unreachable_server_is_one_clean_line() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = subprocess.run([sys.executable, "-m", "streamgen.cli", "client", f"http://127.0.0.1:{port}", "--seconds", "1"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT, check=False)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [done.stderr.strip()], done.stderr  # one line, no aiohttp noise
    assert done.stderr.startswith(f"streamgen client: cannot reach the server at http://127.0.0.1:{port}: ")
    assert "Unclosed client session" not in done.stderr


# --- (6) one flag, one meaning ----------------------------------------------------------------------
def test_schedule_means_exact_or_timestep_slot_everywhere(capsys) -> None:
    for command in (("render",), ("bench", "engine")):
        assert tuple(_option(_parser(*command), "--schedule").choices) == SCHEDULES
    assert "--schedule" not in _parser("client")._option_string_actions
    assert "--prompts-at" in _parser("client")._option_string_actions
    err = _exit_2(["bench", "engine", "--schedule", "slots", "--chunks", "1", "--quiet"], capsys)
    assert "argument --schedule: invalid choice: 'slots'" in err
    err = _exit_2(["client", "http://127.0.0.1:1", "--schedule", "1:a cat"], capsys)
    assert "unrecognized arguments: --schedule 1:a cat" in err


# --- (7) help text, and a mistyped flag -------------------------------------------------------------
def test_help_texts() -> None:
    assert "Wire it into" not in _parser("eval").format_help()
    serve = _parser("serve").format_help()
    assert "Serve live streams over WebRTC" in serve and "examples:" in serve and "streamgen serve --model tiny-random" in serve
    for command, flag, default in [("serve", "--max-sessions", "4"), ("serve", "--max-sessions-per-ip", "2"),
                                   ("verify-fixture", "--atol", "0.0001"), ("verify-fixture", "--rtol", "0.0001")]:
        parser = _parser(command)
        action = _option(parser, flag)
        assert action.help and f"(default: {default})" in parser._get_formatter()._expand_help(action), (command, flag)
    assert _parser("verify-fixture")._actions[-1].help  # dirs
    train = _parser("train")
    assert [a.dest for a in train._actions if not a.help] == []
    assert _option(train, "--bf16").nargs == 0  # a plain flag: `--bf16`, not `--bf16 true`
    assert "| `streamgen eval` |" in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("argv,usage,hint", [
    (["serve", "--prot", "9000"], "usage: streamgen serve", "unrecognized arguments: --prot 9000; did you mean --port?"),
    (["render", "--sed", "3"], "usage: streamgen render", "did you mean --seed?"),
    (["bench", "engine", "--polcy", "full"], "usage: streamgen bench engine", "did you mean --policy?"),
])
def test_a_mistyped_flag_gets_its_subcommand_usage_and_a_suggestion(capsys, argv, usage, hint) -> None:
    err = _exit_2(argv, capsys)
    assert err.startswith(usage) and hint in err, err


def test_every_subcommand_parser_is_a_command_parser() -> None:
    assert all(isinstance(p, CommandParser) for _, p in subparsers(build_parser()))


def test_the_cli_parser_imports_no_client_stack() -> None:
    code = ("import sys; from streamgen.cli import build_parser; build_parser(); "
            "heavy = [m for m in ('torch', 'ray', 'aiortc', 'aiohttp') if m in sys.modules]; assert not heavy, heavy")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False)
    assert done.returncode == 0, done.stderr


# --- (8) render edges -----------------------------------------------------------------------------------
def test_unknown_policy_setting_exits_2_naming_the_known_ones(tmp_path, capsys) -> None:
    rc = main(["render", "--model", "tiny-random", "--prompt", "a", "--seconds", "0.25", "--policy-setting", "foo=1",
               "-o", str(tmp_path / "a.mp4"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "unknown setting foo for cache policy 'ema_sink'; known: capacity_frames, sink_frames, alpha" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv,message", [
    (["--size", "33"], "argument --size: the longer side must be even (yuv420p), got 33: use 32 or 34"),
    (["-o", "a.avi"], "argument -o/--out: a.avi: the video is written as MP4 (*.mp4), HLS (*.m3u8) or pushed to rtmp://host/app/key"),
])
def test_render_refuses_what_it_cannot_write(capsys, argv, message) -> None:
    err = _exit_2(["render", "--model", "tiny-random", "--prompt", "a", *(["-o", "a.mp4"] if "-o" not in argv else []),
                   *argv], capsys)
    assert message in err, err


def test_nothing_to_render_has_one_prefix(tmp_path, capsys) -> None:
    assert main(["render", "--model", "tiny-random", "-o", str(tmp_path / "a.mp4")]) == 2
    assert capsys.readouterr().err == "streamgen render: error: nothing to render: give --prompt or --timeline\n"


def test_latents_out_holds_the_latents_of_the_frames_written(tmp_path, capsys) -> None:
    lat = tmp_path / "l.safetensors"
    # tiny-random: 16 fps, 3-frame chunks, 1 video frame per latent: 0.25 s = 4 frames = 2 chunks (6 latents)
    assert main(["render", "--model", "tiny-random", "--prompt", "a", "--seconds", "0.25", "--latents-out", str(lat),
                 "--quiet"]) == 0
    latents, meta = load_latents(lat)
    assert latents.shape[1] == 4 == int(meta["frames"])


def test_corrupt_checkpoint_is_named_as_such(tmp_path, capsys) -> None:
    text = tmp_path / "model.pt"
    text.write_text("hello, not a checkpoint\n")
    with pytest.raises(CheckpointError, match=r"not a torch checkpoint \(neither a zip archive nor a pickle\)"):
        read_lazy(text)
    whole = tmp_path / "whole.pt"
    torch.save({"generator": {"w": torch.zeros(4096)}}, whole)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(whole.read_bytes()[:4000])
    with pytest.raises(CheckpointError, match="a torch \\(zip\\) checkpoint that is truncated or damaged"):
        read_lazy(cut)
    (tmp_path / "models").mkdir()
    text.rename(tmp_path / "models" / "longlive_base.pt")
    assert main(["models", "check", str(tmp_path), "--family", "longlive"]) == 1
    assert "longlive_base.pt (24 bytes): not a torch checkpoint" in capsys.readouterr().out


def test_render_warns_about_words_the_model_ignores(tmp_path, capsys) -> None:
    timeline = tmp_path / "t.yaml"
    timeline.write_text("- at: 0\n  prompt: a blue square moving left\n- at: 0.25\n  prompt: a fluffy gizmo wobbling\n")
    assert main(["render", "--model", "embedded", "--timeline", str(timeline), "--seconds", "0.5",
                 "-o", str(tmp_path / "a.mp4"), "--quiet"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "ignores" in line]
    assert warnings == ["streamgen render: warning: at 0.25 s: prompt 'a fluffy gizmo wobbling': the model ignores "
                        "'fluffy', 'gizmo', 'wobbling'; understood as 'a white circle moving right'"], warnings


def test_unbatched_under_the_exact_schedule_is_refused_not_ignored(tmp_path, capsys) -> None:
    out = tmp_path / "a.mp4"
    assert main(["render", "--model", "tiny-random", "--prompt", "a", "--seconds", "0.25", "--unbatched",
                 "-o", str(out), "--quiet"]) == 2
    assert "--unbatched runs the timestep slots one by one, but this render's schedule is 'exact'" in capsys.readouterr().err
    assert not out.exists()
    assert main(["render", "--model", "tiny-random", "--prompt", "a", "--seconds", "0.25", "--unbatched",
                 "--schedule", "timestep-slot", "-o", str(out), "--quiet"]) == 0
