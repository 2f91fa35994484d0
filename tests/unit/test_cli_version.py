"""`platformctl --version`, `completion bash|zsh|fish` and `-v/--verbose`, as a user runs them."""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from llmplatform.cli.main import build_command, main
from llmplatform.stack.ports import free_port

REPO = Path(__file__).resolve().parents[2]


def test_version_names_package_git_and_engines(capsys):
    assert main(["--version"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("platformctl 0.1.0")
    for name in ("python", "torch", "ray", "mlflow", "vllm"):
        assert name in out


def test_version_json(capsys):
    assert main(["--version", "-o", "json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["platformctl"] == "0.1.0"
    assert set(info["packages"]) == {"torch", "ray", "mlflow", "vllm"}
    import ray

    assert info["packages"]["ray"] == ray.__version__
    if (REPO / ".git").exists() and shutil.which("git"):
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
        assert info["git_sha"] and head.startswith(info["git_sha"])


@pytest.mark.parametrize("shell,marker", [("bash", "complete -o default -F"), ("zsh", "compdef"), ("fish", "complete --command platformctl")])
def test_completion_prints_a_script_per_shell(capsys, shell, marker):
    assert main(["completion", shell]) == 0
    script = capsys.readouterr().out
    assert marker in script and "_PLATFORMCTL_COMPLETE" in script


def test_completion_rejects_unknown_shell(capsys):
    assert main(["completion", "tcsh"]) == 2
    assert "tcsh" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_bash_completion_completes_nouns_and_options(tmp_path):
    """Source the script in a real bash and ask it to complete, as the shell does on <TAB>."""
    shim = tmp_path / "platformctl"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m llmplatform.cli.main "$@"\n')
    shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}

    def complete(*words: str) -> list[str]:
        script = ('source <(platformctl completion bash)\n'
                  f'COMP_WORDS=({" ".join(words)}); COMP_CWORD={len(words) - 1}\n'
                  '_platformctl_completion platformctl\nprintf "%s\\n" "${COMPREPLY[@]}"\n')
        done = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout.split()

    assert complete("platformctl", "doc") == ["doctor"]
    assert {"deploy", "status", "chat"} <= set(complete("platformctl", "serve", "''"))
    assert "--verbose" in complete("platformctl", "models", "show", "--ver")


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, logging.getLogger("llmplatform").level)
    yield
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    logging.getLogger("llmplatform").setLevel(saved[2])


def test_verbose_shows_info_logs_after_any_command(restore_logging, capsys):
    assert main(["doctor", "--no-cluster", "--port", str(free_port())]) in (0, 1)
    assert "INFO llmplatform.doctor" not in capsys.readouterr().err
    assert main(["doctor", "--no-cluster", "--port", str(free_port()), "-v"]) in (0, 1)
    assert "INFO llmplatform.doctor: checking ports [" in capsys.readouterr().err
    assert main(["-v", "doctor", "--no-cluster", "--port", str(free_port())]) in (0, 1)
    assert "INFO llmplatform.doctor" in capsys.readouterr().err


def test_vv_is_debug(restore_logging, capsys):
    assert main(["plan", "--model", "llama2-7b", "--method", "lora", "--gpu", "l4-24gb", "-vv"]) in (0, 1)
    assert logging.getLogger("llmplatform").getEffectiveLevel() == logging.DEBUG


def test_every_command_takes_verbose_and_keeps_its_own_short_flags():
    def walk(cmd, path):
        yield path, cmd
        for name, sub in getattr(cmd, "commands", {}).items():
            yield from walk(sub, [*path, name])

    for path, cmd in walk(build_command(), ["platformctl"]):
        opts = {o for p in cmd.params for o in getattr(p, "opts", ())}
        assert "--verbose" in opts, " ".join(path)
    show = build_command().commands["models"].commands["show"]
    version = next(p for p in show.params if "--version" in p.opts)
    assert "-v" in version.opts  # `models show -v 3` still means version 3
