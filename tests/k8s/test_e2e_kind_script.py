"""scripts/e2e-kind.sh, read by running it against recording stand-ins for docker/kind/helm/kubectl.

Docker and kind don't run here, so this checks what the script would do on a machine that has
them: it builds the GPU-less image, tells the operator that image has no vLLM, runs flow 1
(FineTuneJob -> condition Succeeded) and flow 2 (API key in a Secret, ModelDeployment with auth
-> condition Ready -> the openai client in a pod), and the objects it applies are valid specs
for the operator (parsed by the operator's own parse functions). The stand-in kubectl answers
`Succeeded`/an endpoint where the script polls; everything it is given is recorded.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from k8s_harness import REPO

KUBECTL = r'''#!PYTHON
import json, os, sys
args = sys.argv[1:]
stdin = sys.stdin.read() if "-" in args and "-f" in args else None
with open(os.environ["E2E_LOG"], "a") as log:
    log.write(json.dumps({"tool": "kubectl", "args": args, "stdin": stdin}) + "\n")
line = " ".join(args)
if "{.status.phase}" in line:
    print("Succeeded", end="")
elif "{.status.endpoint}" in line:
    print("http://e2e-chat-serve-svc.llm-platform-dev.svc:8000", end="")
elif args[:1] == ["kustomize"]:
    print("kind: Deployment\nimage: ghcr.io/llm-platform/llm-platform:main\n")
elif "--dry-run=client" in args:
    print(json.dumps(args))  # what `kubectl apply -f -` then receives
'''

OTHER = '''#!/bin/sh
printf '{"tool": "%s", "args": "%s"}\\n' "$(basename "$0")" "$*" >> "$E2E_LOG"
'''


def run_script(tmp_path: Path) -> tuple[subprocess.CompletedProcess, list[dict]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "kubectl").write_text(KUBECTL.replace("PYTHON", sys.executable, 1))
    for tool in ("docker", "kind", "helm"):
        (bin_dir / tool).write_text(OTHER)
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    (bin_dir / "python3").symlink_to(sys.executable)  # the script's YAML edit needs pyyaml
    log = tmp_path / "calls.jsonl"
    out = subprocess.run(["bash", str(REPO / "scripts" / "e2e-kind.sh")], capture_output=True, text=True, timeout=120,
                         env={"PATH": f"{bin_dir}:/usr/bin:/bin", "E2E_LOG": str(log), "HOME": str(tmp_path)})
    return out, [json.loads(line) for line in log.read_text().splitlines()]


def applied(calls: list[dict], kind: str) -> dict:
    docs = [d for c in calls if c.get("stdin") for d in yaml.safe_load_all(c["stdin"]) if isinstance(d, dict) and d.get("kind") == kind]
    assert docs, f"the script applies no {kind}"
    return docs[-1]


def dry_run_args(calls: list[dict], *words: str) -> list[str]:
    found = [c["args"] for c in calls if c["tool"] == "kubectl" and "--dry-run=client" in c["args"] and all(w in c["args"] for w in words)]
    assert found, f"no `kubectl create {' '.join(words)}`"
    return found[-1]


def test_e2e_kind_builds_the_gpu_less_image_and_runs_flows_1_and_2(tmp_path: Path) -> None:
    from llmoperator.reconcile.deployment import parse_serve
    from llmoperator.reconcile.finetune import parse_finetune

    out, calls = run_script(tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "flow 1 passed" in out.stdout and "flow 2 passed" in out.stdout and out.stdout.rstrip().endswith("e2e-kind: PASSED")
    builds = [c["args"] for c in calls if c["tool"] == "docker" and c["args"].startswith("build")]
    assert builds and "--build-arg RAY_IMAGE=rayproject/ray:2.60.0-py311 --build-arg VARIANT=cpu" in builds[0]

    kubectl = [" ".join(c["args"]) for c in calls if c["tool"] == "kubectl"]
    no_vllm = kubectl.index("-n llm-platform-dev set env deploy/llm-operator LLMOP_IMAGE_HAS_VLLM=false")
    assert no_vllm < kubectl.index("-n llm-platform-dev rollout status deploy/llm-operator --timeout=300s")
    assert any("wait --for=condition=Succeeded finetunejob/e2e-tiny" in c for c in kubectl)
    assert any("wait --for=condition=Ready modeldeployment/e2e-chat" in c for c in kubectl)

    job = applied(calls, "FineTuneJob")
    ft = parse_finetune({**job, "metadata": {**job["metadata"], "namespace": "llm-platform-dev"}})
    assert ft.resources.workers == 1 and ft.mlflow.registered_model_name == "tiny-reverse"
    md = applied(calls, "ModelDeployment")
    serve = parse_serve({**md, "metadata": {**md["metadata"], "namespace": "llm-platform-dev"}})
    assert serve.auth.enabled and serve.engine == "auto"
    assert [a.source for a in serve.model.adapters] == ["models:/tiny-reverse/1"]  # flow 1's registered adapter

    # The key the client pod reads and the hash the ingress's Secret holds belong together.
    key = next(a.split("=", 2)[2] for a in dry_run_args(calls, "e2e-client-key") if a.startswith("--from-literal=key="))
    keys = next(a.split("=", 2)[2] for a in dry_run_args(calls, "llm-platform-api-keys") if a.startswith("--from-literal=keys="))
    assert keys == "sha256:" + hashlib.sha256(key.encode()).hexdigest()
    client = next(a.split("=", 2)[2] for a in dry_run_args(calls, "configmap", "e2e-client") if a.startswith("--from-literal=client.py="))
    compile(client, "client.py", "exec")
    assert "llama2-tiny:reverse" in client and "AuthenticationError" in client
    pod = applied(calls, "Job")["spec"]["template"]["spec"]
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["E2E_URL"]["value"] == "http://e2e-chat-serve-svc.llm-platform-dev.svc:8000"
    assert env["E2E_KEY"]["valueFrom"] == {"secretKeyRef": {"name": "e2e-client-key", "key": "key"}}
