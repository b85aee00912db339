"""Prompt + parser pairs for the LLM text stages, each an `fvqa.llm.task.LLMTask`.

- `qa` (prompt text, reply model, offline templates), `rules` (the App. D.1 rules checked in code)
  and `qa_task` (the question-generation task and the rule gate every pair passes);
- `tag_task`: knowledge-type tagging by an LLM (prompt, reply model from the taxonomy, checks).

The transport (client, cache, Batch API, the task runner) lives in `fvqa.llm`; the taxonomy and the
offline MiniLM tagger in `fvqa.tagging`; the stages that run these tasks in `fvqa.pipelines`.
"""
