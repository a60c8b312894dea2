"""zoo: a PyTorch Lightning zoo of LLM fine-tuning methods, measured by one harness."""

__version__ = "0.1.0"
