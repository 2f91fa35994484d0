"""Exporting a fine-tuned adapter for use outside the platform.

- `merge`: the base model with the LoRA adapter folded into its weights, saved as safetensors that
  transformers and vLLM load like any checkpoint.
- `gguf`: that merged model as one GGUF file for llama.cpp (bf16, f16 or q8_0), written with the
  `gguf` package.
`llmplatform.registry.export` drives them for a registry reference and records the export on the
model version; this package knows nothing about the registry.
"""
