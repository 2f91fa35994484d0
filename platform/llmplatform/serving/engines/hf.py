"""The `hf` engine: transformers with continuous batching at every decode step.

A background thread owns the model. Each step it admits waiting requests (prefilled together,
left-padded), merges their KV cache into the running batch (left-padding the shorter cache),
decodes one token for every running sequence in a single forward pass, samples per request
(logit_bias, presence/frequency penalties, temperature, top_p, seed; logprobs from the raw
distribution; `json_object` through `json_constraint`), and drops finished or cancelled rows.
`n > 1` runs as n sequences (`fan_out`). So a request that arrives
while others are decoding joins at the next step instead of waiting for the batch to drain
(`min_admit` > 1, what evaluation jobs use, waits instead until that many rows are free, so one
prefill pass refills several rows).
LoRA adapters are peft adapters loaded into one `PeftModel`; a mixed batch runs with peft's
per-row `adapter_names`, so requests for different adapters (and the base) share each step.
In a partitioned local stack (llmplatform.cpus) the decode thread, and the OpenMP threads
it starts, run on the model CPUs while the replica's event loop stays on the front-end CPUs.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import AsyncIterator

import torch

from llmplatform import cpus
from llmplatform.serving.engines import EngineError, GenerationRequest, check_request, fan_out, json_constraint

BASE = "__base__"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(requested: str = "auto", cuda_available: bool | None = None) -> torch.device:
    """The replica's device: its first visible GPU when it has one (Ray Serve sets
    CUDA_VISIBLE_DEVICES to the replica's `num_gpus`), else the CPU."""
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    if requested == "auto":
        return torch.device("cuda", 0) if cuda else torch.device("cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not cuda:
        raise EngineError(f"device {requested!r}: this replica sees no CUDA GPU; give it one (resources.gpus_per_shard) or use 'auto'", 500, "engine_failure")
    return device


def pick_dtype(dtype: str, device: torch.device, bf16_supported: bool | None = None) -> torch.dtype:
    """`auto`: bfloat16 on a GPU that computes in it (else float16), float32 on CPU (fast kernels there)."""
    if dtype != "auto":
        if dtype not in _DTYPES:
            raise EngineError(f"dtype {dtype!r}: the transformers engine serves {', '.join(_DTYPES)} weights; use one of those or 'auto', "
                              "or engine: vllm for quantised weights", 500, "engine_failure")
        return _DTYPES[dtype]
    if device.type != "cuda":
        return torch.float32
    bf16 = torch.cuda.is_bf16_supported() if bf16_supported is None else bf16_supported
    return torch.bfloat16 if bf16 else torch.float16


def check_tensor_parallel(tensor_parallel: int, device: torch.device) -> None:
    """One replica of this engine runs on one GPU: a tensor-parallel group of GPUs needs vLLM."""
    if tensor_parallel > 1 and device.type == "cuda":
        raise EngineError(f"tensor_parallel={tensor_parallel}: the transformers engine runs a replica on one GPU; shard a model over "
                          "GPUs with engine: vllm (an image with vLLM), or fit one GPU (a larger GPU, dtype nf4/int8)", 500, "engine_failure")


@dataclass
class _Seq:
    req: GenerationRequest
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    adapter: str = BASE  # internal peft adapter name
    generator: torch.Generator | None = None
    out_ids: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of `text` already streamed
    finished: str | None = None
    cancelled: bool = False
    logprobs: list[dict] = field(default_factory=list)  # entries not yet streamed (GenerationRequest.logprobs)
    json_state: tuple | None = None  # json_constraint state when response_format is json_object
    arrived: float = field(default_factory=time.monotonic)  # reached this engine
    queue_time_s: float | None = None  # arrived -> admitted to the running batch (vLLM's request_queue_time)

    def emit(self, event: dict) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)


def _internal_name(adapter_id: str) -> str:
    """peft adapter names become module keys: no '.', '/', '@'."""
    return "a" + hashlib.sha1(adapter_id.encode()).hexdigest()[:12]


def _purge_adapter(model: torch.nn.Module, name: str) -> None:
    """Remove every trace of adapter `name` after peft failed to load it.

    peft drops the config of an adapter it could not build but leaves its name in the layers it
    reached (ranks, scalings), and when the adapter active on those layers is later deleted it picks
    that name as the new active one: the next adapter load then failed with KeyError(name)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    config = getattr(model, "peft_config", None)
    if isinstance(config, dict):
        config.pop(name, None)
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.delete_adapter(name)


def adjust_logits(logits: torch.Tensor, seqs: list[_Seq]) -> torch.Tensor:
    """`logits` [B, V] with each row's logit_bias and presence/frequency penalties applied (over
    the tokens it generated, as OpenAI and vLLM do); the input itself when no row asks for any."""
    rows = [i for i, s in enumerate(seqs) if s.req.logit_bias or (s.out_ids and (s.req.presence_penalty or s.req.frequency_penalty))]
    if not rows:
        return logits
    logits = logits.clone()
    vocab = logits.shape[-1]
    for i in rows:
        req = seqs[i].req
        if req.logit_bias:
            ids = torch.tensor(list(req.logit_bias), device=logits.device)
            logits[i, ids] += torch.tensor(list(req.logit_bias.values()), device=logits.device)
        if seqs[i].out_ids and (req.presence_penalty or req.frequency_penalty):
            counts = torch.bincount(torch.tensor(seqs[i].out_ids, device=logits.device), minlength=vocab)[:vocab].float()  # [V]
            logits[i] -= req.frequency_penalty * counts + req.presence_penalty * (counts > 0).float()
    return logits


def token_logprobs(logits: torch.Tensor, token: int, top: int) -> dict:
    """The logprob entry of `token` under the raw distribution `logits` [V], with the `top` best alternatives."""
    lp = torch.log_softmax(logits, dim=-1)
    best = lp.topk(top) if top else None
    return {"id": token, "logprob": float(lp[token]),
            "top": [[int(t), float(v)] for v, t in zip(best.values, best.indices)] if best is not None else []}


def preference_scores(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Scores [V] whose descending order is the engine's preference for the next token: the logits
    when greedy; else log-probs at `temperature` (top_p's tail at -inf) plus Gumbel noise, so the
    best-scoring token of any allowed subset is a sample from the distribution restricted to it."""
    if temperature <= 0:
        return logits
    logp = torch.log_softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = logp.exp().sort(descending=True)
        logp[order[sorted_p.cumsum(-1) - sorted_p > top_p]] = float("-inf")
    u = torch.rand(logits.shape, generator=generator, device=generator.device if generator else "cpu").to(logits.device)
    return logp - torch.log(-torch.log(u.clamp(1e-20, 1.0 - 1e-7)))


def _stop_holdback(text: str, stops: list[str]) -> int:
    """Characters at the end of `text` that could still grow into a stop string."""
    keep = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                keep = max(keep, k)
                break
    return keep


class HFEngine:
    """Batched transformers generation; see the module docstring."""

    def __init__(self, model_dir: str, *, dtype: str = "auto", max_batch_size: int = 32, max_model_len: int = 4096,
                 tensor_parallel: int = 1, threads: int = 1, max_loaded_adapters: int = 8, device: str = "auto",
                 min_admit: int = 1):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(threads)
        self.model_dir = str(model_dir)
        self.device = pick_device(device)
        check_tensor_parallel(tensor_parallel, self.device)
        self.tensor_parallel = tensor_parallel  # on CPU a placement reservation only: one shard runs
        self.max_batch_size = max_batch_size
        self.max_model_len = max_model_len
        self.max_loaded_adapters = max_loaded_adapters
        self.min_admit = min_admit  # rows freed before waiting requests join a running batch (1: at once)
        self.dtype = pick_dtype(dtype, self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        on_gpu = {"device_map": str(self.device)} if self.device.type == "cuda" else {}  # weights straight to the GPU
        self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=self.dtype, **on_gpu).eval()
        self.eos_id = self.tokenizer.eos_token_id
        self.peft = None
        self.adapters: dict[str, str] = {}  # adapter id -> internal name
        self._in_use: dict[str, int] = {}  # internal name -> running sequences
        self._doomed: set[str] = set()  # unloaded while in use: delete when idle
        self._waiting: deque[_Seq] = deque()
        self._running: list[_Seq] = []
        self._cache = None
        self._mask: torch.Tensor | None = None  # [B, L] 1 = real token
        self._lock = threading.Lock()  # model + adapter table (the decode thread holds it for every step)
        # `_in_use` and `_doomed` only. The event loop never waits on `_lock`: a plain Lock is not
        # fair, and the decode thread re-takes it right after each step, so a loop blocked on it
        # stalled every stream of the replica for seconds (TTFT p50 5-7 s at 8-16 streams).
        self._use_lock = threading.Lock()
        self._loaders = 0  # threads waiting for `_lock` to load an adapter; the decode loop lets them in
        self._wake = threading.Event()
        self._stop = False
        self.steps = 0  # decode passes
        self.prefills = 0  # prefill passes (one per admission of waiting requests)
        self.partition = cpus.from_env()
        self._thread = threading.Thread(target=self._loop, name="hf-decode", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ public API

    def info(self) -> dict:
        return {"engine": "hf", "model_dir": self.model_dir, "tensor_parallel": self.tensor_parallel,
                "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
                "max_batch_size": self.max_batch_size, "adapters_loaded": sorted(self.adapters),
                "running": len(self._running), "waiting": len(self._waiting), "decode_steps": self.steps,
                "prefill_passes": self.prefills,
                "decode_cpus": cpus.format_cpu_list(self.partition.model) if self.partition else None}

    def stats(self) -> dict:
        """The scheduler's gauges in vLLM's meanings (see llmplatform.serving.metrics): rows decoding,
        requests waiting for a row, and `kv_cache_usage_perc` = the dense KV cache's slots (rows x
        padded length: left padding takes memory too) / the capacity max_batch_size x max_model_len."""
        running, mask = self._running, self._mask  # read once: the decode thread replaces them
        slots = mask.shape[0] * mask.shape[1] if mask is not None and running else 0
        return {"num_requests_running": len(running), "num_requests_waiting": len(self._waiting),
                "kv_cache_usage_perc": min(1.0, slots / max(1, self.max_batch_size * self.max_model_len))}

    def load_adapter(self, adapter_id: str, path: str) -> None:
        """Load a peft adapter under `adapter_id` (idempotent). Raises EngineError if it doesn't fit."""
        if adapter_id in self.adapters:
            return
        from peft import PeftModel

        name = _internal_name(adapter_id)
        with self._use_lock:
            self._loaders += 1
        try:
            self._lock.acquire()
        finally:
            with self._use_lock:
                self._loaders -= 1
        try:
            try:
                if self.peft is None:
                    self.peft = PeftModel.from_pretrained(self.model, path, adapter_name=name, is_trainable=False).eval()
                else:
                    self.peft.load_adapter(path, adapter_name=name, is_trainable=False)
            except (ValueError, RuntimeError, OSError, KeyError) as exc:
                _purge_adapter(self.peft if self.peft is not None else self.model, name)
                raise EngineError(f"adapter {adapter_id!r} at {path} cannot be loaded on base {self.model_dir}: {exc}") from exc
            self.peft.eval()
            self.adapters[adapter_id] = name
            with self._use_lock:
                self._doomed.discard(name)
        finally:
            self._lock.release()

    def mean_nll(self, rows: list[tuple[list[int], list[int]]], adapter_id: str | None = None) -> list[float]:
        """Per row (input ids, labels: -100 where a token is not scored), the mean negative
        log-likelihood of its labelled tokens under the model with `adapter_id` applied (a loaded
        adapter, as a decode step applies it). One batch; takes the model lock between decode steps."""
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        width = max(len(ids) for ids, _ in rows)
        ids = torch.tensor([i + [pad] * (width - len(i)) for i, _ in rows], device=self.device)  # [B, S]
        mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in rows], device=self.device)
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows], device=self.device)
        with self._lock, torch.no_grad():
            if self.peft is not None:
                name = self.adapters[adapter_id] if adapter_id else BASE
                logits = self.peft(input_ids=ids, attention_mask=mask, adapter_names=[name] * len(rows)).logits
            else:
                logits = self.model(input_ids=ids, attention_mask=mask).logits
        logits, target = logits[:, :-1].float(), labels[:, 1:]  # [B, S-1, V], [B, S-1]: token t predicts t+1
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="none")
        return (nll.sum(-1) / (target != -100).sum(-1).clamp(min=1)).tolist()

    def unload_adapter(self, adapter_id: str) -> None:
        """Forget an adapter; its weights go once no running sequence uses them."""
        name = self.adapters.pop(adapter_id, None)
        if name is not None:  # may run on the event loop: no waiting for the model lock; the decode thread reaps
            with self._use_lock:
                self._doomed.add(name)
            self._wake.set()

    async def generate(self, req: GenerationRequest) -> AsyncIterator[dict]:
        """Stream events for one request (`n` choices as `n` sequences); cancelling the iterator frees their batch slots."""
        async for event in fan_out(self._generate_one, req):
            yield event

    async def _generate_one(self, req: GenerationRequest) -> AsyncIterator[dict]:
        if check_request(req, self.max_model_len, self.adapters):
            await asyncio.to_thread(self.load_adapter, req.adapter_id, req.adapter_path)
        adapter = self.adapters[req.adapter_id] if req.adapter_id else BASE
        seq = _Seq(req=req, loop=asyncio.get_running_loop(), queue=asyncio.Queue(), adapter=adapter)
        if req.temperature > 0:
            seq.generator = torch.Generator().manual_seed(req.seed if req.seed is not None else random.getrandbits(63))
        if (req.response_format or {}).get("type") == "json_object":
            seq.json_state = json_constraint.START
        with self._use_lock:
            self._in_use[adapter] = self._in_use.get(adapter, 0) + 1
        self._waiting.append(seq)
        self._wake.set()
        try:
            while True:
                event = await seq.queue.get()
                # a slow reader gets the deltas that piled up as one event (fewer Ray stream items)
                while "text" in event and not seq.queue.empty():
                    nxt = seq.queue.get_nowait()
                    if "text" not in nxt:  # finish or error: send the text first
                        yield event
                        event = nxt
                        break
                    event = {"text": event["text"] + nxt["text"], "completion_tokens": nxt["completion_tokens"],
                             **({"logprobs": event["logprobs"] + nxt["logprobs"]} if "logprobs" in event else {})}
                if "error" in event:
                    raise EngineError(event["error"], 500, "engine_failure")
                yield event
                if "finish_reason" in event:
                    return
        finally:
            seq.cancelled = True
            self._wake.set()

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=10)

    # ------------------------------------------------------------------ decode loop (thread)

    def _loop(self) -> None:
        if self.partition:
            cpus.set_thread_cpus(self.partition.model)
        while not self._stop:
            if self._loaders:
                time.sleep(0.001)  # an adapter load waits for the model lock: let it in between steps
            if not self._running and not self._waiting:
                if self._doomed:
                    with self._lock:
                        self._reap()
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                with self._lock, torch.inference_mode():
                    self._drop_cancelled()
                    self._admit()
                    self._drop_cancelled()  # a request can finish at its first token (EOS, a stop string, max_tokens 1)
                    if self._running:
                        self._step()
                    self._reap()
            except Exception as exc:  # a bug: fail the batch that stepped; requests still waiting were not in it
                for seq in self._running:
                    seq.emit({"error": f"engine step failed: {type(exc).__name__}: {exc}"})
                    self._release(seq)
                self._running, self._cache, self._mask = [], None, None

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache, adapters: list[str]):
        if self.peft is not None:
            return self.peft(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                             logits_to_keep=1, adapter_names=adapters)
        # logits_to_keep=1: only the last position is sampled (a prefill needs no logits for its prompt)
        return self.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True, logits_to_keep=1)

    def _admit(self) -> None:
        free = self.max_batch_size - len(self._running)
        if self._running and free < min(len(self._waiting), self.min_admit):
            return  # every prefill is a forward pass of its own: while rows decode, admit several at once
        new = []
        while self._waiting and free > 0:
            seq = self._waiting.popleft()
            if seq.cancelled:
                self._release(seq)
                continue
            seq.queue_time_s = time.monotonic() - seq.arrived
            new.append(seq)
            free -= 1
        if not new:
            return
        width = max(len(s.req.prompt_ids) for s in new)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.tensor([[pad] * (width - len(s.req.prompt_ids)) + s.req.prompt_ids for s in new], device=self.device)  # [b, width]
        mask = torch.tensor([[0] * (width - len(s.req.prompt_ids)) + [1] * len(s.req.prompt_ids) for s in new], device=self.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        try:
            out = self._forward(ids, mask, pos, None, [s.adapter for s in new])
            self.prefills += 1
        except Exception as exc:  # these rows are in neither queue now: fail them here or their requests wait forever
            for seq in new:  # the running batch's cache is untouched (no merge yet): it decodes on
                seq.emit({"error": f"engine step failed: {type(exc).__name__}: {exc}"})
                self._release(seq)
            return
        self._merge(new, out.past_key_values, mask)
        self._sample_and_emit(new, out.logits[:, -1, :])

    def _merge(self, new: list[_Seq], cache, mask: torch.Tensor) -> None:
        """Append prefilled rows to the running batch; left-pad whichever cache is shorter."""
        if not self._running:
            self._running, self._cache, self._mask = list(new), cache, mask
            return
        old_len, new_len = self._mask.shape[1], mask.shape[1]
        width = max(old_len, new_len)
        for old_layer, new_layer in zip(self._cache.layers, cache.layers):
            for attr in ("keys", "values"):
                a, b = getattr(old_layer, attr), getattr(new_layer, attr)  # [B, H, L, D]
                a = torch.nn.functional.pad(a, (0, 0, width - old_len, 0))
                b = torch.nn.functional.pad(b, (0, 0, width - new_len, 0))
                setattr(old_layer, attr, torch.cat([a, b], dim=0))
        self._mask = torch.cat([torch.nn.functional.pad(self._mask, (width - old_len, 0)),
                                torch.nn.functional.pad(mask, (width - new_len, 0))], dim=0)
        self._running.extend(new)

    def _step(self) -> None:
        last = torch.tensor([[s.out_ids[-1]] for s in self._running], device=self.device)  # [B, 1]
        self._mask = torch.cat([self._mask, torch.ones(len(self._running), 1, dtype=self._mask.dtype, device=self.device)], dim=1)
        pos = self._mask.sum(-1, keepdim=True) - 1  # [B, 1]
        out = self._forward(last, self._mask, pos, self._cache, [s.adapter for s in self._running])
        self._cache = out.past_key_values
        self.steps += 1
        self._sample_and_emit(self._running, out.logits[:, -1, :])
        self._drop_cancelled()

    def _sample(self, seqs: list[_Seq], logits: torch.Tensor) -> list[int]:
        logits = adjust_logits(logits, seqs)  # [B, V] float on the CPU (_sample_and_emit moved it)
        greedy = logits.argmax(-1).tolist()
        tokens = []
        for i, s in enumerate(seqs):
            if s.json_state is not None:
                tokens.append(self._json_token(s, logits[i]))
                continue
            if s.req.temperature <= 0:
                tokens.append(greedy[i])
                continue
            probs = torch.softmax(logits[i] / s.req.temperature, dim=-1)
            if s.req.top_p < 1.0:
                sorted_p, order = probs.sort(descending=True)
                cut = sorted_p.cumsum(-1) - sorted_p > s.req.top_p  # keep the smallest set reaching top_p
                sorted_p[cut] = 0.0
                probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
            tokens.append(int(torch.multinomial(probs, 1, generator=s.generator)))
        return tokens

    def _json_token(self, s: _Seq, logits: torch.Tensor) -> int:
        """The preferred token that keeps `s`'s text a JSON object's prefix closable in the tokens
        left (advancing `s.json_state`); -1 when none does."""
        vocab = logits.shape[-1]
        if getattr(self, "_json_texts", None) is None or len(self._json_texts) != vocab:
            special = set(self.tokenizer.all_special_ids)
            pieces = self.tokenizer.convert_ids_to_tokens(list(range(min(vocab, len(self.tokenizer)))))
            texts = [None if i in special else json_constraint.piece_text(p) for i, p in enumerate(pieces)]
            self._json_texts = texts + [None] * (vocab - len(texts))
        order = torch.argsort(preference_scores(logits, s.req.temperature, s.req.top_p, s.generator), descending=True).tolist()
        picked = json_constraint.choose(s.json_state, order, self._json_texts, s.req.max_tokens - len(s.out_ids))
        if picked is None:
            return -1
        s.json_state = picked[1]
        return picked[0]

    def _sample_and_emit(self, seqs: list[_Seq], logits: torch.Tensor) -> None:
        logits = logits.float().cpu()  # [B, V]; sampling (seeded per request) and logprobs run on the CPU on every device
        for i, (s, tok) in enumerate(zip(seqs, self._sample(seqs, logits))):
            if s.cancelled or s.finished:
                continue
            if tok < 0:  # response_format: no token keeps the JSON closable in the tokens left
                s.finished = "length"
            elif tok == self.eos_id and not s.req.ignore_eos:
                s.finished = "stop"
            else:
                s.out_ids.append(tok)
                if s.req.logprobs is not None:
                    s.logprobs.append(token_logprobs(logits[i], tok, s.req.logprobs))
                s.text = self.tokenizer.decode(s.out_ids, skip_special_tokens=True)
                hit = [s.text.find(x) for x in s.req.stop if x in s.text]
                if hit:
                    s.text, s.finished = s.text[: min(hit)], "stop"
                elif json_constraint.is_done(s.json_state):  # the object is complete: nothing may follow it
                    s.finished = "stop"
                elif len(s.out_ids) >= s.req.max_tokens:
                    s.finished = "length"
            safe = len(s.text) if s.finished else len(s.text) - _stop_holdback(s.text, s.req.stop)
            if not s.finished:
                safe = min(safe, len(s.text.rstrip("\ufffd")))  # an incomplete UTF-8 byte sequence
            extra = {}
            if s.req.logprobs is not None:
                extra, s.logprobs = {"logprobs": s.logprobs}, []
            if safe > s.sent:
                s.emit({"text": s.text[s.sent:safe], "completion_tokens": len(s.out_ids), **extra})
                s.sent = safe
            elif not s.finished or extra.get("logprobs"):
                s.emit({"text": "", "completion_tokens": len(s.out_ids), **extra})
            if s.finished:
                s.emit({"finish_reason": s.finished, "prompt_tokens": len(s.req.prompt_ids), "completion_tokens": len(s.out_ids),
                        "token_ids": list(s.out_ids), "queue_time_s": s.queue_time_s})

    def _drop_cancelled(self) -> None:
        keep = [i for i, s in enumerate(self._running) if not (s.cancelled or s.finished)]
        if len(keep) == len(self._running):
            return
        for i, s in enumerate(self._running):
            if i not in keep:
                self._release(s)
        if not keep:
            self._running, self._cache, self._mask = [], None, None
            return
        index = torch.tensor(keep, device=self.device)
        self._cache.batch_select_indices(index)
        self._mask = self._mask[index]
        self._running = [self._running[i] for i in keep]
        lead = int((self._mask.sum(0) == 0).long().cumprod(0).sum())  # columns padding in every row
        if lead:
            self._mask = self._mask[:, lead:]
            for layer in self._cache.layers:
                layer.keys, layer.values = layer.keys[:, :, lead:], layer.values[:, :, lead:]

    def _release(self, seq: _Seq) -> None:
        if getattr(seq, "_released", False):
            return
        seq._released = True
        with self._use_lock:
            self._in_use[seq.adapter] = self._in_use.get(seq.adapter, 1) - 1

    def _reap(self) -> None:
        with self._use_lock:
            idle = [name for name in self._doomed if self._in_use.get(name, 0) <= 0]
        for name in idle:
            if self.peft is not None:
                try:
                    self.peft.delete_adapter(name)
                except (ValueError, KeyError):
                    pass  # peft keeps the last adapter; it is unreachable by id anyway
            with self._use_lock:
                self._doomed.discard(name)
