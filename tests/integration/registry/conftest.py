"""Registry fixtures over the session's real MLflow server (`mlflow_server` in tests/conftest.py).

`tiny` builds real peft LoRA adapters for a tiny Llama config once per session; `reg` gives
each test a fresh model name and a `register(eval_loss=..., **metrics)` helper that logs a run
with those metrics and registers the adapter from it, as fine-tuning does.
"""

from __future__ import annotations

import itertools
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

TINY = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def build_adapter(out: Path, base_dir: Path, *, r: int = 8, modules_to_save=("lm_head",), **shape) -> Path:
    """Save a real peft LoRA adapter for a tiny Llama (random init) and return its directory."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY, **shape}))
    model.name_or_path = str(base_dir)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"],
                     modules_to_save=list(modules_to_save) if modules_to_save else None, task_type="CAUSAL_LM")
    get_peft_model(model, cfg).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict[str, Path]:
    from transformers import LlamaConfig

    root = tmp_path_factory.mktemp("tiny")
    base = root / "base"
    LlamaConfig(**TINY, architectures=["LlamaForCausalLM"]).save_pretrained(base)
    return {"base": base, "good": build_adapter(root / "good", base),
            "vocab": build_adapter(root / "vocab", base, vocab_size=1000)}


@pytest.fixture(scope="session")
def experiment_id(mlflow_server) -> str:
    from mlflow import MlflowClient

    return MlflowClient(mlflow_server).create_experiment(f"registry-tests-{uuid.uuid4().hex[:8]}")


_names = itertools.count()


@dataclass
class Reg:
    uri: str
    name: str
    tiny: dict
    experiment_id: str

    @property
    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(self.uri)

    def lineage(self, **extra) -> dict:
        return {"base_model": str(self.tiny["base"]), "base_model_sha": "b" * 64, "dataset_sha256": "d" * 64,
                "job_id": "job-test", "git_sha": "0123abc", "spec": {"kind": "FineTune", "lora": {"rank": 8}}, **extra}

    def run(self, **metrics) -> str:
        run = self.client.create_run(self.experiment_id)
        for key, value in metrics.items():
            self.client.log_metric(run.info.run_id, key, value)
        self.client.set_terminated(run.info.run_id)
        return run.info.run_id

    def register(self, adapter: str = "good", name: str | None = None, **metrics) -> int:
        from llmplatform.registry import register_adapter

        return register_adapter(self.uri, name or self.name, self.tiny[adapter], self.run(**metrics),
                                self.lineage(), base_model_dir=self.tiny["base"])


@pytest.fixture
def reg(mlflow_server, tiny, experiment_id, tmp_path, monkeypatch) -> Reg:
    monkeypatch.setenv("PLATFORM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("USER", "tester")
    return Reg(mlflow_server, f"bot-{next(_names)}-{uuid.uuid4().hex[:6]}", tiny, experiment_id)
