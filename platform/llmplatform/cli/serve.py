"""`platformctl serve`: OpenAI-compatible deployments on Ray Serve."""

from llmplatform.cli.pending import pending_noun

app = pending_noun("serve", "Deploy and manage OpenAI-compatible endpoints.", ["deploy", "status", "list", "delete", "chat"], "issue 5, serving")
