"""fvqa: build search-balanced VQA datasets and train/evaluate on-demand search VLMs."""

__version__ = "0.1.0"
