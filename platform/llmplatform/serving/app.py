"""Build, deploy and manage serving applications on Ray Serve.

`build_app(args)` is the import path KubeRay's RayService uses
(`import_path: llmplatform.serving.app:build_app`, `args:` = the resolved serve plan): an
OpenAI ingress bound to an engine deployment whose replicas reserve a tensor-parallel placement
group, or (topology `colocated`) one ingress deployment that holds the engine and the group.
`deploy`, `status`, `list_deployments`, `delete` drive a running Ray cluster (the local stack
or any Ray address); `chat_stream` and `ask` are the client side, used by `platformctl
serve chat` and by demos that check a fine-tuned adapter's answers through the endpoint.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import urllib.error
import urllib.request
from typing import Callable, Iterator

from llmplatform.errors import ServeError
from llmplatform.resolve import Resolved
from llmplatform.serving.adapters import check_local_adapters, locate_base
from llmplatform.serving.environment import replica_env
from llmplatform.serving.placement import colocated_options, engine_options, ingress_options
from llmplatform.specs import ServeSpec

log = logging.getLogger(__name__)
READY_TIMEOUT_S = 300.0


def cluster_accelerators(accelerator: str | None) -> tuple[int | None, int | None]:
    """(most `accelerator` units on one alive node, units in all) of the connected cluster; None if unknown."""
    if not accelerator:
        return None, None
    import ray

    if not ray.is_initialized():
        return None, None
    counts = [n["Resources"].get(accelerator, 0) for n in ray.nodes() if n.get("Alive")]
    if not counts or max(counts) <= 0:
        return None, int(sum(counts)) if counts else None
    return int(max(counts)), int(sum(counts))


def build_app(args: dict):
    """The Serve application for a resolved serve plan (RayService `import_path` target; `args` is
    the document `platformctl spec resolve --output json` prints). Nothing is planned here."""
    from llmplatform.serving.ingress import OpenAIIngress
    from llmplatform.serving.keys import env_keys, format_line
    from llmplatform.serving.limits import RateLimiter
    from llmplatform.serving.replica import EngineReplica

    plan = Resolved.from_dict(args, "serve application args")
    base_dir = locate_base(plan["base_model"])
    env = replica_env(os.environ, plan["engine"])
    # Keys from the deployer's env travel as hashes; the keys file (plan["api_keys_file"]) is read,
    # and re-read when it changes, by each ingress replica, so a revoked key stops working.
    # They travel as keys-file lines (hash, name, limits). Per-key limits are counted by one
    # `limiter` deployment that every ingress replica asks (llmplatform.serving.limits).
    hashes = sorted(format_line(h, ident) for h, ident in env_keys(plan.spec.auth).items()) if plan.spec.auth.enabled else []
    limiter = RateLimiter.bind() if plan.spec.auth.enabled else None
    doc = plan.to_dict()

    def with_env(opts: dict) -> dict:
        return {**opts, "ray_actor_options": {**opts["ray_actor_options"], "runtime_env": {"env_vars": env}}}

    if plan["topology"] == "colocated":  # the ingress builds the engine itself (engine=None)
        return OpenAIIngress.options(**with_env(colocated_options(plan))).bind(doc, None, base_dir, hashes, limiter)
    engine_app = EngineReplica.options(**with_env(engine_options(plan))).bind(doc, base_dir)
    return OpenAIIngress.options(**with_env(ingress_options(plan.spec))).bind(doc, engine_app, base_dir, hashes, limiter)


# ---------------------------------------------------------------------------- cluster side


def connect(ray_address: str | None) -> None:
    import ray

    if not ray.is_initialized():
        ray.init(address=ray_address, namespace="llm-platform", log_to_driver=False, logging_level=logging.WARNING)


def ensure_serve(http_port: int | None = None) -> str:
    """Start Serve's HTTP proxy on 127.0.0.1 if it isn't running; return its base URL."""
    from ray import serve

    try:
        from ray.serve.context import _get_global_client

        client = _get_global_client()
        if client is not None:
            return _proxy_url()
    except Exception:
        pass
    port = http_port or int(os.environ.get("PLATFORM_SERVE_PORT", 0)) or _free_local_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return _proxy_url()


def _free_local_port() -> int:
    """A port free on 127.0.0.1 right now (bind port 0); Serve binds it at once."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _proxy_url() -> str:
    import ray
    from ray.serve._private.constants import SERVE_NAMESPACE

    controller = ray.get_actor("SERVE_CONTROLLER_ACTOR", namespace=SERVE_NAMESPACE)
    config = ray.get(controller.get_http_config.remote())
    host = "127.0.0.1" if config.host in ("0.0.0.0", "") else config.host
    return f"http://{host}:{config.port}"


def _route_prefix(spec: ServeSpec) -> str:
    """`/` unless another application already holds it; then `/<name>`."""
    from ray import serve

    if spec.route_prefix != "/":
        return spec.route_prefix
    for name, prefix in _route_prefixes().items():
        if name != spec.name and prefix == "/":
            return f"/{spec.name}"
    return "/"


def _route_prefixes() -> dict[str, str | None]:
    """Application name -> HTTP route prefix, from the Serve controller."""
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details() or {}
    return {name: app.get("route_prefix") for name, app in (details.get("applications") or {}).items()}


def deploy(plan: Resolved, *, http_port: int | None = None, timeout_s: float = READY_TIMEOUT_S, keep_failed: bool = False,
           progress: Callable[[dict], None] | None = None) -> dict:
    """Deploy (or update) a resolved serve plan on the connected Ray cluster and wait until it is
    RUNNING; returns its status dict. `llmplatform.backends.serving.deploy_spec` resolves a spec first.

    A replica whose constructor raises fails the deploy at once with that exception (Serve would
    retry it until the timeout). A new application that fails or times out is deleted again
    unless `keep_failed`; an update of an existing one is left to Serve's rollback. `progress`
    gets a `deploy_snapshot` each poll (state and replica states, for the CLI's live line)."""
    from ray import serve
    from ray.serve.api import RunTarget

    spec = plan.require().spec
    base_dir = locate_base(plan["base_model"])
    problems = check_local_adapters(spec, base_dir)
    if problems:
        raise ServeError(f"deployment {spec.name!r} refused; adapters that don't fit:\n  - " + "\n  - ".join(problems))
    ensure_serve(http_port)
    is_new = spec.name not in serve.status().applications
    app = build_app(plan.to_dict())
    serve.run_many([RunTarget(target=app, name=spec.name, route_prefix=_route_prefix(spec))],
                   wait_for_ingress_deployment_creation=False, wait_for_applications_running=False)
    started = time.time()
    deadline = started + timeout_s
    while True:
        app_status = serve.status().applications.get(spec.name)
        state = str(getattr(app_status, "status", "")).rsplit(".", 1)[-1]
        if progress is not None:
            progress(deploy_snapshot(app_status, time.time() - started))
        if state == "RUNNING":
            return status(spec.name, _any_key(spec))
        if state in ("DEPLOY_FAILED", "UNHEALTHY") or (app_status is not None and replica_start_failed(app_status)):
            _give_up(spec.name, is_new and not keep_failed, f"deployment {spec.name!r} failed: {failure_reason(app_status)}.")
        if time.time() > deadline:
            _give_up(spec.name, is_new and not keep_failed,
                     f"deployment {spec.name!r} not running after {timeout_s:.0f} s (state {state}): "
                     f"{_deployment_messages(app_status)}. Check free CPUs/GPUs for the placement group "
                     "(`ray status`), or over-subscribe CPUs with `ray start --num-cpus`.")
        time.sleep(0.5)


def _give_up(name: str, remove: bool, message: str) -> None:
    """Raise ServeError(message), deleting the application first when `remove`."""
    from ray import serve

    if remove:
        serve.delete(name)
        raise ServeError(f"{message} The application was removed (keep a failed one for inspection with --keep-failed).")
    raise ServeError(f"{message} The full traceback is in `platformctl serve status {name} --output json`; "
                     f"remove it with `platformctl serve delete {name}`.")


def deploy_snapshot(app_status, elapsed_s: float) -> dict:
    """{state, elapsed_s, deployments: {name: {status, replicas: {STATE: n}}}} of an application
    status (None before Serve lists it: state PENDING)."""
    if app_status is None:
        return {"state": "PENDING", "elapsed_s": elapsed_s, "deployments": {}}
    deployments = {name: {"status": str(d.status).rsplit(".", 1)[-1],
                          "replicas": {str(k).rsplit(".", 1)[-1]: v for k, v in d.replica_states.items()}}
                   for name, d in app_status.deployments.items()}
    return {"state": str(app_status.status).rsplit(".", 1)[-1], "elapsed_s": elapsed_s, "deployments": deployments}


def replica_start_failed(app_status) -> bool:
    """Whether a replica of some deployment raised in its constructor (Serve then retries it)."""
    return any((d.message or "").startswith(REPLICA_START_FAILED) for d in app_status.deployments.values())


def _any_key(spec: ServeSpec) -> str | None:
    """A plain key from the deploying environment, to read the new deployment's details."""
    if spec.auth.enabled and spec.auth.api_keys_env:
        keys = [k for k in os.environ.get(spec.auth.api_keys_env, "").split(",") if k and not k.startswith("sha256:")]
        return keys[0] if keys else None
    return None


REPLICA_START_FAILED = "A replica failed to start"  # Serve's deployment message, the traceback follows


def failure_reason(app_status) -> str:
    """Why an application failed, in one line: Serve's summary ("Failed to update the deployments
    ['ingress']") plus, per failed deployment, the exception its replicas raised (the last line
    of the traceback Serve keeps), e.g. "ModuleNotFoundError: No module named 'vllm'"."""
    parts = [(app_status.message or "").strip()]
    for name, dep in app_status.deployments.items():
        state = str(dep.status).rsplit(".", 1)[-1]
        lines = [line.strip() for line in (dep.message or "").splitlines() if line.strip()]
        if (state in ("DEPLOY_FAILED", "UNHEALTHY") or (dep.message or "").startswith(REPLICA_START_FAILED)) and lines:
            parts.append(f"{name}: {lines[-1]}")
    return " ".join(p for p in parts if p) or "no reason reported"


def _deployment_messages(app_status) -> str:
    if app_status is None:
        return "no status yet"
    return "; ".join(f"{n}: {d.status} {d.message}".strip() for n, d in app_status.deployments.items())


def _url_for(name: str) -> str:
    prefix = (_route_prefixes().get(name) or "/").rstrip("/")
    return _proxy_url() + prefix


def status(name: str, api_key: str | None = None) -> dict:
    """Replicas and health, engine, base model, adapters loaded, registry versions served, URL.

    `api_key` (default `$PLATFORM_API_KEY`) is needed for the engine details when auth is on."""
    from ray import serve

    app = serve.status().applications.get(name)
    if app is None:
        raise ServeError(f"no serving deployment named {name!r}; `platformctl serve list` shows what runs")
    deployments = {}
    for dname, d in app.deployments.items():
        deployments[dname] = {"status": str(d.status).rsplit(".", 1)[-1], "replicas": {str(k).rsplit(".", 1)[-1]: v for k, v in d.replica_states.items()},
                              "message": d.message}
    url = _url_for(name)
    out = {"name": name, "status": str(app.status).rsplit(".", 1)[-1], "url": url + "/v1", "deployments": deployments}
    if out["status"] == "RUNNING":
        try:
            out.update(http_json(url + "/v1/deployment", timeout=15, api_key=api_key or os.environ.get("PLATFORM_API_KEY")))
        except ServeError as exc:
            out["detail_error"] = str(exc)
    return out


def list_deployments() -> list[dict]:
    from ray import serve

    rows = []
    for name, app in serve.status().applications.items():
        rows.append({"name": name, "status": str(app.status).rsplit(".", 1)[-1], "url": _url_for(name) + "/v1",
                     "replicas": sum(sum(d.replica_states.values()) for d in app.deployments.values())})
    return rows


def delete(name: str) -> None:
    from ray import serve

    if name not in serve.status().applications:
        raise ServeError(f"no serving deployment named {name!r}; `platformctl serve list` shows what runs")
    serve.delete(name)


# ---------------------------------------------------------------------------- client side


def http_json(url: str, payload: dict | None = None, timeout: float = 60, api_key: str | None = None) -> dict:
    data = json.dumps(payload).encode() if payload is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        raise ServeError(f"{url}: HTTP {exc.code}: {exc.read().decode(errors='replace')[:500]}") from exc
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        raise ServeError(f"{url}: {exc}") from exc


def chat_stream(base_url: str, model: str, message: str, system: str | None = None, max_tokens: int = 256,
                temperature: float = 0.0, api_key: str | None = None) -> Iterator[str]:
    """Yield text deltas of one streamed chat completion (for `serve chat`)."""
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key=api_key or "none", max_retries=0)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": message}]
    for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                temperature=temperature, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            yield chunk.choices[0].delta.content


def ask(base_url: str, model: str, questions: list[str], *, system: str | None = None, max_tokens: int = 32,
        api_key: str | None = None, concurrency: int = 8) -> list[str]:
    """Greedy answers to `questions` through the endpoint, in order (demo: held-out accuracy of an adapter)."""
    from concurrent.futures import ThreadPoolExecutor

    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key=api_key or "none", max_retries=2)

    def one(q: str) -> str:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": q}]
        r = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0.0)
        return (r.choices[0].message.content or "").strip()

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        return list(pool.map(one, questions))
