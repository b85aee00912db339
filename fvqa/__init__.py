"""fvqa: build search-balanced VQA datasets and train/evaluate on-demand search VLMs."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fvqa")  # one home: pyproject.toml
except PackageNotFoundError:  # a source tree on sys.path, not installed
    __version__ = "0+unknown"
