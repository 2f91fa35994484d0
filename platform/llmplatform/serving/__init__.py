"""Serving: an OpenAI-compatible Ray Serve application over the `hf` or `vllm` engine.

`app.build_app(spec_dict)` builds the application (RayService import path), `app.deploy(spec)`
runs it on a Ray cluster, `app.ask(url, model, questions)` queries it. Modules: `ingress` (HTTP,
auth, limits, metrics), `replica` (engine deployment, adapter multiplexing), `engines/` (hf,
vllm), `adapters` (model names, registry following), `placement` (placement groups, autoscaling).
"""
