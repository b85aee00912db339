"""MetaCLIP-exact matching: agreement with the naive reference, hand cases, scale, processes."""

from __future__ import annotations

import io
import json
import multiprocessing
import pickle
import random
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rich.console import Console

from fvqa.config import RunConfig
from fvqa.errors import ConfigError
from fvqa.pipelines.match import EntryMatcher, keep_probability, match_texts, spacing
from fvqa.store import Workspace


def reference(entries: list[str], text: str) -> list[int]:
    """MetaCLIP's naive definition, written independently of the implementation."""
    spaced = " " + text + " "
    for p in ",.;:?!`":
        spaced = spaced.replace(p, f" {p} ")
    for c in "\t\n\r":
        spaced = spaced.replace(c, " ")
    return [i for i, e in enumerate(entries) if f" {e} " in spaced]


# Small alphabets so that generated entries actually occur in generated captions.
# "\x00" is the separator chunks are joined with; "\ud800" is a lone surrogate (valid in a str).
ALPHABET = st.sampled_from(list("ab ,.;:?!`\t\n\r-'é日😀") + ["\x00", "\u00a0", "\ud800"])
WORD = st.text(ALPHABET, min_size=0, max_size=6)
ENTRIES = st.lists(WORD, min_size=0, max_size=25)
TEXTS = st.lists(st.text(ALPHABET, max_size=40), min_size=0, max_size=15)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(entries=ENTRIES, texts=TEXTS)
def test_agrees_with_naive_reference(entries: list[str], texts: list[str]) -> None:
    assert match_texts(entries, texts, processes=1) == [reference(entries, t) for t in texts]


@settings(max_examples=200, deadline=None)
@given(entries=st.lists(st.text(max_size=8), max_size=20), text=st.text(max_size=60))
def test_agrees_with_reference_on_arbitrary_unicode(entries: list[str], text: str) -> None:
    # Entries that are substrings of the text, so matches are frequent.
    entries = entries + [text[i:j] for i in range(0, len(text), 7) for j in (i + 3, i + 11)]
    assert match_texts(entries, [text], processes=1) == [reference(entries, text)]


def test_spacing_matches_metaclip_normalisation() -> None:
    assert spacing("a,b") == " a , b "
    assert spacing("x.y;z:w?v!u`t") == " x . y ; z : w ? v ! u ` t "
    assert spacing("tab\there\nnew\rline") == " tab here new line "
    assert spacing("") == "  "
    # Other whitespace and punctuation stay as they are (MetaCLIP does not touch them).
    assert spacing("a\u00a0b-c'd\x0be") == " a\u00a0b-c'd\x0be "


@pytest.mark.parametrize(
    ("entries", "text", "expected"),
    [
        # overlapping entries sharing a word are all reported
        (["a b", "b c", "b", "a b c", "c"], "a b c", [0, 1, 2, 3, 4]),
        # duplicates: every index of a repeated string
        (["dog", "cat", "dog", "dog"], "a dog.", [0, 2, 3]),
        # whole words only: no match inside a longer word
        (["cat"], "concatenate cats", []),
        # punctuation separates words ...
        (["new york", "york"], "New York, new york!", [0, 1]),
        # ... and entries containing wrapped punctuation can never match
        (["st. louis", "u.s.", "st"], "st. louis in the u.s.", [2]),
        # case-sensitive, as MetaCLIP
        (["Paris"], "paris", []),
        # tabs and newlines act as spaces
        (["golden gate", "gate bridge"], "the golden\tgate\nbridge", [0, 1]),
        # the empty entry matches wherever spacing produced two adjacent spaces
        (["", "x"], "x.", [0, 1]),
        (["", "x"], "x", [1]),
        # entries with edge spaces need double spaces in the spaced text
        ([" x", "x "], "a, x", [0]),
        # unicode, including astral characters
        (["東京", "😀 party", "café"], "東京 😀 party at the café!", [0, 1, 2]),
        # an entry that is a suffix of another ending at the same place is reported too
        (["b c", "c", "a b c"], "a b c.", [0, 1, 2]),
        # overlapping occurrences of one entry count once; a duplicate still gets both indices
        (["a a", "a", "a a"], "a a a", [0, 1, 2]),
        # lone surrogates (json.loads can produce them) match like any other character
        (["\ud800", "x \udfff"], "x \udfff, \ud800", [0, 1]),
    ],
)
def test_hand_cases(entries: list[str], text: str, expected: list[int]) -> None:
    assert reference(entries, text) == expected  # the hand expectation is MetaCLIP's answer
    assert match_texts(entries, [text], processes=1) == [expected]


def test_empty_inputs() -> None:
    assert match_texts([], ["anything"]) == [[]]
    assert match_texts(["a"], []) == []
    assert match_texts([], ["a", ""] * 50, processes=2) == [[]] * 100
    assert match_texts(["", "a"], ["", "a", ".", "\n"]) == [[0], [1], [0], [0]]


CHUNK_TEXTS = st.lists(st.one_of(st.text(ALPHABET, max_size=30), st.sampled_from(["", "\x00", "a\x00b"])), max_size=30)


@settings(max_examples=200, deadline=None)
@given(entries=ENTRIES, texts=CHUNK_TEXTS)
def test_chunk_normalised_at_once_equals_each_text_alone(entries: list[str], texts: list[str]) -> None:
    """A chunk is normalised as one joined string; separators inside captions must not leak."""
    matcher = EntryMatcher(entries)
    expected = [reference(entries, t) for t in texts]
    assert matcher.match_chunk(texts) == [matcher.match(t) for t in texts] == expected
    clean = [t for t in texts if "\x00" not in t]  # a chunk the joined path takes
    assert matcher.match_chunk(clean) == [reference(entries, t) for t in clean]


def test_matcher_survives_pickling() -> None:
    """Without fork (macOS, Windows) each worker gets the matcher pickled."""
    entries = ["red car", "car", "café", "car"]
    matcher = pickle.loads(pickle.dumps(EntryMatcher(entries)))
    assert matcher.match("A red car at the café.") == [0, 1, 2, 3]


def test_abandoned_pool_iteration_stops_its_workers() -> None:
    texts = ["a b"] * 5_000
    iterator = EntryMatcher(["a", "b"]).iter_matches(texts, processes=2, chunk_size=50)
    assert next(iterator) == [0, 1]
    start = time.perf_counter()
    iterator.close()  # queued chunks are cancelled and the workers joined, not left running
    assert time.perf_counter() - start < 10
    assert not multiprocessing.active_children()


def test_bad_inputs_raise_clear_errors() -> None:
    with pytest.raises(TypeError, match=r"entry #1 is int"):
        EntryMatcher(["ok", 3])  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"text #2 is NoneType"):
        match_texts(["a"], ["a", "b", None])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="processes must be >= 1"):
        match_texts(["a"], ["a"], processes=0)


def test_processes_give_identical_results_in_order() -> None:
    rng = random.Random(1)
    words = ["red", "car", "blue", "sky", "new", "york", "big", "apple", "é", "日本"]
    entries = words + [f"{a} {b}" for a in words for b in words] + ["red"]
    texts = [
        " ".join(rng.choices(words, k=rng.randint(0, 12))) + rng.choice(["", ".", "!", ",\tx"])
        for _ in range(3_000)
    ]
    single = match_texts(entries, texts, processes=1)
    assert single == [reference(entries, t) for t in texts]
    # a lazy generator input, small chunks so several are in flight at once
    multi = match_texts(entries, (t for t in texts), processes=2, chunk_size=97)
    assert multi == single
    assert any(len(m) > 5 for m in multi)


def test_worker_errors_surface_with_global_position() -> None:
    texts: list[object] = ["a b"] * 250 + [b"bytes"] + ["a"] * 10
    with pytest.raises(TypeError, match=r"text #250 is bytes"):
        match_texts(["a"], texts, processes=2, chunk_size=100)  # type: ignore[arg-type]


@pytest.mark.slow  # ~8 s idle; building a 500k-key automaton is slower on a loaded machine
def test_scale_500k_entries() -> None:
    """The real vocabulary size: build, match a few hundred captions, find planted entries."""
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = sorted({"".join(rng.choices(letters, k=rng.randint(3, 8))) for _ in range(720)})[:710]
    entries = words + [f"{a} {b}" for a in words for b in words][: 500_000 - len(words)]
    rng.shuffle(entries)
    planted = {7: 123_456, 99: 499_999, 300: 0}
    texts = []
    for i in range(400):
        words = ["".join(rng.choices("xyz", k=12)) for _ in range(10)]
        if i in planted:
            words.insert(5, entries[planted[i]] + ",")
        texts.append(" ".join(words))
    start = time.perf_counter()
    matcher = EntryMatcher(entries)
    results = list(matcher.iter_matches(texts))
    assert time.perf_counter() - start < 30
    for i, index in planted.items():
        assert index in results[i]
        assert results[i] == reference(entries, texts[i])  # sub-phrases of the planted entry too
    assert all(results[i] == [] for i in range(400) if i not in planted)


# -- the `match` stage ----------------------------------------------------------------------------
ENTRIES = ["dog", "red car", "car", "new york", "dog", 42, "x.y", "cat"]
POOL = [
    dict(url="http://a/1.jpg", caption="A dog in a red car.", page_url="http://a/1"),
    dict(url="http://a/2.jpg", caption="dog, dog, dog", page_url=None),
    dict(url="http://a/3.jpg", caption="New York at night", page_url="http://a/3"),
    dict(url="http://a/4.jpg", caption="new york\tcar dog", page_url="http://a/4"),
    dict(url="", caption="dog without url", page_url=None),
    dict(url="http://a/6.jpg", caption=None, page_url=None),
    dict(url="http://a/7.jpg", caption="nothing here", page_url=None),
]


def _stage_config(tmp_path: Path, pool: list[dict], entries: list, **match: object) -> RunConfig:
    meta = tmp_path / "metadata.json"
    meta.write_text(json.dumps(entries))
    pq.write_table(pa.Table.from_pylist(pool), tmp_path / "pool.parquet")
    return RunConfig.model_validate({
        "workspace": str(tmp_path / "ws"),
        "concepts": {"metadata_path": str(meta), "threshold": 2},
        "match": {"enabled": True, "pool": str(tmp_path / "pool.parquet"), "processes": 1, **match},
    })


def _run(config: RunConfig, force: tuple[str, ...] = ()) -> dict:
    from fvqa.pipelines.runner import run_build

    return run_build(config, only=["match"], force=force, console=Console(file=io.StringIO()))


def test_stage_counts_candidates_and_rejects(tmp_path: Path) -> None:
    config = _stage_config(tmp_path, POOL, ENTRIES, candidates_per_concept=2)
    stats = _run(config)["match"]
    strs = [e if isinstance(e, str) else "\n" for e in ENTRIES]  # "\n" can never match
    usable = [r for r in POOL if r["url"] and r["caption"] is not None]
    expected = [sum(i in reference(strs, r["caption"]) for r in usable) for i in range(len(ENTRIES))]
    with Workspace(config.workspace) as ws:
        counts = dict(ws.execute("SELECT entry_id, count FROM entry_counts ORDER BY entry_id"))
        assert [counts[i] for i in range(len(ENTRIES))] == expected == [3, 1, 2, 1, 3, 0, 0, 0]
        cands = ws.execute("SELECT entry_id, rank, url, page_url FROM match_candidates ORDER BY 1, 2")
        by_entry: dict[int, list[str]] = {}
        for eid, _rank, url, _page in cands:
            by_entry.setdefault(eid, []).append(url)
        assert by_entry[3] == ["http://a/4.jpg"]  # "New York" is case-sensitive: only row 4
        assert set(by_entry[2]) == {"http://a/1.jpg", "http://a/4.jpg"}
        assert len(by_entry[0]) == 2 and set(by_entry[0]) <= {"http://a/1.jpg", "http://a/2.jpg", "http://a/4.jpg"}
        rejects = dict(ws.execute("SELECT key, reason FROM rejects WHERE stage = 'match'"))
    assert rejects == {"entry:5": "wrong_type", "pool:pool.parquet:4": "field_missing",
                       "pool:pool.parquet:5": "field_missing"}
    assert stats.n_in == len(POOL) and stats.n_out == 3  # rows 1, 2 and 4 match an entry

    # a re-run is a no-op; --force recomputes the same thing without duplicates
    assert "already computed" in " ".join(_run(config)["match"].notes)
    _run(config, force=("match",))
    with Workspace(config.workspace) as ws:
        assert ws.count("entry_counts") == len(ENTRIES)
        assert dict(ws.execute("SELECT entry_id, count FROM entry_counts")) == counts


def test_keep_probability_is_metaclip_formula() -> None:
    assert keep_probability([1, 2], threshold=2) == 1.0  # tail entries keep everything
    assert keep_probability([8], threshold=2) == pytest.approx(0.25)
    assert keep_probability([8, 4], threshold=2) == pytest.approx(1 - 0.75 * 0.5)
    assert keep_probability([], threshold=2) == 0.0


def test_stage_balancing_caps_head_entries_and_is_seeded(tmp_path: Path) -> None:
    pool = [dict(url=f"http://h/{i}.jpg", caption=f"photo of a dog number {i}") for i in range(400)]
    pool += [dict(url=f"http://t/{i}.jpg", caption=f"a rare cat {i}") for i in range(2)]
    config = _stage_config(tmp_path, pool, ["dog", "cat"], balance=True, seed=3)
    stats = _run(config)["match"]
    with Workspace(config.workspace) as ws:
        rows = ws.execute("SELECT entry, count, balanced_count FROM entry_counts ORDER BY entry_id")
    (_, dog, dog_kept), (_, cat, cat_kept) = rows
    assert (dog, cat, cat_kept) == (400, 2, 2)  # raw counts stay raw; the tail keeps everything
    assert 0 < dog_kept < 12  # expected t = 2 of 400
    assert stats.n_out == dog_kept + cat_kept
    _run(config, force=("match",))
    with Workspace(config.workspace) as ws:
        assert ws.execute("SELECT entry, count, balanced_count FROM entry_counts ORDER BY entry_id") == rows


@pytest.mark.parametrize(
    ("pool", "message"),
    [(None, "not found"), ([dict(link="x", caption="y")], "lacks column.*url")],
)
def test_stage_bad_pool_is_a_clear_config_error(tmp_path: Path, pool: list | None, message: str) -> None:
    config = _stage_config(tmp_path, pool or [dict(url="u", caption="c")], ["dog"])
    if pool is None:
        (tmp_path / "pool.parquet").unlink()
    with pytest.raises(ConfigError, match=message):
        _run(config)


def test_stage_with_worker_processes_counts_the_same(tmp_path: Path) -> None:
    """A pool large enough for workers (forked while the DuckDB catalog is open) gives exact counts."""
    rng = random.Random(5)
    words = ["dog", "cat", "red", "car", "sky", "new", "york"]
    entries = words + ["red car", "new york", "sky"]
    pool = [dict(url=f"http://p/{i}.jpg", caption=" ".join(rng.choices(words, k=6)) + rng.choice([".", ""]))
            for i in range(6_000)]
    config = _stage_config(tmp_path, pool, entries, processes=2)
    _run(config)
    expected = [0] * len(entries)
    for row in pool:
        for i in reference(entries, row["caption"]):
            expected[i] += 1
    with Workspace(config.workspace) as ws:
        assert [c for (c,) in ws.execute("SELECT count FROM entry_counts ORDER BY entry_id")] == expected
