"""The parts of bm25s outside its documented API that fvqa relies on, pinned so an upgrade fails here.

`LocalIndex._term_at_a_time` reads the saved index's sparse score matrix (`BM25.scores`: CSC arrays
per vocabulary term) and `vocab_dict` directly, because bm25s's `retrieve` scores and ranks a dense
array of every page per query (14x slower at 200k passages). `extractive_summary` uses `vocab_dict`
to drop unknown query words before `get_scores`. If one of these tests fails after a bm25s upgrade,
adapt those two places (or pin the older bm25s) before shipping.
"""

from __future__ import annotations

from pathlib import Path

import bm25s
import numpy as np
import pytest

from fvqa.search.local_index import LocalIndex
from fvqa.search.summarize import extractive_summary, tokenize

TEXTS = [
    "The Eiffel Tower is a wrought-iron lattice tower in Paris.",
    "The Golden Gate Bridge spans the Golden Gate strait.",
    "Paris hosts the Louvre, the most visited museum.",
    "A lattice bridge is built of small crossing beams.",
    "Tower Bridge crosses the Thames in London near the Tower of London.",
]


def _saved(tmp_path: Path, method: str = "lucene") -> bm25s.BM25:
    retriever = bm25s.BM25(method=method)
    retriever.index(bm25s.tokenize(TEXTS, stopwords="en", show_progress=False), show_progress=False)
    retriever.save(tmp_path / "text", show_progress=False)
    return bm25s.BM25.load(tmp_path / "text", mmap=True, show_progress=False, verbosity=0)


def _index_over(bm25: bm25s.BM25) -> LocalIndex:
    """A LocalIndex holding only the bm25 part (its page store and vectors play no role here)."""
    ix = object.__new__(LocalIndex)
    ix._bm25 = bm25
    return ix


def test_saved_scores_are_csc_arrays_per_vocabulary_term(tmp_path: Path) -> None:
    bm25 = _saved(tmp_path)
    sc = bm25.scores
    assert isinstance(sc, dict), f"bm25s {bm25s.__version__}: BM25.scores is {type(sc).__name__}, not a dict"
    assert {"data", "indices", "indptr", "num_docs"} <= set(sc), f"BM25.scores keys changed: {sorted(sc)}"
    assert int(sc["num_docs"]) == len(TEXTS)
    vocab = bm25.vocab_dict
    assert isinstance(vocab, dict) and all(isinstance(t, str) for t in vocab), "vocab_dict is no longer token -> id"
    assert sorted(int(i) for i in vocab.values()) == list(range(len(vocab))), "vocab ids are not 0..V-1"
    indptr = np.asarray(sc["indptr"])
    words = [t for t in vocab if t]  # bm25s adds "" (its padding token) last, with no column
    assert "" not in vocab or vocab[""] == len(words), "the padding token is no longer the last id"
    assert indptr.shape == (len(words) + 1,), "indptr is not one span per vocabulary term (CSC by term)"
    assert tokenize(["", "the of", "!!!"]) == [[], [], []], "the query tokenizer now yields the padding token"
    assert np.all(np.diff(indptr) >= 0) and int(indptr[-1]) == len(sc["indices"]) == len(sc["data"])
    assert np.asarray(sc["indices"]).max() < len(TEXTS), "indices are not document ids"
    # a term's span holds exactly the documents containing it
    span = slice(int(indptr[vocab["paris"]]), int(indptr[vocab["paris"] + 1]))
    assert sorted(np.asarray(sc["indices"][span]).tolist()) == [0, 2]
    assert bm25.nonoccurrence_array is None, "lucene BM25 now scores absent terms: the posting walk is wrong"


def test_bm25l_still_marks_itself_with_a_nonoccurrence_array(tmp_path: Path) -> None:
    """`search_pages` hands BM25L/BM25+ indexes to `retrieve` because they score every page."""
    assert _saved(tmp_path, "bm25l").nonoccurrence_array is not None


@pytest.mark.parametrize("query", ["paris tower", "golden gate bridge", "lattice", "london thames tower bridge"])
def test_posting_walk_equals_bm25s_retrieve(tmp_path: Path, query: str) -> None:
    bm25 = _saved(tmp_path)
    tokens = [t for t in tokenize([query])[0] if t in bm25.vocab_dict]
    docs, scores = bm25.retrieve([tokens], k=3, show_progress=False, n_threads=0)
    expected = [(int(d), round(float(s), 5)) for d, s in zip(docs[0], scores[0], strict=True) if s > 0]
    got = _index_over(bm25)._term_at_a_time([bm25.vocab_dict[t] for t in tokens], 3)
    assert [round(s, 5) for _, s in got] == [s for _, s in expected]
    assert {d for d, _ in got} == {d for d, _ in expected}


def test_summarizer_uses_vocab_dict_and_get_scores() -> None:
    text = " ".join(TEXTS) + " Nothing else. More filler. Even more filler here."
    summary = extractive_summary(text, "Which museum is in Paris?", max_sentences=2)
    assert summary == "The Eiffel Tower is a wrought-iron lattice tower in Paris. " \
                      "Paris hosts the Louvre, the most visited museum."
