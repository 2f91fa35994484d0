"""LoRA/QLoRA setup: only adapters train, 4-bit layers stay 4-bit, and evaluating a QLoRA model
mid-training leaves its LoRA gradients intact (bitsandbytes' CPU repack trap, STACK-NOTES)."""

import math

import pytest
import torch

from llmplatform.resolve import resolve
from llmplatform.training import batches, loop, model_setup, optimizer as optim

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _setup(spec):
    torch.manual_seed(0)
    tok = model_setup.load_tokenizer(spec.base_model)
    examples = batches.tokenized_examples(spec, tok, "train")
    model = model_setup.load_for_training(spec, spec.base_model, CPU)
    batch = batches.make_batch(examples, list(range(4)), tok.pad_token_id, CPU)
    return tok, examples, model, batch


def _grads(model, batch, amp):
    model.zero_grad(set_to_none=True)
    loss, _, n = loop.token_loss(loop.forward(model, batch, amp, "cpu"), batch["labels"])
    (loss / n).backward()
    return {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.requires_grad}


def test_lora_trains_only_adapters_and_saved_modules(spec_for):
    spec = spec_for(lora={"modules_to_save": ["lm_head"], "target_modules": ["q_proj", "v_proj"]})
    model = model_setup.load_for_training(spec, spec.base_model, CPU)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n or "lm_head" in n for n in names)
    assert any("lm_head" in n for n in names)
    assert not any("k_proj.lora" in n for n in names)
    assert model.training


def test_qlora_base_is_4bit_nf4(spec_for):
    spec = spec_for(method="qlora")
    model = model_setup.load_for_training(spec, spec.base_model, CPU)
    layers = model_setup.quantized_layers(model)
    assert len(layers) == 4 * 7  # every Llama linear in 4 layers
    state = layers[0].weight.quant_state
    assert state.quant_type == "nf4" and state.nested  # double quantisation
    assert model_setup.autocast_dtype(resolve(spec)["precision"]) == torch.bfloat16


def test_qlora_gradients_survive_an_evaluation(spec_for):
    spec = spec_for(method="qlora")
    tok, examples, model, batch = _setup(spec)
    amp = model_setup.autocast_dtype(resolve(spec)["precision"])
    opt = optim.build_optimizer(model, spec.hyperparameters.model_copy(update={"learning_rate": 1e-2}))
    _grads(model, batch, amp)
    opt.step()  # LoRA B leaves zero, so every adapter matrix now gets a gradient
    before = _grads(model, batch, amp)
    ctx = dict(spec=spec, world=1, rank=0, pad_id=tok.pad_token_id, device=CPU, amp_dtype=amp)
    metrics = loop.evaluate(model, examples[:8], ctx)
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))
    assert not model_setup.weights_repacked(model)
    after = _grads(model, batch, amp)
    assert all(float(g.abs().sum()) > 0 for g in after.values())
    assert all(torch.allclose(before[k], after[k]) for k in before)


def test_a_plain_eval_forward_would_corrupt_qlora_gradients(spec_for):
    """The trap `evaluation_mode` avoids, shown on this machine (if it stops reproducing, the guard is moot)."""
    spec = spec_for(method="qlora")
    _, _, model, batch = _setup(spec)
    amp = model_setup.autocast_dtype(resolve(spec)["precision"])
    before = _grads(model, batch, amp)
    model.eval()
    with torch.no_grad():
        loop.forward(model, batch, amp, "cpu")
    model.train()
    if not model_setup.weights_repacked(model):
        pytest.skip("this CPU's bitsandbytes path does not repack 4-bit weights")
    after = _grads(model, batch, amp)
    assert any(not torch.allclose(before[k], after[k]) for k in before)


def test_token_loss_counts_only_trained_labels():
    logits = torch.zeros(1, 4, 5)
    logits[0, 0, 2] = logits[0, 1, 3] = 10.0  # predicts 2 after pos 0, 3 after pos 1
    labels = torch.tensor([[-100, 2, 4, -100]])
    loss, correct, n = loop.token_loss(logits, labels)
    assert int(n) == 2 and int(correct) == 1
