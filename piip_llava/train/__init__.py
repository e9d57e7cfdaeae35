"""Training: arguments, model setup (freeze policy, LoRA, stage-1 projector), trainer, entry point `main`."""
