"""What this installation is: platformctl's version, its git commit, and the engines' versions.

Versions come from package metadata (no heavy imports); the git commit only when the package runs
from a git checkout (an editable install of the repository), with `dirty` when tracked files differ.
"""

from __future__ import annotations

import platform as _stdlib_platform
import subprocess
import sys
from pathlib import Path

from llmplatform.doctor import dist_version

DIST = "llm-platform"
ENGINES = ("torch", "ray", "mlflow", "vllm")  # distributions whose versions users report in issues
REPO = Path(__file__).resolve().parents[2]  # platform/llmplatform/about.py -> the repository root


def git_commit(repo: Path = REPO) -> tuple[str | None, bool]:
    """(short commit sha, dirty) of the checkout at `repo`, or (None, False) outside git."""
    if not (repo / ".git").exists():
        return None, False
    try:
        sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=5)
        if sha.returncode != 0:
            return None, False
        diff = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):  # no git binary, or a hung filesystem
        return None, False
    return sha.stdout.strip(), bool(diff.stdout.strip())


def version_info(repo: Path = REPO) -> dict:
    """platformctl, git, Python, OS and engine versions; a missing engine is None."""
    sha, dirty = git_commit(repo)
    return {
        "platformctl": dist_version(DIST),
        "git_sha": sha,
        "git_dirty": dirty,
        "python": _stdlib_platform.python_version(),
        "os": f"{sys.platform} {_stdlib_platform.machine()}",
        "packages": {name: dist_version(name) for name in ENGINES},
    }


def render_version(info: dict) -> str:
    """`platformctl 0.1.0 (git abc123, dirty)` then one `name version` line each."""
    git = f" (git {info['git_sha']}{', dirty' if info['git_dirty'] else ''})" if info["git_sha"] else ""
    lines = [f"platformctl {info['platformctl'] or '(not installed)'}{git}", f"python      {info['python']} ({info['os']})"]
    lines += [f"{name:<11} {version or 'not installed'}" for name, version in info["packages"].items()]
    return "\n".join(lines)
