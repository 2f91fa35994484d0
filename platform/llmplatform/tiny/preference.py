"""A synthetic preference task for DPO on llama2-tiny: the same correct answer, two styles.

Questions come from `tasks` (with its fixed held-out split). The chosen answer is the correct
answer in a polite style (`<answer>. Glad to help!`), the rejected one the same answer, curt
(`<answer>. Next question.`), so a policy can only tell them apart by the style it was tuned to
prefer: before tuning the policy equals the reference and has no preference; after DPO the
held-out pairs' implicit rewards should favour the polite answer. Records alternate between the
standard shape (`prompt` string) and the conversational one (message lists), as TRL defines them.
"""

from __future__ import annotations

import json
from pathlib import Path

from llmplatform.tiny.tasks import Item, make_split

POLITE, CURT = "Glad to help!", "Next question."


def preference_record(item: Item, conversational: bool = False) -> dict:
    """One preference record for a task item: polite (chosen) vs curt (rejected)."""
    chosen, rejected = f"{item.answer}. {POLITE}", f"{item.answer}. {CURT}"
    if conversational:
        return {"prompt": [{"role": "user", "content": item.question}],
                "chosen": [{"role": "assistant", "content": chosen}], "rejected": [{"role": "assistant", "content": rejected}]}
    return {"prompt": item.question, "chosen": chosen, "rejected": rejected}


def write_preference_task(out_dir: Path | str, n_train: int = 400, n_eval: int = 100, seed: int = 0, task: str = "addition") -> dict[str, Path]:
    """Write `<out_dir>/polite-train.jsonl` and `polite-eval.jsonl` (held-out questions); return dict(train=, eval=)."""
    train, held = make_split(task, n_train, n_eval, seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"train": out / "polite-train.jsonl", "eval": out / "polite-eval.jsonl"}
    for split, items in (("train", train), ("eval", held)):
        lines = (json.dumps(preference_record(item, conversational=i % 2 == 1)) for i, item in enumerate(items))
        paths[split].write_text("\n".join(lines) + "\n", encoding="utf-8")
    return paths


if __name__ == "__main__":  # python -m llmplatform.tiny.preference OUT_DIR  (what jobs/examples/dpo-tiny.yaml reads)
    import sys

    for split, path in write_preference_task(sys.argv[1] if len(sys.argv) > 1 else ".demo/data").items():
        print(f"{split}: {path}")
