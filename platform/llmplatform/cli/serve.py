"""`platformctl serve`: OpenAI-compatible deployments on Ray Serve.

Each command parses its flags, calls one function in `llmplatform.serving.app` (or the k8s
backend for `--target k8s`: ModelDeployment CRs, and for `chat` the RayService's serve Service
URL from the CR's status or `--url`), and prints a table or `--output json`.
"""

from __future__ import annotations

import time
from enum import Enum

import typer

from llmplatform.cli.output import (CONTEXT_OPTION, KUBECONFIG_OPTION, NAMESPACE_OPTION, OPERATOR_TIMEOUT_OPTION, OUTPUT_OPTION, OutputFormat,
                                    deploy_progress, emit, render_table)
from llmplatform.errors import ServeError

app = typer.Typer(help="Deploy and manage OpenAI-compatible endpoints.", no_args_is_help=True)


class Target(str, Enum):
    local = "local"
    ray = "ray"
    k8s = "k8s"


TARGET_OPTION = typer.Option(Target.local, "--target", "-t", help="local/ray: Ray Serve on the local stack or --ray-address; k8s: ModelDeployment resources.")
K8S_COLUMNS = ["name", "namespace", "phase", "served", "endpoint", "message"]
RAY_ADDRESS_OPTION = typer.Option(None, "--ray-address", envvar="RAY_ADDRESS",
                                  help="Ray cluster: a GCS address HOST:6379, a Jobs API URL http://HOST:8265 (same host, "
                                       "default GCS port) or ray://HOST:10001; default: the local stack's.")


def _connect(ray_address: str | None, start_local: bool = False) -> None:
    from llmplatform import stack
    from llmplatform.backends.ray_auth import use_client_env
    from llmplatform.rayaddress import parse
    from llmplatform.reach import require_reachable
    from llmplatform.serving.app import connect

    if not ray_address:
        ray_address = stack.up().ray_address if start_local else stack.ray_address()
    ray_address = parse(ray_address, "--ray-address / RAY_ADDRESS", ServeError).gcs_address
    require_reachable(ray_address, "the Ray cluster (GCS)", "start the local stack with `platformctl up`, or pass "
                      "--ray-address / set RAY_ADDRESS to a running cluster's address (HOST:6379 or http://HOST:8265)", ServeError)
    use_client_env(stack.client_env_for(ray_address))  # the local stack's token; {} for another cluster
    connect(ray_address)


@app.command("deploy")
def deploy(
    spec_file: str = typer.Argument(..., help="Serve spec (YAML/JSON; a ModelDeployment CR works too)."),
    target: Target = typer.Option(Target.local, "--target", "-t", help="local: the embedded stack; ray: --ray-address; k8s: a ModelDeployment CR."),
    ray_address: str | None = RAY_ADDRESS_OPTION,
    timeout: float = typer.Option(300.0, "--timeout", help="Seconds to wait until the deployment runs."),
    keep_failed: bool = typer.Option(False, "--keep-failed", help="Keep a new deployment that failed (to inspect it); by default it is removed."),
    output: OutputFormat = OUTPUT_OPTION,
    namespace: str = NAMESPACE_OPTION,
    kubeconfig: str = KUBECONFIG_OPTION,
    context: str = CONTEXT_OPTION,
    operator_timeout: float = OPERATOR_TIMEOUT_OPTION,
) -> None:
    """Build a Ray Serve application from SPEC_FILE and wait until it serves (k8s: create or update
    its ModelDeployment; the operator rolls it out)."""
    from llmplatform.specs import load_spec

    spec = load_spec(spec_file, kind="serve")
    if target == Target.k8s:
        from llmplatform.backends import k8s

        row = k8s.apply_deployment(spec, namespace=namespace, kubeconfig=kubeconfig, context=context, operator_timeout_s=operator_timeout)
        emit(row, output, text=f"ModelDeployment {row['namespace']}/{row['name']} {row['action']} (phase {row['phase']}); the operator "
                              f"rolls it out: `platformctl serve status {row['name']} --target k8s -n {row['namespace']}`")
        return
    if target == Target.ray and not ray_address:
        raise ServeError("--target ray needs --ray-address (or $RAY_ADDRESS)")
    from llmplatform.backends.serving import deploy_spec

    _connect(ray_address, start_local=target == Target.local)
    lines, progress = deploy_progress(f"deploying {spec.name}", output)
    with lines:
        result = deploy_spec(spec, target=target.value, timeout_s=timeout, keep_failed=keep_failed, progress=progress)
    emit(result, output, text=f"deployed {spec.name}: {result['status']} at {result['url']}\n"
                              f"try: platformctl serve chat {spec.name} \"Hello\"")


def _kube(namespace: str | None, kubeconfig: str | None, context: str | None) -> dict:
    return {"namespace": namespace, "kubeconfig": kubeconfig, "context": context}


@app.command("status")
def status(
    name: str | None = typer.Argument(None, help="Deployment name; all when omitted."),
    target: Target = TARGET_OPTION,
    ray_address: str | None = RAY_ADDRESS_OPTION,
    api_key: str | None = typer.Option(None, "--api-key", envvar="PLATFORM_API_KEY", help="Bearer key when auth is on (engine details)."),
    output: OutputFormat = OUTPUT_OPTION,
    namespace: str = NAMESPACE_OPTION,
    kubeconfig: str = KUBECONFIG_OPTION,
    context: str = CONTEXT_OPTION,
) -> None:
    """Replicas and health, engine, base model, adapters loaded, registry versions, URL
    (k8s: the ModelDeployment's phase, served version, endpoint, RayService)."""
    if target == Target.k8s:
        from llmplatform.backends import k8s

        kube = _kube(namespace, kubeconfig, context)
        if name is None:
            emit(k8s.list_deployments(**kube), output, columns=K8S_COLUMNS)
            return
        row = k8s.get_deployment(name, **kube)
        emit(row, output, text="\n".join(f"{k:<14} {v}" for k, v in row.items() if v is not None))
        return
    from llmplatform.serving import app as serving

    _connect(ray_address)
    names = [name] if name else [r["name"] for r in serving.list_deployments()]
    rows = [serving.status(n, api_key) for n in names]
    if output == OutputFormat.json:
        emit(rows[0] if name else rows, output)
        return
    table = []
    for r in rows:
        eng = r.get("engine") or {}
        replicas = ", ".join(f"{d}: {'/'.join(f'{k} {v}' for k, v in x['replicas'].items())}" for d, x in r["deployments"].items())
        versions = ", ".join(f"{k.removeprefix('models:/')}=v{v}" for k, v in (r.get("served_versions") or {}).items())
        table.append({"name": r["name"], "status": r["status"], "replicas": replicas, "engine": eng.get("engine"),
                      "tp": eng.get("tensor_parallel"), "base": r.get("base_model"),
                      "adapters": ",".join(eng.get("adapters_loaded") or []) or None, "registry": versions or None,
                      "cold start": _cold_start(r.get("last_cold_start")), "url": r["url"]})
    emit(table, output, columns=["name", "status", "replicas", "engine", "tp", "base", "adapters", "registry", "cold start", "url"])
    versions = [v for r in rows for v in version_rows(r)]
    if versions:
        typer.echo("\nper version (TTFT over the last 5 min):")
        typer.echo(render_table(versions, ["deployment", "version", "weight", "requests", "errors", "ttft_p50_s", "ttft_p95_s", "tokens"]))


def version_rows(status: dict) -> list[dict]:
    """`serve status`'s per-version rows: canary weights (holder = the rest) and each version's numbers."""
    weights: dict[str, float] = {}
    for ref, c in (status.get("canaries") or {}).items():
        name = ref.removeprefix("models:/").split("@")[0]
        weights[f"{name}/{c['version']}"] = c["weight"]
        weights[f"{name}/{c['baseline']}"] = 100 - c["weight"]
    rows = []
    for key, v in sorted((status.get("versions") or {}).items()):
        rows.append({"deployment": status["name"], "version": key, "weight": f"{weights[key]:g}%" if key in weights else None,
                     "requests": v["requests"], "errors": v["errors"], "tokens": v["tokens"],
                     "ttft_p50_s": round(v["ttft_p50_s"], 3) if v.get("ttft_p50_s") is not None else None,
                     "ttft_p95_s": round(v["ttft_p95_s"], 3) if v.get("ttft_p95_s") is not None else None})
    return rows


def _cold_start(last: dict | None) -> str | None:
    """The last request held while an engine replica started: its wait, and when."""
    if not last:
        return None
    return f"{last['waited_s']:.1f}s at {time.strftime('%H:%M:%S', time.localtime(last['at']))}"


@app.command("list")
def list_(target: Target = TARGET_OPTION, ray_address: str | None = RAY_ADDRESS_OPTION, output: OutputFormat = OUTPUT_OPTION,
          namespace: str = NAMESPACE_OPTION, kubeconfig: str = KUBECONFIG_OPTION, context: str = CONTEXT_OPTION) -> None:
    """Deployments on the cluster (k8s: the ModelDeployments of a namespace)."""
    if target == Target.k8s:
        from llmplatform.backends import k8s

        emit(k8s.list_deployments(**_kube(namespace, kubeconfig, context)), output, columns=K8S_COLUMNS)
        return
    from llmplatform.serving.app import list_deployments

    _connect(ray_address)
    emit(list_deployments(), output, columns=["name", "status", "replicas", "url"])


@app.command("delete")
def delete(name: str = typer.Argument(...), target: Target = TARGET_OPTION, ray_address: str | None = RAY_ADDRESS_OPTION,
           output: OutputFormat = OUTPUT_OPTION, namespace: str = NAMESPACE_OPTION, kubeconfig: str = KUBECONFIG_OPTION,
           context: str = CONTEXT_OPTION, operator_timeout: float = OPERATOR_TIMEOUT_OPTION) -> None:
    """Remove a deployment (its replicas and placement groups; k8s: the ModelDeployment, and with it
    its RayService and Ray cluster)."""
    if target == Target.k8s:
        from llmplatform.backends import k8s

        row = k8s.delete_deployment(name, **_kube(namespace, kubeconfig, context), wait_s=operator_timeout)
        ref = f"ModelDeployment {row['namespace']}/{name}"
        emit(row, output, text=f"deleted {ref} (its RayService and Ray cluster follow)" if row["gone"] else
             f"deleting {ref}: still there after {operator_timeout:g}s, waiting for the operator's finalizer; "
             f"`kubectl get modeldeployment {name} -n {row['namespace']}` shows it")
        return
    from llmplatform.serving.app import delete as run_delete

    _connect(ray_address)
    run_delete(name)
    emit({"name": name, "gone": True}, output, text=f"deleted {name}")


def _chat_url_k8s(name: str, url: str | None, kube: dict) -> str:
    """The k8s chat base URL: the CR's endpoint (or --url), checked reachable with the port-forward fix."""
    from llmplatform.backends import k8s
    from llmplatform.reach import require_reachable

    row = k8s.get_deployment(name, **kube)
    base = k8s.chat_base_url(row, url)
    if url is None:
        require_reachable(base, f"ModelDeployment {row['namespace']}/{name}'s endpoint (cluster DNS)", k8s.port_forward_hint(row), ServeError)
    return base


@app.command("chat")
def chat(
    name: str = typer.Argument(..., help="Deployment name."),
    message: str = typer.Argument(..., help="The user message."),
    system: str | None = typer.Option(None, "--system", help="System prompt."),
    model: str | None = typer.Option(None, "--model", help="Model id (default: the deployment's default model); e.g. BASE:ADAPTER, NAME@ALIAS."),
    max_tokens: int = typer.Option(256, "--max-tokens"),
    temperature: float = typer.Option(0.0, "--temperature"),
    target: Target = TARGET_OPTION,
    ray_address: str | None = RAY_ADDRESS_OPTION,
    api_key: str | None = typer.Option(None, "--api-key", envvar="PLATFORM_API_KEY", help="Bearer key when auth is on."),
    url: str | None = typer.Option(None, "--url", help="k8s: the serve Service's address from here, e.g. http://127.0.0.1:8000 after "
                                                       "`kubectl port-forward svc/NAME-serve-svc 8000:8000` (default: the CR's status.endpoint, "
                                                       "cluster DNS)."),
    namespace: str = NAMESPACE_OPTION,
    kubeconfig: str = KUBECONFIG_OPTION,
    context: str = CONTEXT_OPTION,
) -> None:
    """Stream one chat answer to the terminal."""
    from llmplatform.serving import app as serving

    if target == Target.k8s:
        url = _chat_url_k8s(name, url, _kube(namespace, kubeconfig, context))
    else:
        _connect(ray_address)
        url = serving.status(name, api_key)["url"]
    try:
        for delta in serving.chat_stream(url, model or name, message, system, max_tokens, temperature, api_key):
            typer.echo(delta, nl=False)
    except Exception as exc:  # openai.APIError and friends: show the server's message
        raise ServeError(f"{url}: {exc}") from exc
    typer.echo("")
