"""Evaluation jobs: a registry of answer scorers, and the runner that generates, scores and records.

`scorers` is pure Python (no torch): specs import it to check metric names before any compute.
`runner` generates answers with the platform's own engine and writes MLflow runs and version tags.
"""
