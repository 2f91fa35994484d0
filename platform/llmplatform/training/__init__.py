"""Fine-tuning on Ray Train: LoRA/QLoRA model setup, the per-worker loop, the trainer, MLflow logging.

`entrypoint` is the Ray job driver (`python -m llmplatform.training.entrypoint`); nothing here
does work at import time, and torch/ray/peft are imported only by the modules that need them.
"""
