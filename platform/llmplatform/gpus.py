"""GPU table for the planner: the accelerators we size Llama 2 jobs and deployments for.

`memory_gib` is what the device reports to CUDA (nvidia-smi's MiB / 1024), not the marketing
figure: an "80GB" A100 holds 80 GiB, an "24GB" L4 only ~22.5 GiB. All planner figures are in
GiB so they compare directly. `bf16` says whether the chip computes in bfloat16 (Ampere and
newer); `gpus_per_node` is the usual count in one server, which decides when a tensor-parallel
group must span nodes.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmplatform.errors import PlatformError


class UnknownGPUError(PlatformError):
    """A GPU name that is not in the table; the message lists the accepted names."""


@dataclass(frozen=True)
class GPU:
    """One accelerator model."""

    name: str  # our key, e.g. "a100-80gb"
    label: str  # what people call it
    memory_gib: float  # usable device memory as CUDA reports it
    bf16: bool  # bfloat16 support (compute capability >= 8.0)
    gpus_per_node: int = 8


GPUS: dict[str, GPU] = {
    g.name: g
    for g in [
        #   name            label                        GiB     bf16
        GPU("a100-40gb", "NVIDIA A100 40GB", 40.0, True),
        GPU("a100-80gb", "NVIDIA A100 80GB", 80.0, True),
        GPU("h100-80gb", "NVIDIA H100 80GB", 79.6, True),  # 81559 MiB
        GPU("h200-141gb", "NVIDIA H200 141GB", 140.4, True),  # 143771 MiB
        GPU("l4-24gb", "NVIDIA L4", 22.5, True),  # 23034 MiB
        GPU("a10g-24gb", "NVIDIA A10G", 22.5, True),  # 23028 MiB
        GPU("rtx4090-24gb", "NVIDIA GeForce RTX 4090", 24.0, True),
        GPU("a6000-48gb", "NVIDIA RTX A6000", 48.0, True),  # 49140 MiB
        GPU("t4-16gb", "NVIDIA T4", 15.0, False),  # 15360 MiB, Turing: no bf16
    ]
}


def get_gpu(name: str | GPU, gpus_per_node: int | None = None) -> GPU:
    """The GPU called `name` (case-insensitive), optionally with another per-node count."""
    if isinstance(name, GPU):
        gpu = name
    else:
        gpu = GPUS.get(name.strip().lower())
        if gpu is None:
            raise UnknownGPUError(f"unknown GPU {name!r}; accepted: {', '.join(GPUS)}")
    if gpus_per_node is not None:
        if gpus_per_node < 1:
            raise UnknownGPUError(f"gpus per node must be at least 1 (given: {gpus_per_node})")
        gpu = GPU(gpu.name, gpu.label, gpu.memory_gib, gpu.bf16, gpus_per_node)
    return gpu
