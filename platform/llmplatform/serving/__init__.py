"""Serving: an OpenAI-compatible Ray Serve application over the `hf` or `vllm` engine.

`app.build_app(plan_dict)` builds the application from a resolved plan (RayService import path),
`app.deploy(plan)` runs it on a Ray cluster (`backends.serving.deploy_spec` resolves a spec first), `app.ask(url, model, questions)` queries it. Modules: `ingress` (HTTP,
auth, limits, metrics), `replica` (engine deployment, adapter multiplexing), `engines/` (hf,
vllm), `adapters` (model names, registry following), `placement` (the plan's placement group and replicas as Serve options).
"""
