"""Prompt + parser pairs for the text stages (question generation, knowledge-type tagging).

Each module holds one task's prompt text, the pydantic model its reply must match, and the checks
run on that reply in code. The LLM transport lives in `fvqa.llm`; the stages in `fvqa.pipelines`.
"""
