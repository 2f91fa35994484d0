"""`platformctl data`: validate datasets before any compute is allocated."""

from llmplatform.cli.pending import pending_noun

app = pending_noun("data", "Validate datasets and preview rendered examples.", ["validate"], "issue 3, fine-tuning")
