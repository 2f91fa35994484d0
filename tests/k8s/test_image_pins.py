"""The GPU image's pins resolve together, vLLM among them, and agree with the CPU venv's pins.

pip's resolver runs once per module over exactly what docker/install.sh installs in the
Dockerfile (`VARIANT=gpu`: the operator, cluster and gpu extras at constraints/gpu.txt), as a
dry run with a JSON report and no local pip configuration (this machine's find-links and torch
cap are not the Docker build's). Wheels without published metadata are read with HTTP range
requests (`fast-deps`), so no CUDA wheel is downloaded; ~2.5 min on 2 cores. It needs PyPI:
unreachable, the test fails saying so (marker `network`: in `make test`, not `make test-fast`).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from importlib import metadata
from pathlib import Path

import pytest

from k8s_harness import REPO

pytestmark = pytest.mark.network

PIN = re.compile(r"^([A-Za-z0-9_.\-]+)==([^\s#;]+)\s*$")
DIFFERS = re.compile(r"^# differs: ([A-Za-z0-9_.\-]+): (.+)$")
SHARED = ("transformers", "peft", "ray", "bitsandbytes", "accelerate")  # the list
LOCAL_ONLY_PIP_ENV = ("PIP_FIND_LINKS", "PIP_CONSTRAINT", "PIP_EXTRA_INDEX_URL", "PIP_NO_INDEX")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(path: Path) -> dict[str, str]:
    """`name==version` lines of a constraints file, by canonical name."""
    found = (PIN.match(line.strip()) for line in path.read_text().splitlines())
    return {canonical(m.group(1)): m.group(2) for m in found if m}


def explained_differences(path: Path) -> dict[str, str]:
    """The `# differs: NAME: why` lines of a constraints file's header."""
    found = (DIFFERS.match(line.strip()) for line in path.read_text().splitlines())
    return {canonical(m.group(1)): m.group(2).strip() for m in found if m}


def index_url() -> str:
    return os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")


@pytest.fixture(scope="module")
def gpu_report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """name -> version of everything the GPU image would install, from pip's --report."""
    probe = f"{index_url()}/vllm/"
    try:
        urllib.request.urlopen(probe, timeout=30).close()
    except OSError as e:
        pytest.fail(f"the package index is unreachable ({probe}: {e}); this test runs pip's resolver over the GPU image "
                    "and needs PyPI (or PIP_INDEX_URL pointing at a mirror)")
    report = tmp_path_factory.mktemp("pins") / "gpu-report.json"
    env = {k: v for k, v in os.environ.items() if k not in LOCAL_ONLY_PIP_ENV}
    env.update(PYTHON=sys.executable, VARIANT="gpu", PIP_CONFIG_FILE=os.devnull, PIP_IGNORE_INSTALLED="1",
               PIP_USE_FEATURE="fast-deps", PIP_PROGRESS_BAR="off")
    out = subprocess.run(["bash", str(REPO / "docker" / "install.sh"), "--dry-run", "--report", str(report), str(REPO)],
                         env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"pip cannot resolve the GPU image's requirements:\n{(out.stdout + out.stderr)[-6000:]}"
    installs = json.loads(report.read_text())["install"]
    return {canonical(i["metadata"]["name"]): i["metadata"]["version"] for i in installs}


def test_gpu_image_resolves_with_vllm_and_the_training_stack(gpu_report: dict[str, str]) -> None:
    gpu = pins(REPO / "constraints" / "gpu.txt")
    extra = re.search(r'^gpu = \["vllm==([^"]+)"\]', (REPO / "pyproject.toml").read_text(), re.M)
    assert extra, "pyproject.toml has no `gpu` extra naming vllm==VERSION"
    assert gpu_report.get("vllm") == extra.group(1) == gpu["vllm"]
    for name in ("torch", "bitsandbytes", "peft", "accelerate", "ray", "transformers", "kopf", "mlflow", "boto3"):
        assert name in gpu_report, f"{name} is missing from the GPU image"
    assert gpu_report["torch"] == gpu["torch"]  # the CUDA build vLLM was built against, not a CPU one


def test_cpu_venv_and_gpu_image_pin_the_same_versions_or_say_why(gpu_report: dict[str, str]) -> None:
    cpu_file = REPO / "constraints" / "cpu.txt"
    cpu, explained = pins(cpu_file), explained_differences(cpu_file)
    assert set(SHARED) <= set(cpu), f"constraints/cpu.txt must pin {sorted(set(SHARED) - set(cpu))}"
    differing = {name: (version, gpu_report.get(name)) for name, version in cpu.items() if gpu_report.get(name) != version}
    unexplained = {n: v for n, v in differing.items() if n not in explained}
    stale = sorted(set(explained) - set(differing))
    assert not unexplained, f"cpu vs GPU image versions differ without a `# differs: NAME: why` line in {cpu_file}: {unexplained}"
    assert not stale, f"{cpu_file} explains differences that no longer exist: {stale}"
    assert all(len(why) > 20 for why in explained.values())


def test_the_test_venv_is_the_cpu_constraints() -> None:
    """The venv running these tests (Makefile `install`) has exactly constraints/cpu.txt's releases."""
    makefile = (REPO / "Makefile").read_text()
    assert "-c constraints/cpu.txt" in makefile and re.search(r"^\$\(STAMP\):.*constraints/cpu\.txt", makefile, re.M)
    for name, version in pins(REPO / "constraints" / "cpu.txt").items():
        installed = metadata.version(name).split("+")[0]  # torch 2.13.0+cpu
        assert installed == version, f"{name} {installed} is installed, constraints/cpu.txt says {version}: run `make install`"


def test_install_script_refuses_an_unknown_variant() -> None:
    out = subprocess.run(["bash", str(REPO / "docker" / "install.sh"), "--dry-run"], env={"PATH": "/usr/bin:/bin", "VARIANT": "tpu"},
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "VARIANT=tpu is not a variant (use VARIANT=gpu or VARIANT=cpu)" in out.stderr
