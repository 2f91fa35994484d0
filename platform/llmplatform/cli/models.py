"""`platformctl models`: the model registry (MLflow aliases), promotion and rollback."""

from llmplatform.cli.pending import pending_noun

app = pending_noun("models", "Registered adapters: list, show, promote, rollback.", ["list", "show", "promote", "rollback"], "issue 4, model registry")
