"""OpenAI-compatible LLM layer: async client with cache, retries, cost ledger, JSON output, Batch API."""

from fvqa.llm.batch import BatchOutcome, BatchRunner
from fvqa.llm.client import LLMClient, LLMResult
from fvqa.llm.config import Endpoint, LLMConfig, Price
from fvqa.llm.images import image_part
from fvqa.llm.ledger import CostEstimate, CostLedger, estimate_cost
from fvqa.llm.structured import StructuredResult, complete_json

__all__ = [
    "BatchOutcome",
    "BatchRunner",
    "CostEstimate",
    "CostLedger",
    "Endpoint",
    "LLMClient",
    "LLMConfig",
    "LLMResult",
    "Price",
    "StructuredResult",
    "complete_json",
    "estimate_cost",
    "image_part",
]
