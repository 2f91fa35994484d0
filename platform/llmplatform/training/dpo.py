"""Preference tuning (DPO) for the Ray Train loop: pair batches, log-probs, TRL's loss, eval.

A micro-batch of B preference pairs is one padded batch of 2B sequences, the B chosen first
and then the B rejected (TRL's layout). The policy is the LoRA model; the reference is the same
model with its adapter disabled (peft `disable_adapter()`) under `no_grad`, i.e. the frozen
base, so no second copy of the weights is loaded. An answer's log-prob is the sum of its
per-token log-probs over the labelled (answer) tokens.

The loss and its metrics come from TRL 1.16 (`trl.DPOTrainer`): TRL has no free function for
the DPO loss, the formulas of every `loss_type` live inside `DPOTrainer._compute_loss`, which
also runs the model forward through TRL's fused LM head. `trl_loss` calls that method unbound,
with a small stand-in for the trainer (the attributes the method reads) whose "model" returns
the log-probs already computed here and with the reference log-probs passed as precomputed
(TRL's `precompute_ref_logps` path). So the loss, `rewards/chosen`, `rewards/rejected`,
`rewards/margins` and `rewards/accuracies` are TRL's own code and names, without building a
DPOTrainer (a transformers Trainer, accelerate, datasets preprocessing) inside our loop. The
stand-in ties us to TRL's private method; trl is pinned (==1.16.0) and the unit tests check
the numbers against the published formulas, so an upgrade that changes the method fails there.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from types import SimpleNamespace

import torch

from llmplatform.specs import FineTuneSpec
from llmplatform.training import batches, model_setup

IGNORE_INDEX = -100
REWARD_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected")


# ---------------------------------------------------------------------------- data


def tokenized_pairs(spec: FineTuneSpec, tokenizer, split: str) -> list[dict]:
    """The split's preference pairs as {"chosen": {input_ids, labels}, "rejected": {...}}."""
    from llmplatform.data.preference import load_and_tokenize_pairs

    pairs = load_and_tokenize_pairs(spec.data, tokenizer, split, seed=spec.hyperparameters.seed)
    return [{"chosen": p.chosen, "rejected": p.rejected} for p in pairs]


def make_pair_batch(pairs: list[dict], indices: list[int], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """[2B, S] input_ids / attention_mask / labels: the B chosen sequences, then the B rejected."""
    rows = [pairs[i]["chosen"] for i in indices] + [pairs[i]["rejected"] for i in indices]
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):  # right padding, as SFT's collate
        n = len(r["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


# ---------------------------------------------------------------------------- log-probs and loss


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token log-probs of the labels, 0 where unlabelled. logits: [N, S, V]; labels: [N, S] -> [N, S-1]."""
    target = labels[:, 1:]
    mask = target != IGNORE_INDEX
    logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = torch.gather(logps, 2, target.masked_fill(~mask, 0).unsqueeze(-1)).squeeze(-1)
    return picked * mask


def _forward(model, batch: dict, amp_dtype, device_type: str) -> torch.Tensor:
    ctx = torch.autocast(device_type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    with ctx:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def reference_logps(model, batch: dict, amp_dtype, device_type: str) -> torch.Tensor:
    """[2B] summed answer log-probs under the frozen base: the adapter disabled, no gradients."""
    inner = model.module if hasattr(model, "module") else model  # DDP: the reference needs no gradient sync
    with torch.no_grad(), inner.disable_adapter():
        return token_logps(_forward(inner, batch, amp_dtype, device_type), batch["labels"]).sum(-1)


class _Scores:
    """What TRL's fused-LM-head forward returns, for log-probs computed here (see module docstring)."""

    def __init__(self, logps: torch.Tensor, training: bool):
        self.logps, self.training = logps, training

    def __call__(self, **_):
        zeros = torch.zeros_like(self.logps.detach())  # entropy / mean logits / top-1: metrics we do not log
        return SimpleNamespace(log_probs=self.logps, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool(), aux_loss=None)


def _trainer_standin(scores: _Scores, beta: float, loss_type: str, device: torch.device) -> SimpleNamespace:
    """The attributes `DPOTrainer._compute_loss` reads, set as DPOConfig's defaults would set them."""
    identity = lambda t: t  # noqa: E731 - one process: gathering across processes is ours (`all_reduce`)
    return SimpleNamespace(
        model=scores, accelerator=SimpleNamespace(device=device, gather=identity, gather_for_metrics=identity),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=0.0, use_weighting=False,
        args=SimpleNamespace(discopop_tau=0.05), _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1,
    )


def trl_loss(policy_token_logps: torch.Tensor, ref_logps: torch.Tensor, batch: dict, beta: float, loss_type: str,
             training: bool = True) -> tuple[torch.Tensor, dict[str, float]]:
    """(loss, TRL's reward metrics) for a [2B] pair batch, by `trl.DPOTrainer._compute_loss`.

    policy_token_logps: [2B, S-1] from `token_logps` (with grad); ref_logps: [2B] sums (no grad).
    """
    from trl import DPOTrainer

    scores = _Scores(policy_token_logps, training)
    ref_chosen, ref_rejected = ref_logps.detach().chunk(2)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "completion_mask": (batch["labels"] != IGNORE_INDEX).long(), "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    standin = _trainer_standin(scores, beta, loss_type, batch["input_ids"].device)
    loss = DPOTrainer._compute_loss(standin, scores, inputs, return_outputs=False)
    logged = standin._metrics["train" if training else "eval"]
    return loss, {name: float(logged[name][-1]) for name in REWARD_METRICS}


def pair_loss(model, batch: dict, spec: FineTuneSpec, amp_dtype, device_type: str, training: bool = True):
    """Policy forward (with grad when training) + reference forward -> (loss, metrics)."""
    ref = reference_logps(model, batch, amp_dtype, device_type)
    policy = token_logps(_forward(model, batch, amp_dtype, device_type), batch["labels"])
    return trl_loss(policy, ref, batch, spec.dpo.beta, spec.dpo.loss_type, training)


# ---------------------------------------------------------------------------- the loop's DPO steps


def train_step(ctx: dict) -> dict[str, float]:
    """One optimizer step over `gradient_accumulation_steps` micro-batches of preference pairs."""
    from llmplatform.training.loop import _all_reduce, apply_step, no_sync

    spec, model = ctx["spec"], ctx["model"]
    accum = spec.hyperparameters.gradient_accumulation_steps
    sums: dict[str, float] = defaultdict(float)
    tokens_seen = 0.0
    for micro in range(accum):
        batch = make_pair_batch(ctx["train"], ctx["shard"].indices(ctx["position"]), ctx["pad_id"], ctx["device"])
        ctx["position"] += 1
        with contextlib.nullcontext() if micro == accum - 1 else no_sync(model, ctx.get("sharded", False)):
            loss, metrics = pair_loss(model, batch, spec, ctx["amp_dtype"], ctx["device"].type)
            (loss / accum).backward()
        sums["loss"] += float(loss.detach())
        for k, v in metrics.items():
            sums[k] += v
        tokens_seen += batches.count_tokens(batch, ctx["pad_id"])
    grad_norm, lr = apply_step(ctx)
    names = list(sums)
    averaged = _all_reduce([sums[k] / accum for k in names])  # mean over micro-batches, summed over ranks
    out = {k: v / ctx["world"] for k, v in zip(names, averaged)}
    return {**out, "lr": lr, "grad_norm": grad_norm, "tokens": tokens_seen * ctx["world"]}


def evaluate(model, pairs: list[dict], ctx: dict) -> dict[str, float]:
    """Held-out DPO loss and TRL's reward metrics (`eval_rewards/accuracies`: the share of pairs whose
    implicit reward beta * log(pi/ref) is higher for chosen than for rejected), over all ranks."""
    from llmplatform.training.loop import _all_reduce

    if not pairs:
        return {}
    spec: FineTuneSpec = ctx["spec"]
    mb, cap = spec.hyperparameters.micro_batch_size, spec.eval.max_batches
    mine = batches.eval_batches(len(pairs), ctx["world"], ctx["rank"], mb, cap)
    rounds = len(mine)
    if ctx.get("sharded"):  # each forward gathers weights with every rank: run as many as the busiest rank
        rounds = max(len(batches.eval_batches(len(pairs), ctx["world"], r, mb, cap)) for r in range(ctx["world"]))
    names = ["loss", *REWARD_METRICS]
    sums, count = dict.fromkeys(names, 0.0), 0.0
    with model_setup.evaluation_mode(model):
        for i in range(rounds):
            idx = mine[i] if i < len(mine) else (mine[:1] or [[0]])[0]  # past its own batches: a forward to discard
            batch = make_pair_batch(pairs, idx, ctx["pad_id"], ctx["device"])
            loss, metrics = pair_loss(model, batch, spec, ctx["amp_dtype"], ctx["device"].type, training=False)
            if i >= len(mine):
                continue
            for k, v in {"loss": float(loss), **metrics}.items():
                sums[k] += v * len(idx)  # batch means weighted by pairs: exact means over all pairs
            count += len(idx)
    totals = _all_reduce([sums[k] for k in names] + [count])
    n = max(totals[-1], 1.0)
    return {f"eval_{k}": v / n for k, v in zip(names, totals[:-1])}


# ---------------------------------------------------------------------------- outside the loop


@torch.no_grad()
def preference_accuracy(model, tokenizer, pairs: list[dict], beta: float = 0.1, batch_size: int = 16) -> dict[str, float]:
    """Implicit-reward accuracy of a PeftModel on tokenized pairs (reference = its adapter disabled):
    {"accuracy": chosen reward > rejected, "ties": share with equal rewards, "margin": mean margin}."""
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.unk_token_id
    device = next(model.parameters()).device
    wins = ties = margin = 0.0
    for start in range(0, len(pairs), batch_size):
        batch = make_pair_batch(pairs, list(range(start, min(start + batch_size, len(pairs)))), pad, device)
        ref = reference_logps(model, batch, None, device.type)
        policy = token_logps(_forward(model, batch, None, device.type), batch["labels"]).sum(-1)
        chosen, rejected = (beta * (policy - ref)).chunk(2)
        wins += float((chosen > rejected).sum())
        ties += float((chosen == rejected).sum())
        margin += float((chosen - rejected).sum())
    n = max(len(pairs), 1)
    return {"accuracy": wins / n, "ties": ties / n, "margin": margin / n}
