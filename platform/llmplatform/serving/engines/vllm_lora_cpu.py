"""Faster CPU multi-LoRA ops for vLLM, and the vLLM plugin that makes its CPU punica wrapper use them.

vLLM's CPU backend applies LoRA with its torch ops (`vllm.lora.ops.torch_ops`): per token it
gathers that token's adapter weights (`W[indices]`, a copy of rank x width per token) and runs a
batched einsum, slice by slice, for every linear layer. Here each op is one dense GEMM over all
stacked adapter slots instead: shrink is `x @ A_all.T` and then each token's rank block is
picked; expand places each token's rank vector in its slot's block of a zero row and multiplies
by all slots' B at once. The wasted work (the other slots' blocks) is small at LoRA ranks; the
gathers it saves are not. `lora_linear` (the wrapper's `add_lora_linear`) does one shrink for
all slices of a projection (q, k, v) with their A stacked once and kept until vLLM next writes
them. Layers no loaded adapter targets (all-zero weights, e.g. the MLP when adapters cover
attention) are skipped.

The six op functions keep the signatures and write semantics of the vLLM ops they replace
(slice offsets, `scaling`, `add_inputs`, the padding rules of `bgmv_expand`), with one
deliberate difference: a token index of -1 means "no adapter" (as vLLM's punica metadata
documents) and contributes nothing, where vLLM's torch ops index slot -1, i.e. the last slot.

Pure torch; vLLM is imported only by `register`, the `vllm.general_plugins` entry point that
vLLM calls in each of its processes (front end, engine core, workers). It swaps the ops,
`add_lora_linear` and `add_lora_embedding` into `vllm.lora.punica_wrapper.punica_cpu` on the CPU
platform when `PLATFORM_VLLM_LORA_OPS` is `platform` (VLLMEngine sets it; `vllm` keeps vLLM's
own). There the GEMMs go through vLLM's oneDNN handler (`Gemm`), and the two wrapper methods
become opaque custom ops inside a torch.compile trace, so vLLM's CPU platform may compile the
model with LoRA on (it turns compilation off for LoRA because its own ops don't trace;
`PLATFORM_VLLM_LORA_COMPILE=0` keeps that rule).
`plugin_path` makes the entry point discoverable where the installed distribution predates it
(an editable install built before the entry point was added): a folder with a metadata-only
distribution for PYTHONPATH.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

OPS_ENV = "PLATFORM_VLLM_LORA_OPS"
"""`platform`: vLLM's CPU punica wrapper uses the ops below; `vllm` (or unset): vLLM's own torch ops."""
COMPILE_ENV = "PLATFORM_VLLM_LORA_COMPILE"
"""`0`: keep vLLM's CPU rule (no torch.compile when LoRA is on) even with our ops."""
PLUGIN_GROUP = "vllm.general_plugins"
PLUGIN_NAME = "llmplatform_cpu_lora"
PLUGIN_TARGET = "llmplatform.serving.engines.vllm_lora_cpu:register"


def _slots(weights: torch.Tensor) -> torch.Tensor:
    """Stacked adapter weights as [slots, out, in] (vLLM stores linear layers' as [slots, 1, out, in])."""
    return weights.squeeze(1) if weights.dim() == 4 else weights


def _cached(owner: torch.Tensor, key: str, sources: tuple[torch.Tensor, ...], build):
    """`build()`, remembered on `owner` until one of `sources` is next written (their version counters:
    vLLM writes adapters into the stacked weights in place); built each time for inference
    tensors, which have no version counter."""
    try:
        versions = tuple(t._version for t in sources)
    except RuntimeError:
        return build()
    cache = owner.__dict__.setdefault("_llmplatform_lora", {})
    hit = cache.get(key)
    if hit is None or hit[0] != versions:
        hit = cache[key] = (versions, build())
    return hit[1]


def all_zero(weights: torch.Tensor) -> bool:
    """Whether every slot's weights are zero: vLLM gives every linear layer LoRA weights, also those
    no loaded adapter targets (an MLP when adapters cover attention only)."""
    return _cached(weights, "all_zero", (weights,), lambda: not bool(weights.any()))


def shrink_rows(x: torch.Tensor, a: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Row t: x[t] @ a[indices[t]].T in `dtype` ([tokens, rank]); zero where indices[t] < 0."""
    a = _slots(a).to(dtype)
    slots, rank, width = a.shape
    tokens = x.shape[0]
    every = (x.to(dtype) @ a.reshape(slots * rank, width).T).view(tokens, slots, rank)
    rows = every[torch.arange(tokens, device=x.device), indices.clamp_min(0)]
    return rows.masked_fill_((indices < 0).unsqueeze(1), 0)


def expand_rows(x: torch.Tensor, b: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Row t: x[t] @ b[indices[t]].T in `dtype` ([tokens, out]); zero where indices[t] < 0."""
    b = _slots(b).to(dtype)
    slots, out, rank = b.shape
    tokens = x.shape[0]
    placed = torch.zeros(tokens, slots, rank, dtype=dtype, device=x.device)
    keep = (indices >= 0).unsqueeze(1)
    placed[torch.arange(tokens, device=x.device), indices.clamp_min(0)] = x[:, :rank].to(dtype) * keep
    return placed.view(tokens, slots * rank) @ b.transpose(1, 2).reshape(slots * rank, out)


def bgmv_shrink(inputs, lora_b_weights, output_tensor, lora_indices_tensor, scaling: float = 1.0):
    """output[:, :rank] = scaling * (inputs[t] @ A[indices[t]].T) per token."""
    if all_zero(lora_b_weights):
        output_tensor[:, : lora_b_weights.shape[-2]] = 0
        return
    rows = shrink_rows(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, : rows.shape[1]] = scaling * rows


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs: bool = True):
    """output[:, :n] (+)= inputs[t] @ B[indices[t]].T per token, n the shorter width (padding); one
    result row is broadcast to every output row, as vLLM's op does."""
    if all_zero(lora_b_weights):
        if not add_inputs:
            output_tensor[:, : lora_b_weights.shape[-2]] = 0
        return
    rows = expand_rows(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    limit = 1 if rows.shape[0] == 1 and output_tensor.shape[0] != 1 else output_tensor.shape[0]
    common = min(rows.shape[1], output_tensor.shape[1])
    if add_inputs:
        output_tensor[:, :common] += rows[:limit, :common]
    else:
        output_tensor[:, :common] = rows[:limit, :common]


def bgmv_expand_slice(inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset: int, slice_size: int,
                      add_inputs: bool = True):
    """output[:, offset:offset+size] (+)= inputs[t] @ B[indices[t]].T per token."""
    if all_zero(lora_b_weights):
        if not add_inputs:
            output_tensor[:, slice_offset: slice_offset + slice_size] = 0
        return
    rows = expand_rows(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if add_inputs:
        output_tensor[:, slice_offset: slice_offset + slice_size] += rows
    else:
        output_tensor[:, slice_offset: slice_offset + slice_size] = rows


def lora_linear(y: torch.Tensor, x: torch.Tensor, lora_a: tuple[torch.Tensor, ...], lora_b: tuple[torch.Tensor, ...], scale: float,
                output_slices: tuple[int, ...], indices: torch.Tensor, offset_start: int = 0) -> None:
    """PunicaWrapperCPU.add_lora_linear fused over the slices (q, k, v of one projection): for each
    slice s at its offset, y[t] += scale * x[t] @ A_s[i].T @ B_s[i].T with i = indices[t] (-1:
    nothing). One shrink GEMM over all slices and slots (their A stacked once, kept until vLLM
    next writes them), a mask that keeps each token's own slot, then one expand GEMM per slice,
    or one for all slices in decode-sized batches (`FUSED_EXPAND_TOKENS`). The rank vectors are
    rounded to y's dtype before the expand, as vLLM's expand does with its float32 buffer."""
    y = y.view(-1, y.shape[-1])
    x = x.view(-1, x.shape[-1])
    if all(all_zero(a) for a in lora_a) or all(all_zero(b) for b in lora_b):
        return  # a layer no loaded adapter targets
    if not bool((indices >= 0).any()):
        return  # no token has an adapter
    first = lora_a[0]
    slices, slots, rank = len(lora_a), first.shape[0], first.shape[-2]
    shrink = _cached(first, "a_all", lora_a, lambda: Gemm(torch.cat([_slots(a).reshape(slots * rank, -1) for a in lora_a]).T))
    tokens = x.shape[0]
    every = shrink(x.to(shrink.w.dtype)).view(tokens, slices, slots, rank)
    # each token keeps its slot's rank block (a mask; an index of -1 matches no slot) and the
    # blocks, so placed, multiply all slots' B in one GEMM per slice, or, for a decode-sized batch,
    # one GEMM for all slices with their B on a block diagonal (fewer calls; more multiplies by zero)
    mine = (indices.unsqueeze(1) == _slot_ids(slots, indices.device)).to(y.dtype).view(tokens, 1, slots, 1)
    if scale != 1.0:
        mine = mine * scale
    placed = (every.to(y.dtype) * mine).view(tokens, slices, slots * rank)
    if slices > 1 and tokens <= FUSED_EXPAND_TOKENS:
        expand = _cached(first, f"b_diag_{y.dtype}", lora_b, lambda: Gemm(_block_diagonal(lora_b, y.dtype)))
        y[:, offset_start: offset_start + sum(output_slices)] += expand(placed.view(tokens, -1))
        return
    offset = offset_start
    for s, (b, size) in enumerate(zip(lora_b, output_slices)):
        expand = _cached(b, f"b_flat_{y.dtype}", (b,), lambda b=b: Gemm(_flat_b(b, y.dtype)))
        y[:, offset: offset + size] += expand(placed[:, s].contiguous() if slices > 1 else placed[:, s])
        offset += size


FUSED_EXPAND_TOKENS = 32
"""Up to this many tokens (decode steps) `lora_linear` expands all slices in one GEMM."""

_SLOT_IDS: dict = {}


def _slot_ids(slots: int, device) -> torch.Tensor:
    key = (slots, str(device))
    if key not in _SLOT_IDS:
        _SLOT_IDS[key] = torch.arange(slots, device=device)
    return _SLOT_IDS[key]


def _flat_b(b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One slice's B for all slots as [slots * rank, out]: row block k is slot k's B.T."""
    b = _slots(b).to(dtype)
    return b.transpose(1, 2).reshape(b.shape[0] * b.shape[2], b.shape[1])


def _block_diagonal(lora_b: tuple[torch.Tensor, ...], dtype: torch.dtype) -> torch.Tensor:
    """All slices' `_flat_b` on a block diagonal: [slices * slots * rank, sum of the slices' widths]."""
    blocks = [_flat_b(b, dtype) for b in lora_b]
    return torch.block_diag(*blocks)


class Gemm:
    """`x @ w` for a fixed `w` ([K, N]): through vLLM's oneDNN GEMM (what vLLM's CPU linear layers
    use; several times faster than torch's bf16 matmul at LoRA shapes) when vLLM's CPU ops are
    loaded in this process, else torch's."""

    def __init__(self, w: torch.Tensor):
        self.w = w.contiguous()
        self.onednn = self.handler = None
        ops = sys.modules.get("vllm._custom_ops")
        if ops is not None and getattr(ops, "_supports_onednn", False):
            try:
                self.handler, self.onednn = ops.create_onednn_mm(self.w, 32), ops
            except RuntimeError:  # a dtype or shape oneDNN refuses: torch's matmul
                pass

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.handler is not None:
            return self.onednn.onednn_mm(self.handler, x, None)
        return x @ self.w


def token_indices(lora_indices_tensor: torch.Tensor, seq_len_tensor: torch.Tensor) -> torch.Tensor:
    """The prefill metadata (one adapter index per run of tokens) as one index per token."""
    return torch.repeat_interleave(lora_indices_tensor, seq_len_tensor)


def sgmv_shrink(inputs, lora_a_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor, batches: int,
                max_seq_length: int, token_nums: int, scaling: float):
    bgmv_shrink(inputs, lora_a_weights, output_tensor, token_indices(lora_indices_tensor, seq_len_tensor), scaling)


def sgmv_expand(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor, batches: int,
                max_seq_length: int, token_nums: int, add_inputs: bool = False):
    bgmv_expand(inputs, lora_b_weights, output_tensor, token_indices(lora_indices_tensor, seq_len_tensor), add_inputs)


def sgmv_expand_slice(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor, batches: int,
                      max_seq_length: int, token_nums: int, slice_offset: int, slice_size: int, add_inputs: bool = False):
    bgmv_expand_slice(inputs, lora_b_weights, output_tensor, token_indices(lora_indices_tensor, seq_len_tensor), slice_offset,
                      slice_size, add_inputs)


OPS = {f.__name__: f for f in (bgmv_shrink, bgmv_expand, bgmv_expand_slice, sgmv_shrink, sgmv_expand, sgmv_expand_slice)}
"""The names `vllm.lora.punica_wrapper.punica_cpu` imports from vLLM's torch ops, and ours."""


def add_lora_linear(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, *, buffer=None, **kwargs) -> None:
    """PunicaWrapperCPU.add_lora_linear (same arguments) through `lora_linear`. The wrapper's
    per-token adapter indices are its buffer's first rows, one per row of `x` (as vLLM's LoRA
    embedding reads `_embeddings_indices`: no Python int that a trace would freeze). Inside a
    torch.compile trace it is one opaque custom op (`llmplatform::lora_linear`), so its Python
    (which slots are all zero, the cached stacks) runs at every call, not once at trace time."""
    rows = x.view(-1, x.shape[-1]).shape[0]
    _run("lora_linear", _linear_op, y, x, list(lora_a_stacked), list(lora_b_stacked), float(scale), list(output_slices),
         self._token_lora_indices[:rows])


def add_lora_embedding(self, y, x, lora_b_stacked, add_inputs: bool = True, **kwargs) -> None:
    """PunicaWrapperCPU.add_lora_embedding (y += x @ B[i].T per token); the custom op
    `llmplatform::lora_expand` inside a trace, as `add_lora_linear`."""
    _run("lora_expand", _expand_op, y, x, lora_b_stacked, self._token_lora_indices[: x.shape[0]], bool(add_inputs))


def _run(op: str, eager, *args) -> None:
    """`torch.ops.llmplatform.<op>` inside a torch.compile trace; else `eager` itself (no dispatcher round trip)."""
    if torch.compiler.is_compiling():
        getattr(torch.ops.llmplatform, op)(*args)
    else:
        eager(*args)


def _linear_op(y: torch.Tensor, x: torch.Tensor, lora_a: list[torch.Tensor], lora_b: list[torch.Tensor], scale: float,
               output_slices: list[int], indices: torch.Tensor) -> None:
    lora_linear(y, x, tuple(lora_a), tuple(lora_b), scale, tuple(output_slices), indices)


def _expand_op(y: torch.Tensor, x: torch.Tensor, lora_b: torch.Tensor, indices: torch.Tensor, add_inputs: bool) -> None:
    bgmv_expand(x, lora_b, y, indices, add_inputs)


def _nothing(*args) -> None:
    return None


_LIBRARY = None


def _define_custom_ops() -> None:
    """`torch.ops.llmplatform.lora_linear` and `.lora_expand` (registered once per process, as
    vLLM registers its own: straight to the CPU dispatch key, without torch.library.custom_op's
    per-call overhead). Needs vLLM; called by `register`, before any trace."""
    global _LIBRARY
    if _LIBRARY is not None:
        return
    from torch.library import Library
    from vllm.utils.torch_utils import direct_register_custom_op

    library = Library("llmplatform", "FRAGMENT")
    direct_register_custom_op("lora_linear", _linear_op, mutates_args=["y"], fake_impl=_nothing, target_lib=library, dispatch_key="CPU")
    direct_register_custom_op("lora_expand", _expand_op, mutates_args=["y"], fake_impl=_nothing, target_lib=library, dispatch_key="CPU")
    _LIBRARY = library


def _compile_with_lora(platform_cls) -> None:
    """vLLM's CPU platform compiles the model (torch.compile, inductor) except when LoRA is on, for
    its own LoRA ops' sake; with ours (custom ops) the model compiles with LoRA too: the platform
    configures compilation as for a model without LoRA, and then LoRA is put back."""
    original = platform_cls.check_and_update_config
    if getattr(original, "_llmplatform", False):
        return

    def check_and_update_config(cls, vllm_config) -> None:
        lora, vllm_config.lora_config = vllm_config.lora_config, None
        try:
            original.__func__(cls, vllm_config)
        finally:
            vllm_config.lora_config = lora

    check_and_update_config._llmplatform = True
    platform_cls.check_and_update_config = classmethod(check_and_update_config)


def register() -> bool:
    """The vLLM general plugin: on the CPU platform, with `PLATFORM_VLLM_LORA_OPS=platform`, the CPU
    punica wrapper calls our ops. Idempotent (vLLM may load plugins more than once); True when on."""
    if os.environ.get(OPS_ENV) != "platform":
        return False
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False
    import vllm.lora.punica_wrapper.punica_cpu as punica_cpu

    for name, fn in OPS.items():
        setattr(punica_cpu, name, fn)
    punica_cpu.PunicaWrapperCPU.add_lora_linear = add_lora_linear
    punica_cpu.PunicaWrapperCPU.add_lora_embedding = add_lora_embedding
    _define_custom_ops()  # before any trace of the model (a trace can't define ops)
    if os.environ.get(COMPILE_ENV, "1") != "0":
        _compile_with_lora(type(current_platform))
    logger.info("vLLM's CPU LoRA ops replaced by llmplatform's (vllm_lora_cpu) in process %d", os.getpid())
    return True


def entry_points_txt() -> str:
    """The entry point, as pyproject.toml declares it and as `plugin_path` writes it."""
    return f"[{PLUGIN_GROUP}]\n{PLUGIN_NAME} = {PLUGIN_TARGET}\n"


def plugin_path(root: Path) -> Path:
    """A folder holding a metadata-only distribution that declares the entry point (for
    PYTHONPATH, so vLLM's processes find the plugin without reinstalling the project); written
    once, returned as is afterwards."""
    dist = root / "llm_platform_vllm_plugins-0.dist-info"
    files = {"METADATA": "Metadata-Version: 2.1\nName: llm-platform-vllm-plugins\nVersion: 0\n",
             "entry_points.txt": entry_points_txt()}
    dist.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        path = dist / name
        if not path.exists() or path.read_text() != text:
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(text)
            tmp.replace(path)
    return root


def plugin_installed() -> bool:
    """Whether the installed distributions already declare the entry point."""
    from importlib.metadata import entry_points

    return any(ep.name == PLUGIN_NAME for ep in entry_points(group=PLUGIN_GROUP))


def private_plugin_path() -> Path:
    """`plugin_path` in this user's cache folder, else (a read-only home) in a new private temporary
    folder: never a shared, guessable one, where another user could add a distribution whose entry
    point vLLM would then load."""
    try:
        return plugin_path(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llmplatform" / "vllm-plugins")
    except OSError:
        return plugin_path(Path(tempfile.mkdtemp(prefix="llmplatform-vllm-plugins-")))


def engine_env(environ: Mapping[str, str], plugin_dir: str | None, source_dir: str | None = None) -> dict[str, str]:
    """The environment updates that make the vLLM processes a VLLMEngine starts use our ops:
    `PLATFORM_VLLM_LORA_OPS` defaults to `platform` (an operator's `vllm` stays); `plugin_dir`
    (given when the entry point is not installed) and `source_dir` (the folder this engine
    imported llmplatform from, so vLLM's processes load the plugin from the same code: a Ray
    worker's sys.path is not always its PYTHONPATH) go first on PYTHONPATH."""
    env = {OPS_ENV: environ.get(OPS_ENV) or "platform"}
    paths = [p for p in environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    first = [d for d in (plugin_dir, source_dir) if d and d not in paths]
    if first:
        env["PYTHONPATH"] = os.pathsep.join([*first, *paths])
    return env


def source_dir() -> str:
    """The folder holding the llmplatform package this process imported."""
    return str(Path(__file__).resolve().parents[3])
