"""DPO loss and metrics through TRL's DPOTrainer code equal the published formulas; the reference
is the frozen base (adapter disabled); log-probs are sums over the answer tokens only."""

from __future__ import annotations

import math

import pytest
import torch

from llmplatform.training import dpo

# two pairs: policy / reference summed answer log-probs, chosen then rejected (TRL's layout)
POLICY = torch.tensor([-5.0, -9.0, -7.0, -6.0])  # chosen0, chosen1, rejected0, rejected1
REF = torch.tensor([-6.0, -8.0, -6.5, -6.5])
ANSWER_TOKENS = [3, 2, 4, 1]  # labelled tokens per sequence


def _batch_and_token_logps(total: torch.Tensor, answer_tokens: list[int], width: int = 8):
    """A [4, width] batch whose per-token log-probs sum to `total` over each answer's tokens."""
    labels = torch.full((4, width), -100)
    token_logps = torch.zeros(4, width - 1)
    for i, n in enumerate(answer_tokens):
        labels[i, width - n :] = 7
        token_logps[i, width - 1 - n :] = total[i] / n
    batch = {"input_ids": torch.ones(4, width, dtype=torch.long), "attention_mask": torch.ones(4, width, dtype=torch.long), "labels": labels}
    return batch, token_logps.requires_grad_()


def _expected(loss_type: str, beta: float) -> float:
    cr = (POLICY - REF)[:2]  # chosen log-ratios
    rr = (POLICY - REF)[2:]
    d = cr - rr
    if loss_type == "sigmoid":  # DPO, Rafailov et al. eq. 7
        per = [-math.log(1 / (1 + math.exp(-beta * float(x)))) for x in d]
    elif loss_type == "hinge":  # SLiC
        per = [max(0.0, 1 - beta * float(x)) for x in d]
    else:  # IPO eq. 17, per answer token (TRL's normalisation)
        n = torch.tensor(ANSWER_TOKENS, dtype=torch.float)
        avg = cr / n[:2] - rr / n[2:]
        per = [(float(x) - 1 / (2 * beta)) ** 2 for x in avg]
    return sum(per) / len(per)


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_trl_loss_equals_the_published_formula(loss_type, beta):
    batch, token_logps = _batch_and_token_logps(POLICY, ANSWER_TOKENS)
    loss, metrics = dpo.trl_loss(token_logps, REF, batch, beta, loss_type)
    assert float(loss.detach()) == pytest.approx(_expected(loss_type, beta), rel=1e-5)
    loss.backward()
    assert token_logps.grad is not None and token_logps.grad.abs().sum() > 0  # the policy gets gradients
    rewards = beta * (POLICY - REF)
    assert metrics["rewards/chosen"] == pytest.approx(float(rewards[:2].mean()))
    assert metrics["rewards/rejected"] == pytest.approx(float(rewards[2:].mean()))
    assert metrics["rewards/margins"] == pytest.approx(float((rewards[:2] - rewards[2:]).mean()))
    assert metrics["rewards/accuracies"] == 0.5  # pair 0 prefers chosen (+1.5 vs -0.5), pair 1 does not (-1 vs +0.5)


@pytest.mark.parametrize("loss_type", ["sigmoid_norm", "nca_pair", "bco_pair", "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down"])
def test_every_accepted_loss_type_runs_through_trl(loss_type):
    from llmplatform.specs import DPO_LOSS_TYPES

    assert loss_type in DPO_LOSS_TYPES
    batch, token_logps = _batch_and_token_logps(POLICY, ANSWER_TOKENS)
    loss, _ = dpo.trl_loss(token_logps, REF, batch, 0.1, loss_type)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(token_logps.grad).all()


def test_token_logps_sum_only_answer_tokens():
    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[-100, -100, 3, 4, 5], [-100, 6, 7, -100, -100]])
    got = dpo.token_logps(logits, labels)
    logp = torch.log_softmax(logits, -1)
    assert got.shape == (2, 4)
    assert float(got[0].sum()) == pytest.approx(float(logp[0, 1, 3] + logp[0, 2, 4] + logp[0, 3, 5]), rel=1e-6)
    assert float(got[1].sum()) == pytest.approx(float(logp[1, 0, 6] + logp[1, 1, 7]), rel=1e-6)


def test_pair_batch_puts_chosen_first_and_pads_right():
    pairs = [{"chosen": {"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, "rejected": {"input_ids": [1, 2], "labels": [-100, 9]}},
             {"chosen": {"input_ids": [1, 5], "labels": [-100, 5]}, "rejected": {"input_ids": [1, 6, 6, 6], "labels": [-100, 6, 6, 6]}}]
    b = dpo.make_pair_batch(pairs, [1, 0], pad_id=0, device=torch.device("cpu"))
    assert b["input_ids"].tolist() == [[1, 5, 0, 0], [1, 2, 3, 0], [1, 6, 6, 6], [1, 2, 0, 0]]
    assert b["labels"][3].tolist() == [-100, 9, -100, -100] and b["attention_mask"][1].tolist() == [1, 1, 1, 0]


def test_reference_is_the_base_with_the_adapter_disabled(tiny_random_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_random_dir), dtype=torch.float32).eval()
    batch = {"input_ids": torch.tensor([[1, 5, 6, 7], [1, 8, 9, 10]]), "attention_mask": torch.ones(2, 4, dtype=torch.long),
             "labels": torch.tensor([[-100, -100, 6, 7], [-100, -100, 9, 10]])}
    with torch.no_grad():
        expected = dpo.token_logps(base(input_ids=batch["input_ids"]).logits, batch["labels"]).sum(-1)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    ref = dpo.reference_logps(model, batch, None, "cpu")
    policy = dpo.token_logps(model(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits, batch["labels"]).sum(-1)
    assert torch.allclose(ref, expected, atol=1e-5) and not ref.requires_grad
    assert not torch.allclose(policy, expected, atol=1e-3)  # the (random, non-zero) adapter changes the policy only
