"""tunesmith: local-first LLM fine-tuning with built-in baselines."""

__version__ = "0.1.0"
