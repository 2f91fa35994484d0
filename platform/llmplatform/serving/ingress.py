"""The OpenAI-compatible HTTP ingress (FastAPI on Ray Serve), the same whichever engine runs.

Per request: API key -> its identity (SHA-256 hashes; the plan's `api_keys_file`, on
Kubernetes the mounted Secret, is re-read when it changes; `accounting.py`) -> body size (413 above
`limits.max_request_bytes`, before reading it) -> body validation (400 naming the field; a field
the engine does not honour is refused naming the field and the engine, per `openai_schema.FIELDS`; large
bodies are parsed and tokenized on a worker thread, never on the event loop) -> model lookup (404
unknown, 400 incompatible adapter, 503 + Retry-After when the registry does not answer within
`limits.registry_lookup_timeout_s`) -> Llama 2 chat template and token
count (400 when prompt + max_tokens exceed max_model_len, with both numbers) -> the key's
per-minute limits, shared by all replicas (429 + Retry-After) -> admission against
the bounded queue (429 + Retry-After) -> the engine deployment, routed by adapter id (Serve model
multiplexing), or the engine in this replica (topology `colocated`) -> JSON or SSE ending in
`data: [DONE]`. A deadline (`request_timeout_s`) bounds every request. When the engine replica dies,
a request that has no token yet is retried on a healthy replica until its deadline; one that has
gets a JSON 503, or (streaming) an SSE error event and `data: [DONE]`. Prometheus metrics at `/metrics`,
in vLLM's names (llmplatform.serving.metrics). Each finished or refused request is counted per key,
model and adapter in the usage store (`usage.py`), written off the request path.
"""


import asyncio
import json
import logging
import re
import threading
import time

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve

from llmplatform.chat_template import ensure_chat_template, render_prompt
from llmplatform.serving import canary as C
from llmplatform.serving import errors as E
from llmplatform.serving import openai_schema as S
from llmplatform.serving.adapters import AdapterTable, Target, TargetError, default_canary_reader, default_resolver
from llmplatform.serving.keys import KeyIdentity, KeysFile, env_keys, hash_key, parse_keys, parse_keys_table  # noqa: F401 (re-exported)
from llmplatform.serving.accounting import Accounting
from llmplatform.serving.coldstart import ColdStarts, running_engine_replicas
from llmplatform.serving.metrics import ServeMetrics, counted_lookups
from llmplatform.resolve import Resolved, served_spec

log = logging.getLogger(__name__)
# /docs and /openapi.json are routes of the deployment, so they follow `auth` like /v1 does
api = FastAPI(title="llm-platform OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None)
INLINE_BODY_BYTES = 64 * 1024  # bodies up to this are parsed and tokenized on the event loop (~1 ms)
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # a JSON escape of a UTF-16 surrogate
REPLICA_GONE_BACKOFF_S = (0.2, 0.5, 1.0)  # waits between retries of a request whose replica died before its first token
ENGINE_METRICS_TIMEOUT_S = 2.0  # /metrics waits this long for the engine's gauges


@api.exception_handler(E.ApiError)
async def _api_error(_request: Request, exc: E.ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


# ---------------------------------------------------------------------------- API keys
# Key identities, the keys file and its format: llmplatform.serving.keys.


def _replica_id() -> str:
    """This Serve replica's id (for the usage store's replica rows), "" outside a replica."""
    try:
        return serve.get_replica_context().replica_tag
    except Exception:
        return ""


# ---------------------------------------------------------------------------- engine failures

# What a failing engine call raises when the replica process is gone (or being replaced).
REPLICA_GONE = ("RayActorError", "ReplicaUnavailableError", "DeploymentUnavailableError", "ActorUnavailableError",
                "TaskCancelledError", "RequestCancelledError")


def engine_failure(exc: Exception) -> E.ApiError:
    """The JSON error for an exception from the engine stream: 503 (retryable) when its replica died,
    else 500 in OpenAI's shape, logged with its traceback (an engine bug, not the client's)."""
    if any(cls.__name__ in REPLICA_GONE for cls in type(exc).__mro__):
        log.warning("engine replica failed mid-request: %s: %s", type(exc).__name__, str(exc)[:300])
        return E.replica_failed(f"The engine replica serving this request failed ({type(exc).__name__}); it is being replaced. Retry the request.")
    log.error("engine raised during a request", exc_info=exc)
    return E.ApiError(500, f"The engine failed: {type(exc).__name__}", "server_error", None, "engine_error")


# ---------------------------------------------------------------------------- the deployment
# `@serve.deployment` pickles the class by value when it is decorated (ray/serve/api.py ->
# ReplicaConfig.create): the replica sees only the module globals defined above this line. Anything the
# class uses must be defined before it (tests/unit/serving/test_api_surface.py checks).


@serve.deployment(name="ingress")
@serve.ingress(api)
class OpenAIIngress:
    def __init__(self, plan: dict, engine, base_dir: str, key_hashes: list[str] | None = None, limiter=None):
        from transformers import AutoTokenizer

        self.plan = Resolved.from_dict(plan, "ingress args")
        self.spec = self.plan.spec
        self.local_engine = None
        if engine is None:  # topology colocated: the engine lives in this replica
            from llmplatform.serving.replica import EngineCore, LocalEngine

            self.local_engine = EngineCore(plan, base_dir)
            engine = LocalEngine(self.local_engine)
        self.engine = engine
        self.base_name = self.plan["base_model"]
        self.tokenizer = ensure_chat_template(AutoTokenizer.from_pretrained(base_dir))
        self.metrics = ServeMetrics(self.base_name, engine_publishes_vllm=self.plan["engine"] == "vllm")
        served = served_spec(self.plan)
        self.table = AdapterTable(served, self.base_name, base_dir, miss_ttl_s=self.plan["registry_poll_s"],
                                  resolver=counted_lookups(default_resolver(served.tracking_uri), self.metrics.registry_lookups),
                                  canary_reader=default_canary_reader(served.tracking_uri))
        self.tracking_uri = served.tracking_uri
        self.version_stats = C.VersionStats()  # per served version: requests, errors, TTFT, tokens (canary guard)
        self.canary_events: list[dict] = []
        # key identities, per-key limits (the deployment's `limiter`) and the usage store
        self.accounting = Accounting(self.plan, key_hashes, limiter, self.metrics, _replica_id())
        self.inflight = 0
        self.limit = self.spec.limits.max_concurrent_requests + self.spec.limits.max_queued_requests
        self.started = time.time()
        self.cold_starts = ColdStarts()
        self.promotions: list[dict] = []
        self._stop = threading.Event()
        threading.Thread(target=self._poll_registry, name="registry-poll", daemon=True).start()

    def __del__(self):
        self._stop.set()
        if hasattr(self, "accounting"):
            self.accounting.close()  # writes the usage tallied since the last flush

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Topology colocated: the engine in this replica reports for autoscaling (EngineCore's hook)."""
        return self.local_engine.record_autoscaling_stats() if self.local_engine is not None else {}

    def check_health(self) -> None:
        if self.local_engine is not None:
            self.local_engine.check_health()

    def _poll_registry(self) -> None:
        while not self._stop.wait(self.plan["registry_poll_s"]):
            for ref, old, new in self.table.refresh():
                log.warning("registry: %s moved from version %s to %s", ref, old, new)
                self.promotions.append({"ref": ref, "from": old, "to": new, "at": time.time()})
            self._guard_canaries()

    def _guard_canaries(self) -> None:
        """The canary guard (llmplatform.serving.canary): abort or complete a canary in the registry."""
        from llmplatform.registry import canary as registry_canary
        from llmplatform.registry.refs import parse_ref

        for ref, split in self.table.canaries().items():
            parsed = parse_ref(ref)
            action = C.guard_actions(parsed.name, split.state, self.version_stats, time.time())
            if action is None:
                continue
            kind, why = action
            actor = f"guard@{self.spec.name}"
            try:
                if kind == "abort":
                    registry_canary.abort(self.tracking_uri, parsed.name, parsed.alias, reason=why, actor=actor, missing_ok=True)
                    self.table.drop_canary(ref)  # at once; the registry already says so
                else:
                    registry_canary.complete(self.tracking_uri, parsed.name, parsed.alias, split.state.version,
                                             actor=actor, reason=why)
            except Exception as exc:  # another replica acted first, or the registry is down: next poll decides
                log.warning("canary guard could not %s %s: %s: %s", kind, ref, type(exc).__name__, str(exc)[:300])
                continue
            log.warning("canary guard: %s %s v%s: %s", kind, ref, split.state.version, why)
            self.canary_events.append({"ref": ref, "action": kind, "version": split.state.version, "why": why, "at": time.time()})

    # ------------------------------------------------------------------ routes

    @api.get("/healthz")
    async def healthz(self) -> dict:
        """Always 200 while the replica serves: a registry outage is `degraded` (loaded models keep serving)."""
        outage = self.table.registry_health()
        if outage is None:
            return {"status": "ok"}
        return {"status": "degraded", "registry": {"status": "unavailable", **outage}}

    @api.get("/metrics")
    async def metrics(self, request: Request) -> PlainTextResponse:
        if not self.spec.auth.public_metrics:
            self._auth(request)
        return PlainTextResponse(self.metrics.render(await self._engine_metrics()).decode(), media_type="text/plain; version=0.0.4")

    async def _engine_metrics(self) -> dict:
        """The engine's metrics snapshot (`EngineCore.metrics`); {} when it doesn't answer within 2 s,
        so /metrics still answers while the engine replica is down. Scaled to zero: {} without asking
        (a scrape must not start a replica)."""
        if await self._engine_at_zero():
            return {}
        try:
            return await asyncio.wait_for(self.engine.metrics.remote(), ENGINE_METRICS_TIMEOUT_S)
        except Exception as exc:
            self.metrics.engine_scrape_errors.inc()
            log.info("engine metrics unavailable: %s: %s", type(exc).__name__, str(exc)[:200])
            return {}

    async def _engine_at_zero(self) -> bool:
        """`min_replicas: 0` and no engine replica running: status and scrapes leave it at zero."""
        if self.local_engine is not None or self.plan["replicas"]["min"] > 0:
            return False
        return await asyncio.to_thread(running_engine_replicas, self.spec.name) == 0

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request) -> JSONResponse:
        self._auth(request)
        return JSONResponse(api.openapi())

    @api.get("/docs", include_in_schema=False)
    async def docs(self, request: Request) -> HTMLResponse:
        self._auth(request)
        return get_swagger_ui_html(openapi_url=request.scope.get("root_path", "") + "/openapi.json", title=api.title)

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict:
        self._auth(request)
        cards = [S.model_card(r["id"], "llm-platform", kind=r["kind"], version=r.get("version"), root=self.base_name)
                 for r in self.table.names()]
        return {"object": "list", "data": cards}

    @api.get("/v1/deployment")
    async def deployment(self, request: Request) -> dict:
        """Status for `platformctl serve status`: engine, base, adapters, registry versions."""
        self._auth(request)
        try:
            engine = {"replicas": 0} if await self._engine_at_zero() else await asyncio.wait_for(self.engine.info.remote(), 10)
        except Exception as exc:  # status must answer even when the engine is down
            engine = {"error": f"{type(exc).__name__}: {exc}"}
        return {"name": self.spec.name, "base_model": self.base_name, "engine": engine,
                "served_versions": self.table.served_versions(), "refused": self.table.refused(),
                "promotions": self.promotions[-20:], "in_flight": self.inflight, "limit": self.limit,
                "canaries": {ref: {"version": sp.state.version, "weight": sp.state.weight, "baseline": sp.state.baseline,
                                   "guard": sp.state.guard.to_dict()} for ref, sp in self.table.canaries().items()},
                "canary_events": self.canary_events[-20:], "versions": self.version_stats.report(),
                "uptime_s": round(time.time() - self.started, 1), **self.cold_starts.status()}

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._handle(request, chat=True)

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._handle(request, chat=False)

    # ------------------------------------------------------------------ request path

    def _auth(self, request: Request) -> KeyIdentity:
        return self.accounting.identify(request.headers.get("authorization", ""))  # counts auth failures too

    async def _read_body(self, request: Request) -> bytes:
        """The body, refused with 413 as soon as it is known to exceed `limits.max_request_bytes`."""
        limit = self.spec.limits.max_request_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise E.too_large(int(declared), limit)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise E.too_large(None, limit)
            chunks.append(chunk)
        return b"".join(chunks)

    @staticmethod
    def _parse(raw: bytes, chat: bool, engine: str):
        try:
            body = json.loads(raw or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise E.bad_request(f"Request body is not valid JSON: {str(exc)[:200]}", None, "invalid_json") from None
        if not isinstance(body, dict):
            raise E.bad_request("Request body must be a JSON object.", None, "invalid_json")
        if SURROGATE_ESCAPE.search(raw):  # a lone surrogate is valid JSON but not text: the tokenizer can't encode it
            try:
                json.dumps(body, ensure_ascii=False).encode()
            except UnicodeEncodeError:
                raise E.bad_request("Request body contains a lone UTF-16 surrogate escape (\\ud800-\\udfff without its pair); "
                                    "send valid Unicode text.", None, "invalid_value") from None
        try:
            S.check_fields(body, S.CHAT if chat else S.COMPLETIONS, engine)  # every field works here or is refused
            return (S.ChatCompletionRequest if chat else S.CompletionRequest).model_validate(body, context={"engine": engine})
        except S.FieldRefused as exc:
            raise E.bad_request(str(exc), exc.field, "unsupported_field") from None
        except ValidationError as exc:
            raise E.from_validation(exc) from None

    @staticmethod
    async def _cpu(off_loop: bool, fn, *args):
        """`fn(*args)` on a worker thread when `off_loop`, else right here (a thread hop costs more than small work)."""
        return await asyncio.to_thread(fn, *args) if off_loop else fn(*args)

    def _prompt_ids(self, req, chat: bool) -> list[int]:
        max_len = self.spec.max_model_len
        if not chat:
            ids = req.prompt_token_ids()
            if ids is not None:
                if len(ids) > max_len:
                    raise E.context_too_long(len(ids), 1, max_len)
                if min(ids) < 0 or max(ids) >= len(self.tokenizer):
                    raise E.bad_request(f"prompt token ids must be in 0..{len(self.tokenizer) - 1}", "prompt", "invalid_value")
                return ids
            self._refuse_overlong(len(req.prompt_text()))
            return self.tokenizer(req.prompt_text()).input_ids
        messages = [{"role": m.template_role(), "content": m.text()} for m in req.messages]
        self._refuse_overlong(sum(len(m["content"]) for m in messages))
        try:
            text = render_prompt(self.tokenizer, messages)  # the template training masked its answers with
        except Exception as exc:  # jinja raises for e.g. roles out of order
            raise E.bad_request(f"messages: {exc}", "messages", "invalid_messages") from None
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def _refuse_overlong(self, chars: int) -> None:
        """400 without tokenizing when `chars` of text must be more tokens than max_model_len
        (no token covers more than `longest_token` characters), so a huge prompt costs no tokenizer time."""
        if not hasattr(self, "longest_token"):
            self.longest_token = max(len(t) for t in self.tokenizer.get_vocab()) + 1  # +1: the leading-space marker
        at_least = chars // self.longest_token
        if at_least > self.spec.max_model_len:
            raise E.prompt_too_long(at_least, chars, self.spec.max_model_len)

    async def _target(self, model: str, deadline: float) -> Target:
        """The model's Target; waits for the registry (off this loop, on the table's executor) at most
        `registry_lookup_timeout_s` and never past the request's deadline."""
        fut = self.table.lookup_future(model)
        wait = max(0.0, min(self.spec.limits.registry_lookup_timeout_s, deadline - time.monotonic()))
        if not fut.done():
            await asyncio.wait([asyncio.wrap_future(fut)], timeout=wait)
        try:
            return self.table.settle(fut, model, 0, waited=wait)  # done, or 503: never blocks this loop
        except TargetError as exc:
            retry = {"Retry-After": str(exc.retry_after_s)} if exc.retry_after_s else None
            raise E.ApiError(exc.status, str(exc), "invalid_request_error" if exc.status < 500 else "server_error", "model",
                             exc.code, retry) from None

    async def _handle(self, request: Request, chat: bool):
        endpoint = "chat" if chat else "completions"
        t0 = time.monotonic()
        model_label = "unknown"  # only names this deployment serves become label values
        ident, target = None, None
        try:
            ident = self._auth(request)
            raw = await self._read_body(request)
            off_loop = len(raw) > INLINE_BODY_BYTES  # JSON and tokenizer work on a large body would stall every stream
            req = await self._cpu(off_loop, self._parse, raw, chat, self.plan["engine"])
            target = await self._target(req.model, t0 + self.spec.limits.request_timeout_s)
            target = C.choose(target, req.user)  # a canary's candidate or the holder, sticky by `user`
            model_label = self.metrics.label(target.served_as)
            prompt_ids = await self._cpu(off_loop, self._prompt_ids, req, chat)
            max_tokens = req.wanted_tokens(min(self.spec.limits.default_max_tokens, self.spec.max_model_len - len(prompt_ids)))
            if max_tokens < 1 or len(prompt_ids) + max_tokens > self.spec.max_model_len:
                raise E.context_too_long(len(prompt_ids), max(max_tokens, 1), self.spec.max_model_len)
            await self.accounting.admit(ident)  # 429 when the key is over its per-minute limits
            if self.inflight >= self.limit:
                self.metrics.rejected.labels("queue_full").inc()
                raise E.overloaded(1 + self.inflight // max(1, self.spec.limits.max_concurrent_requests), self.inflight, self.limit)
            payload = {"prompt_ids": prompt_ids, "max_tokens": max_tokens, "temperature": req.temperature, "top_p": req.top_p,
                       "stop": req.stop_list(), "seed": req.seed, "adapter_id": target.adapter_id,
                       "adapter_path": target.adapter_path, "ignore_eos": req.ignore_eos, **self._engine_fields(req)}
            usage = self._usage_of(ident, target)
            response = await self._run(req, target, payload, chat, t0, model_label,
                                       usage=lambda p, c: self.accounting.finished(*usage, p, c))
            self.metrics.requests.labels(model_label, endpoint, "200").inc()
            return response
        except E.ApiError as exc:
            self.metrics.requests.labels(model_label, endpoint, str(exc.status)).inc()
            self.accounting.failed(*self._usage_of(ident, target))
            if target is not None and C.version_failed(exc.status, exc.code):  # the version failed it, not the client
                self.version_stats.record(self._stats_key(target), ok=False)
            raise

    def _usage_of(self, ident: KeyIdentity | None, target: Target | None) -> tuple:
        """(identity, base model, adapter name or "") under which a request's usage is recorded."""
        adapter = (target.served_as or target.model) if target is not None and target.adapter_id else ""
        return ident, self.base_name, adapter

    def _engine_fields(self, req) -> dict:
        try:
            return S.engine_fields(req, len(self.tokenizer), self.spec.limits.max_n)
        except S.FieldRefused as exc:
            raise E.bad_request(str(exc), exc.field, "invalid_value") from None

    def _echo(self, req, chat: bool) -> str:
        """The prompt that completions' `echo` puts before the text (token-id prompts decoded)."""
        if chat or not req.echo:
            return ""
        ids = req.prompt_token_ids()
        return self.tokenizer.decode(ids) if ids is not None else req.prompt_text()

    def _token_text(self, token_id: int) -> tuple[str, list[int]]:
        return S.token_text(self.tokenizer.convert_ids_to_tokens(token_id))

    def _logprobs(self, entries: list[dict] | None, chat: bool, offset: int = 0) -> dict | None:
        if entries is None:
            return None
        return S.chat_logprobs(entries, self._token_text) if chat else S.completion_logprobs(entries, self._token_text, offset)

    def _stats_key(self, target: Target) -> str:
        return target.adapter_id or self.base_name

    async def _run(self, req, target: Target, payload: dict, chat: bool, t0: float, label: str, usage=None):
        deadline = t0 + self.spec.limits.request_timeout_s
        self.inflight += 1
        self.metrics.in_flight.set(self.inflight)

        def start():
            return self.engine.options(stream=True, multiplexed_model_id=target.adapter_id or "").generate.remote(payload)

        stream = start()
        done = False

        async def next_event():
            if time.monotonic() >= deadline:
                raise asyncio.TimeoutError
            try:
                async with asyncio.timeout_at(deadline):  # a timer, not a task per token (the loop's clock is monotonic)
                    event = await stream.__anext__()
            except (asyncio.TimeoutError, StopAsyncIteration):
                raise
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is None or task.cancelling():  # this request is being cancelled (client gone)
                    raise
                raise E.replica_failed("The engine replica cancelled this request (it died or is stopping). Retry the request.") from None
            except Exception as exc:  # the engine replica died, or the engine raised
                raise engine_failure(exc) from exc
            if "error" in event:
                raise E.ApiError(event.get("status", 500) if event.get("status", 500) < 500 else 503, event["error"],
                                 "invalid_request_error" if event.get("status", 500) < 500 else "server_error", "model", event.get("code"))
            return event

        def finish():
            nonlocal done
            if not done:
                done = True
                self.inflight -= 1
                self.metrics.in_flight.set(self.inflight)
                try:
                    stream.cancel()
                except Exception as exc:  # the replica is gone already: nothing left to cancel
                    log.info("cancelling the engine stream failed: %s", exc)

        try:
            retries = 0
            while True:
                try:
                    first = await next_event()  # errors before the first token become HTTP statuses
                    break
                except E.ApiError as exc:  # no token sent yet: a dead replica's request runs again on a healthy one
                    wait = REPLICA_GONE_BACKOFF_S[min(retries, len(REPLICA_GONE_BACKOFF_S) - 1)]
                    if exc.code != "replica_unavailable" or time.monotonic() + wait >= deadline:
                        raise
                    retries += 1
                    stream.cancel()
                    await asyncio.sleep(wait)
                    stream = start()
        except asyncio.TimeoutError:
            finish()
            raise E.timed_out(self.spec.limits.request_timeout_s) from None
        except StopAsyncIteration:
            finish()
            raise E.unavailable("engine closed the stream before answering") from None
        except BaseException:
            finish()
            raise
        ttft = time.monotonic() - t0
        self.cold_starts.observe(first, time.time() - ttft)
        prompt_tokens = len(payload["prompt_ids"])
        self.metrics.first_token(label, ttft, prompt_tokens)

        async def events():
            event, seen, last = first, 0, time.monotonic()  # tokens counted so far; when the previous ones came
            counted = usage is None  # whether the usage store has this request
            try:
                while True:
                    yield event
                    n = event.get("completion_tokens", seen)
                    if n > seen:
                        now = time.monotonic()
                        self.metrics.tokens(label, n - seen, now - last if seen else None)  # None: the first tokens' gap is TTFT's
                        seen, last = n, now
                    if "finish_reason" in event:
                        if usage is not None:
                            counted = True
                            usage(event["prompt_tokens"], event["completion_tokens"])  # usage store + the key's token limit
                        self.metrics.finished(label, event, time.monotonic() - t0)
                        self.version_stats.record(self._stats_key(target), True, ttft, event.get("completion_tokens", seen))
                        return
                    event = await next_event()
            except BaseException as exc:  # client gone, deadline, engine failure: finished as vLLM's "abort"
                self.metrics.aborted(label)
                if isinstance(exc, (E.ApiError, asyncio.TimeoutError)):  # the version failed it (not the client)
                    self.version_stats.record(self._stats_key(target), False, ttft)
                raise
            finally:
                finish()
                if not counted:  # ended early (client gone, engine failed): the tokens generated so far
                    usage(prompt_tokens, seen)

        rid = S.new_id("chatcmpl" if chat else "cmpl")
        answered = C.answered_as(target, req.model)  # NAME/VERSION for registry versions
        version = {"x-platform-model-version": str(target.version)} if target.version is not None else {}
        if not req.stream:
            return await self._collect(events(), rid, req, chat, answered, version)
        return StreamingResponse(self._sse(events(), rid, req, chat, prompt_tokens, answered), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **version})

    async def _collect(self, events, rid: str, req, chat: bool, model: str, headers: dict) -> JSONResponse:
        texts = {i: [] for i in range(req.n)}  # choice -> text deltas
        logprobs = {i: ([] if req.top_k_logprobs() is not None else None) for i in range(req.n)}
        final = None
        try:
            async for ev in events:
                if "finish_reason" in ev:
                    final = ev
                    continue
                i = ev.get("index", 0)
                if ev.get("text"):
                    texts[i].append(ev["text"])
                if logprobs[i] is not None:
                    logprobs[i] += ev.get("logprobs", [])
        except asyncio.TimeoutError:
            raise E.timed_out(self.spec.limits.request_timeout_s) from None
        except StopAsyncIteration:
            raise E.replica_failed("engine closed the stream before finishing") from None
        build = S.chat_response if chat else S.completion_response
        finishes = {c["index"]: c["finish_reason"] for c in final.get("choices", [{"index": 0, "finish_reason": final["finish_reason"]}])}
        head = self._echo(req, chat)
        choice = S.chat_choice if chat else S.completion_choice
        choices = [choice(i, head + "".join(texts[i]), finishes[i], self._logprobs(logprobs[i], chat)) for i in range(req.n)]
        return JSONResponse(build(rid, model, choices[0].get("text", ""), final["finish_reason"], final["prompt_tokens"],
                                  final["completion_tokens"], choices), headers=headers)

    async def _sse(self, events, rid: str, req, chat: bool, prompt_tokens: int, model: str):
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"

        def data(payload: dict) -> str:
            return f"data: {json.dumps(payload)}\n\n"

        # Per token only the text is encoded: the chunk's JSON around it is built once per request.
        mark = f"@@{rid}@@"
        head, tail = json.dumps(S.chat_chunk(rid, model, {"content": mark}, None, created) if chat
                                else S.completion_chunk(rid, model, mark, None, created)).split(json.dumps(mark), 1)

        def text(delta: str) -> str:
            return f"data: {head}{json.dumps(delta)}{tail}\n\n"

        plain = req.n == 1 and req.top_k_logprobs() is None  # one choice, no logprobs: the template above
        offsets = {i: 0 for i in range(req.n)}  # completions' text_offset per choice

        def rich(ev: dict) -> str:
            i, lp = ev.get("index", 0), ev.get("logprobs")
            logprobs = self._logprobs(lp, chat, offsets[i]) if lp else None
            offsets[i] += len(ev.get("text", ""))
            if chat:
                return data(S.chat_chunk(rid, model, {"content": ev.get("text", "")}, None, created, i, logprobs))
            return data(S.completion_chunk(rid, model, ev.get("text", ""), None, created, i, logprobs))

        if chat:
            for i in range(req.n):
                yield data(S.chat_chunk(rid, model, {"role": "assistant", "content": ""}, None, created, i))
        elif req.echo:
            for i in range(req.n):
                yield data(S.completion_chunk(rid, model, self._echo(req, chat), None, created, i))
        try:
            async for ev in events:
                if "finish_reason" in ev:
                    for c in ev.get("choices", [{"index": 0, "finish_reason": ev["finish_reason"]}]):
                        if chat:
                            yield data(S.chat_chunk(rid, model, {}, c["finish_reason"], created, c["index"]))
                        else:
                            yield data(S.completion_chunk(rid, model, "", c["finish_reason"], created, c["index"]))
                    if req.include_usage():
                        yield data(S.usage_chunk(rid, model, obj, created, ev["prompt_tokens"], ev["completion_tokens"]))
                elif not plain and (ev.get("text") or ev.get("logprobs")):
                    yield rich(ev)
                elif ev.get("text"):
                    yield text(ev["text"])
        except (asyncio.TimeoutError, E.ApiError, StopAsyncIteration) as exc:
            err = exc if isinstance(exc, E.ApiError) else (
                E.timed_out(self.spec.limits.request_timeout_s) if isinstance(exc, asyncio.TimeoutError)
                else E.replica_failed("engine closed the stream before finishing"))
            yield data(err.body())
        except Exception as exc:  # whatever failed, the client gets an error event and [DONE], not a cut stream
            yield data(engine_failure(exc).body())
        yield "data: [DONE]\n\n"
