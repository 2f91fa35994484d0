"""llm-platform: fine-tune (LoRA/QLoRA on Ray Train) and serve (Ray Serve) Llama 2, tracked in MLflow.

The import package of the `platform/` source root. Importing it has no side effects.
"""

__version__ = "0.1.0"
