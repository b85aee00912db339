"""File layouts fvqa reads and writes that other tools define, at the bottom of the package (they import
nothing from fvqa): JSONL records (`jsonl`), InfoSeek's files (`infoseek`), and upstream's veRL row with
its candidate-answer rule (`verl`); `shape` checks a record against its declared model and names the
field whose type is wrong."""
