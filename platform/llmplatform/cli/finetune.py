"""`platformctl finetune`: submit, follow, list, inspect and cancel fine-tuning jobs."""

from llmplatform.cli.pending import pending_noun

app = pending_noun("finetune", "Submit and manage LoRA/QLoRA fine-tuning jobs.", ["submit", "list", "status", "logs", "cancel"], "issue 3, fine-tuning")
