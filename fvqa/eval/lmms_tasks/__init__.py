"""fvqa's optional lmms-eval task pack: ``lmms-eval --include_path <folder> --tasks fvqa_<benchmark>_direct``.

The YAMLs here and `utils` (what they call) score with fvqa's own code, so a number from lmms-eval
equals `fvqa eval run`'s for the same predictions; `export` writes the data files they read (and a
task folder for any eval config). See README.md in this folder.
"""
