"""Our CPU LoRA ops for vLLM (serving/engines/vllm_lora_cpu.py) against a per-token reference, and how
vLLM's processes find the plugin that installs them. Pure torch: vLLM's own ops are compared in
the vllm tier (tests/integration/serving/test_vllm_tier.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from llmplatform.serving.engines import vllm_lora_cpu as ops

SLOTS, RANK, WIDTH = 4, 8, 48


def ref_rows(x: torch.Tensor, w: torch.Tensor, indices: list[int]) -> torch.Tensor:
    """Token by token: x[t] @ w[i].T with w as [slots, 1, out, in]; a zero row for i = -1."""
    rows = [x[t] @ w[i, 0].T if i >= 0 else torch.zeros(w.shape[2], dtype=x.dtype) for t, i in enumerate(indices)]
    return torch.stack(rows)


def runs(indices: list[int]) -> tuple[torch.Tensor, ...]:
    """vLLM's prefill metadata for a token mapping (punica_wrapper/utils.py compute_meta): run starts,
    run lengths, one adapter index per run, batches, longest run, tokens."""
    lora, lengths = torch.unique_consecutive(torch.tensor(indices), return_counts=True)
    starts = torch.cumsum(lengths, 0) - lengths
    return starts, lengths, lora, len(lora), int(lengths.max()), int(lengths.sum())


@pytest.fixture
def weights():
    g = torch.Generator().manual_seed(0)
    a = tuple(torch.randn(SLOTS, 1, RANK, WIDTH, generator=g) for _ in range(3))  # q, k, v slices
    b = tuple(torch.randn(SLOTS, 1, size, RANK, generator=g) for size in (WIDTH, 16, 16))
    return a, b


MAPPINGS = {
    "decode, every slot and no adapter": [2, -1, 0, 3, 1, 1, -1, 2],
    "prefill runs": [1] * 5 + [-1] * 3 + [3] * 4 + [0] * 2,
    "all base": [-1] * 6,
    "one adapter": [2] * 7,
}


@pytest.mark.parametrize("mapping", list(MAPPINGS.values()), ids=list(MAPPINGS))
@pytest.mark.parametrize("prefill", [False, True], ids=["bgmv", "sgmv"])
def test_linear_lora_matches_per_token_reference(weights, mapping, prefill):
    """What PunicaWrapperCPU.add_lora_linear does with the ops (a float32 shrink buffer per slice,
    then each slice's expand added at its offset): y += scale * x @ A[i].T @ B[i].T per slice."""
    a, b = weights
    x = torch.randn(len(mapping), WIDTH)
    y = torch.randn(len(mapping), sum(s.shape[2] for s in b))
    expected = y.clone()
    offset = 0
    for sa, sb in zip(a, b):
        expected[:, offset: offset + sb.shape[2]] += ref_rows(ref_rows(x, sa, mapping) * 0.5, sb, mapping)
        offset += sb.shape[2]
    idx, meta = torch.tensor(mapping), runs(mapping)
    offset = 0
    for sa, sb in zip(a, b):
        buf = torch.zeros(len(mapping), RANK)
        size = sb.shape[2]
        if prefill:
            ops.sgmv_shrink(x, sa, buf, *meta, 0.5)
            ops.sgmv_expand_slice(buf, sb, y, *meta, offset, size, True)
        else:
            ops.bgmv_shrink(x, sa, buf, idx, 0.5)
            ops.bgmv_expand_slice(buf, sb, y, idx, offset, size, True)
        offset += size
    torch.testing.assert_close(y, expected)


@pytest.mark.parametrize("fused_up_to", [0, 64], ids=["expand-per-slice", "expand-block-diagonal"])
@pytest.mark.parametrize("mapping", list(MAPPINGS.values()), ids=list(MAPPINGS))
def test_fused_linear_lora_matches_per_token_reference(weights, mapping, fused_up_to, monkeypatch):
    """lora_linear (the wrapper's add_lora_linear, all slices at once) at an offset, one slice all zero
    (a projection the adapters don't target), then again after an adapter is written into a slot;
    with one expand GEMM per slice (prefill-sized batches) and one for all (decode-sized)."""
    monkeypatch.setattr(ops, "FUSED_EXPAND_TOKENS", fused_up_to)
    a, b = weights
    a = (a[0], torch.zeros_like(a[1]), a[2])
    x = torch.randn(len(mapping), WIDTH)
    y = torch.randn(len(mapping), 6 + sum(s.shape[2] for s in b))
    idx = torch.tensor(mapping)

    def expected(before):
        out, offset = before.clone(), 6
        for sa, sb in zip(a, b):
            out[:, offset: offset + sb.shape[2]] += ref_rows(ref_rows(x, sa, mapping) * 0.5, sb, mapping)
            offset += sb.shape[2]
        return out

    for _ in range(2):  # the second call uses the stacked A kept from the first
        want = expected(y)
        ops.lora_linear(y, x, a, b, 0.5, tuple(s.shape[2] for s in b), idx, offset_start=6)
        torch.testing.assert_close(y, want)
    a[1][1, 0].copy_(torch.randn(RANK, WIDTH))  # vLLM's set_lora writes in place
    b[2][1].zero_()
    want = expected(y)
    ops.lora_linear(y, x, a, b, 0.5, tuple(s.shape[2] for s in b), idx, offset_start=6)
    torch.testing.assert_close(y, want)


def test_shrink_writes_scaled_rows_and_zero_for_no_adapter(weights):
    a = weights[0][0]
    mapping = [3, -1, 0]
    x = torch.randn(3, WIDTH)
    buf = torch.full((3, RANK), 7.0)  # stale values: shrink overwrites every row
    ops.bgmv_shrink(x, a, buf, torch.tensor(mapping), 2.0)
    torch.testing.assert_close(buf, 2.0 * ref_rows(x, a, mapping))
    assert not buf[1].any()


@pytest.mark.parametrize("add_inputs", [True, False])
def test_expand_slice_touches_only_its_slice(weights, add_inputs):
    b = weights[1][1]  # 16 wide
    mapping = [1, -1, 2, 1]
    x = torch.randn(4, RANK)
    y = torch.randn(4, 40)
    before = y.clone()
    ops.bgmv_expand_slice(x, b, y, torch.tensor(mapping), 10, 16, add_inputs)
    part = ref_rows(x, b, mapping)
    torch.testing.assert_close(y[:, 10:26], (before[:, 10:26] if add_inputs else 0) + part)
    torch.testing.assert_close(y[:, :10], before[:, :10])
    torch.testing.assert_close(y[:, 26:], before[:, 26:])
    if add_inputs:  # the base token keeps the base model's output
        torch.testing.assert_close(y[1], before[1])


@pytest.mark.parametrize("add_inputs", [True, False])
def test_expand_pads_to_the_shorter_width_and_broadcasts_one_row(add_inputs):
    """bgmv_expand as embeddings and logits use it: adapter and model widths may differ by padding."""
    b = torch.randn(SLOTS, 1, 20, RANK)
    x = torch.randn(3, RANK)
    mapping = [0, 2, -1]
    y = torch.randn(3, 16)
    before = y.clone()
    ops.bgmv_expand(x, b, y, torch.tensor(mapping), add_inputs)
    torch.testing.assert_close(y, (before if add_inputs else 0) + ref_rows(x, b, mapping)[:, :16])
    wide = torch.zeros(3, 24)
    ops.sgmv_expand(x, b, wide, *runs(mapping), False)
    torch.testing.assert_close(wide[:, :20], ref_rows(x, b, mapping))
    assert not wide[:, 20:].any()
    one = torch.zeros(4, 20)
    ops.bgmv_expand(x[:1], b, one, torch.tensor([1]), False)
    torch.testing.assert_close(one, ref_rows(x[:1], b, [1]).expand(4, 20))


def test_bfloat16_model_with_float32_buffer():
    """The dtypes vLLM runs a bfloat16 model with: the shrink buffer is float32, the output bfloat16."""
    a = torch.randn(SLOTS, 1, RANK, WIDTH, dtype=torch.bfloat16)
    b = torch.randn(SLOTS, 1, WIDTH, RANK, dtype=torch.bfloat16)
    mapping = [0, 3, -1, 3]
    x = torch.randn(4, WIDTH, dtype=torch.bfloat16)
    buf = torch.zeros(4, RANK)
    y = torch.zeros(4, WIDTH, dtype=torch.bfloat16)
    ops.bgmv_shrink(x, a, buf, torch.tensor(mapping), 1.0)
    ops.bgmv_expand_slice(buf, b, y, torch.tensor(mapping), 0, WIDTH, True)
    assert buf.dtype == torch.float32 and y.dtype == torch.bfloat16
    expected = ref_rows(ref_rows(x.float(), a.float(), mapping), b.float(), mapping)
    torch.testing.assert_close(y.float(), expected, rtol=0.05, atol=0.5)
    assert not y[2].any()


def test_engine_env_defaults_to_our_ops_and_keeps_an_operators_choice():
    env = ops.engine_env({"PYTHONPATH": "/src"}, "/plugins")
    assert env == {"PLATFORM_VLLM_LORA_OPS": "platform", "PYTHONPATH": os.pathsep.join(["/plugins", "/src"])}
    assert ops.engine_env({"PLATFORM_VLLM_LORA_OPS": "vllm"}, None) == {"PLATFORM_VLLM_LORA_OPS": "vllm"}
    assert "PYTHONPATH" not in ops.engine_env({"PYTHONPATH": "/plugins"}, "/plugins")
    assert ops.engine_env({"PYTHONPATH": "/src"}, None, "/code")["PYTHONPATH"] == os.pathsep.join(["/code", "/src"])
    assert (Path(ops.source_dir()) / "llmplatform/serving/engines/vllm_lora_cpu.py").exists()


def test_plugin_path_makes_the_entry_point_visible_to_a_new_process(tmp_path):
    """What vLLM's spawned processes see: importlib.metadata finds the entry point via PYTHONPATH."""
    root = ops.plugin_path(tmp_path / "plugins")
    assert ops.plugin_path(root) == root  # a second writer finds it in place
    probe = ("from importlib.metadata import entry_points; "
             "print([(e.name, e.value) for e in entry_points(group='vllm.general_plugins')])")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True).stdout
    assert str((ops.PLUGIN_NAME, ops.PLUGIN_TARGET)) in out


def test_pyproject_declares_the_same_entry_point():
    """Installed distributions (the GPU image, a rebuilt .venv-vllm) carry it without plugin_path."""
    project = tomllib.loads((Path(__file__).resolve().parents[3] / "pyproject.toml").read_text())["project"]
    assert project["entry-points"][ops.PLUGIN_GROUP] == {ops.PLUGIN_NAME: ops.PLUGIN_TARGET}


@pytest.mark.parametrize("inference", [False, True], ids=["tensor", "inference tensor"])
def test_layers_no_adapter_targets_add_nothing_until_one_is_loaded_into_them(inference):
    """vLLM gives every linear layer LoRA weights; where no loaded adapter targets a layer they are all
    zero and the ops skip it. Loading an adapter writes the stacked weights in place: the next call
    uses them (inference tensors, which have no version counter, included)."""
    with torch.inference_mode(inference):
        a, b = torch.zeros(SLOTS, 1, RANK, WIDTH), torch.zeros(SLOTS, 1, 16, RANK)
    mapping = [2, -1, 2]
    idx = torch.tensor(mapping)
    x = torch.randn(3, WIDTH)
    buf = torch.full((3, RANK), 5.0)
    y = torch.randn(3, 16)
    before = y.clone()
    ops.bgmv_shrink(x, a, buf, idx, 1.0)
    assert not buf.any()
    ops.bgmv_expand_slice(torch.randn(3, RANK), b, y, idx, 0, 16, True)
    torch.testing.assert_close(y, before)
    ops.bgmv_expand_slice(torch.randn(3, RANK), b, y, idx, 0, 16, False)
    assert not y.any()
    with torch.inference_mode(inference):  # vLLM's set_lora: a copy into the slot
        a[2, 0].copy_(torch.randn(RANK, WIDTH))
        b[2, 0].copy_(torch.randn(16, RANK))
    ops.bgmv_shrink(x, a, buf, idx, 1.0)
    torch.testing.assert_close(buf, ref_rows(x, a, mapping))
    ops.bgmv_expand_slice(buf, b, y, idx, 0, 16, True)
    torch.testing.assert_close(y, ref_rows(buf, b, mapping))


def test_private_plugin_path_is_the_users_cache_else_a_private_temporary_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert ops.private_plugin_path() == tmp_path / "cache/llmplatform/vllm-plugins"
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))  # not a folder: the cache can't be written
    fallback = ops.private_plugin_path()
    assert fallback.name.startswith("llmplatform-vllm-plugins-") and (fallback.stat().st_mode & 0o777) == 0o700
    assert (fallback / "llm_platform_vllm_plugins-0.dist-info/entry_points.txt").read_text() == ops.entry_points_txt()
    shutil.rmtree(fallback)


def test_platform_configures_compilation_as_without_lora_and_keeps_lora():
    """vLLM's CPU platform turns compilation off when it sees a LoRA config; wrapped, it configures the
    model as without LoRA (what it does with compilation then) and the LoRA config is there afterwards,
    also when the platform raises; wrapping twice wraps once."""
    seen = []

    class Platform:
        @classmethod
        def check_and_update_config(cls, config):
            seen.append(config.lora_config)
            config.compilation = "off" if config.lora_config is not None else "inductor"
            if config.fail:
                raise ValueError("bad config")

    class Config:
        def __init__(self, fail=False):
            self.lora_config, self.compilation, self.fail = {"max_loras": 8}, None, fail

    ops._compile_with_lora(Platform)
    ops._compile_with_lora(Platform)
    config = Config()
    Platform.check_and_update_config(config)
    assert seen == [None] and config.compilation == "inductor" and config.lora_config == {"max_loras": 8}
    broken = Config(fail=True)
    with pytest.raises(ValueError):
        Platform.check_and_update_config(broken)
    assert broken.lora_config == {"max_loras": 8} and len(seen) == 2


def test_gemm_without_vllm_is_torch_matmul():
    """Without vLLM's CPU ops in the process (these tests) `Gemm` multiplies with torch."""
    w = torch.randn(16, 5)
    x = torch.randn(3, 16)
    gemm = ops.Gemm(w.T.contiguous().T)
    assert gemm.handler is None
    torch.testing.assert_close(gemm(x), x @ w)
