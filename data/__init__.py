"""LoRA collection factory: base models, task suites, batched LoRA fine-tuning, manifests, loaders."""
