"""cairn: a PyTorch-native LLM training platform with checkpoints you can trust."""

__version__ = "0.1.0"
