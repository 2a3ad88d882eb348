"""torchrun environment, DeepSpeed configuration and engine."""
