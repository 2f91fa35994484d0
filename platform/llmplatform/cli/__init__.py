"""platformctl: the admin CLI, one module per noun (stack, plan, spec, data, finetune, models, serve)."""
