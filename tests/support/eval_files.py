"""Benchmark files for eval tests: the demo's five official layouts (`fvqa.demo.benchmarks`)."""

from __future__ import annotations

from fvqa.demo.benchmarks import entities, image_of, question
from fvqa.demo.benchmarks import write_demo_benchmarks as write_benchmarks

__all__ = ["entities", "image_of", "question", "write_benchmarks"]
