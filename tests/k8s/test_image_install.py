"""The image's install steps (docker/install.sh) work in a fresh venv; the Dockerfile uses them.

Docker can't run here, so the Dockerfile's one real step is a script we can run. This test
installs the package alone (`--no-deps`; pip fetches only the setuptools build backend, from its
cache or PyPI) into a fresh venv built from a
copy of the sources, and checks the Dockerfile pins the Ray image our pyproject pins. The full
install with dependencies is what `docker build` (and scripts/e2e-kind.sh) exercise.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from k8s_harness import REPO


def test_dockerfile_uses_the_pinned_ray_image_and_install_script() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    ray_pin = re.search(r'"ray\[[^\]]*\]==([\d.]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    assert f"ARG RAY_IMAGE=rayproject/ray:{ray_pin}-{py}-gpu" in dockerfile
    # The GPU image by default (vLLM, constraints/gpu.txt); VARIANT=cpu for the GPU-less one.
    assert "ARG VARIANT=gpu" in dockerfile and "COPY --chown=ray:users constraints /home/ray/src/constraints" in dockerfile
    assert "RUN VARIANT=${VARIANT} /home/ray/src/docker/install.sh /home/ray/src" in dockerfile


def test_install_script_installs_the_package_into_a_fresh_venv(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("platform", "operators"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    out = subprocess.run(["bash", str(REPO / "docker" / "install.sh"), "--no-deps", str(src)],
                         env={"PYTHON": str(python), "PATH": "/usr/bin:/bin", "HOME": str(Path.home())}, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"installed into {venv}" in out.stdout
    shown = subprocess.run([str(python), "-m", "pip", "show", "-f", "llm-platform"], capture_output=True, text=True, timeout=60).stdout
    assert "Version: 0.1.0" in shown and "llmoperator/handlers.py" in shown and "llmplatform/backends/k8s.py" in shown
    bad = subprocess.run(["bash", str(REPO / "docker" / "install.sh"), "--frobnicate"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "unknown option --frobnicate" in bad.stderr


def test_e2e_kind_skips_cleanly_without_docker(tmp_path: Path) -> None:
    """Here (no Docker daemon) `make e2e-kind` explains why it is skipped and succeeds."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "docker").write_text("#!/bin/sh\necho 'Cannot connect to the Docker daemon' >&2\nexit 1\n")
    (fake_bin / "docker").chmod(0o755)
    out = subprocess.run(["bash", str(REPO / "scripts" / "e2e-kind.sh")], env={"PATH": f"{fake_bin}:/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    assert "e2e-kind: skipped: docker is installed but its daemon is not reachable (Cannot connect to the Docker daemon)" in out.stdout
