"""Knowledge-type tagging without an LLM: the taxonomy and the offline MiniLM zero-shot classifier.

`taxonomy` holds the paper's eight level-1 types with their one-line definitions (and optional
level-2 subtypes); both taggers read it: the LLM tag task (`fvqa.textgen.tag_task`) puts it in its
prompt, `minilm` embeds it. The classifier is used by the tag stage (`tag.backend=minilm`), the
InfoSeek stage's pre-tag of entity names and `bench/bench_tag.py`, so it lives below the stages.
"""
