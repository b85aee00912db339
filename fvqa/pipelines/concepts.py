"""concepts: MetaCLIP vocabulary + entry counts -> a seeded head/tail sample of visual concepts.

MetaCLIP's `metadata.json` is a JSON list of strings whose list index is the entry id; its counts
come as a list aligned with the entries, a dict entry -> count, or the `entry_counts` table written
by the `match` stage. Tier: head = count >= t (MetaCLIP's t = 20,000), tail = 0 < count < t, zero =
never matched. Entries that cannot be a visual concept (numbers, punctuation, too short...) are
dropped with a reason before sampling, so the summary says how much of the vocabulary was usable.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fvqa.config import ConceptsConfig, RunConfig
from fvqa.errors import ConfigError
from fvqa.formats.jsonl import BadLine, parse_jsonl
from fvqa.pipelines.base import Stage, StageContext
from fvqa.store import now

STAGE = "concepts"
TIERS = ("head", "tail", "zero")


@dataclass(frozen=True)
class Entry:
    """One usable vocabulary entry with its count and tier."""

    entry_id: int
    text: str
    count: int
    tier: str


def concept_id(entry_id: int) -> str:
    """Stable id: MetaCLIP's entry id (its list index) never changes for a given metadata.json."""
    return f"metaclip-{entry_id:06d}"


def tier_of(count: int, threshold: int) -> str:
    """head >= t, tail in (0, t), zero = never matched."""
    if count >= threshold:
        return "head"
    return "tail" if count > 0 else "zero"


def _load_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{what} {path} is not valid JSON: {exc}") from exc


def resolve_paths(cfg: ConceptsConfig, config: RunConfig) -> tuple[Path, Path | None, Path | None]:
    """metadata.json, counts file (None when counts come from `match`) and categories file.

    A demo world's files are filled in at load (`fvqa.config`), so unset here means no world.
    """
    metadata = cfg.metadata_path
    if metadata is None:
        raise ConfigError("concepts.metadata_path is not set (and no demo world is configured)")
    counts = None
    if not cfg.use_match_counts:
        counts = cfg.counts_path
        if counts is None:
            raise ConfigError("concepts.counts_path is not set (set it, or use_match_counts: true after `match`)")
    return metadata, counts, cfg.categories_path


def load_counts(data: Any, entries: list[Any], source: str) -> list[int | None]:
    """Counts aligned with entries; None where the file has no count (the entry counts as zero)."""
    if isinstance(data, list):
        if len(data) != len(entries):
            raise ConfigError(f"{source}: a counts list must align with metadata.json "
                              f"({len(data)} counts for {len(entries)} entries)")
        return [c if isinstance(c, int) and not isinstance(c, bool) and c >= 0 else None for c in data]
    if isinstance(data, dict):
        out: list[int | None] = []
        for e in entries:
            c = data.get(e) if isinstance(e, str) else None
            out.append(c if isinstance(c, int) and not isinstance(c, bool) and c >= 0 else None)
        return out
    raise ConfigError(f"{source}: counts must be a JSON list aligned with the entries or a dict entry -> count")


def match_counts(ws: Any, entries: list[Any]) -> list[int | None]:
    """Counts from the `match` stage's `entry_counts` table (keyed by entry_id or by entry text)."""
    if "entry_counts" not in ws.tables():
        raise ConfigError("concepts.use_match_counts is set but the workspace has no `entry_counts` table; "
                          "run the `match` stage first")
    cols = {r[0] for r in ws.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_name = 'entry_counts'")}
    if "count" not in cols:
        raise ConfigError(f"`entry_counts` has no `count` column (columns: {', '.join(sorted(cols))})")
    counts: list[int | None] = [0] * len(entries)
    if "entry_id" in cols:
        for eid, c in ws.execute("SELECT entry_id, count FROM entry_counts"):
            if eid is not None and 0 <= int(eid) < len(entries):
                counts[int(eid)] = int(c or 0)
        return counts
    key = "entry" if "entry" in cols else "concept" if "concept" in cols else None
    if key is None:
        raise ConfigError("`entry_counts` needs an entry_id, entry or concept column")
    by_text = {str(e): int(c or 0) for e, c in ws.execute(f"SELECT {key}, count FROM entry_counts")}
    return [by_text.get(e, 0) if isinstance(e, str) else None for e in entries]


def load_categories(path: Path | None) -> dict[str, str]:
    """concept text -> category from json {concept: category} or jsonl rows with name/concept + category."""
    if path is None:
        return {}
    if not path.is_file():
        raise ConfigError(f"concepts.categories_path not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object concept -> category")
        return {str(k): str(v) for k, v in data.items()}
    out = {}
    for rec in parse_jsonl(text):
        if isinstance(rec, BadLine):
            raise ConfigError(f"{path}:{rec.line_no}: {rec.reason}")
        row = rec[1]
        name = row.get("concept") or row.get("name")
        cat = row.get("category") or row.get("knowledge_type")
        if name and cat:
            out[str(name)] = str(cat)
    return out


def _read_list(path: Path | None) -> set[str] | None:
    if path is None:
        return None
    if not path.is_file():
        raise ConfigError(f"allow/deny list not found: {path}")
    return {line.strip().casefold() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()}


def filter_reason(text: Any, cfg: ConceptsConfig, allow: set[str] | None, deny: set[str] | None) -> str | None:
    """Why an entry cannot be a visual concept, or None if it can."""
    if not isinstance(text, str):
        return "wrong_type"
    s = text.strip()
    if not s:
        return "empty"
    if not any(ch.isalpha() for ch in s):
        return "no_letters"
    if len(s) < cfg.min_chars:
        return "too_short"
    if len(s) > cfg.max_chars:
        return "too_long"
    if deny is not None and s.casefold() in deny:
        return "on_deny_list"
    if allow is not None and s.casefold() not in allow:
        return "not_on_allow_list"
    return None


def sample_tiers(pool: dict[str, list[Entry]], cfg: ConceptsConfig) -> tuple[list[Entry], list[str]]:
    """Seeded sample of n entries split head/tail/zero by the configured fractions.

    A tier with too few entries gives what it has and the shortfall is taken from the other tiers
    (head/tail first), with a note, so `n` is met whenever the vocabulary allows.
    """
    rng = random.Random(cfg.seed)
    want = {"head": round(cfg.n * cfg.head_fraction), "zero": round(cfg.n * cfg.zero_fraction)}
    want["tail"] = max(0, cfg.n - want["head"] - want["zero"])
    shuffled = {}
    for tier in TIERS:
        items = sorted(pool.get(tier, []), key=lambda e: e.entry_id)
        rng.shuffle(items)
        shuffled[tier] = items
    chosen = {t: shuffled[t][: want[t]] for t in TIERS}
    notes = []
    short = sum(want[t] - len(chosen[t]) for t in TIERS)
    if short:
        for t in TIERS:
            if want[t] > len(chosen[t]):
                notes.append(f"tier {t}: asked {want[t]}, only {len(chosen[t])} usable entries")
        fill_order = ("tail", "head") + (("zero",) if cfg.zero_fraction > 0 else ())
        for t in fill_order:
            extra = shuffled[t][len(chosen[t]): len(chosen[t]) + short]
            chosen[t] = chosen[t] + extra
            short -= len(extra)
            if extra:
                notes.append(f"took {len(extra)} more from tier {t} to reach n={cfg.n}")
    out = [e for t in TIERS for e in chosen[t]]
    return sorted(out, key=lambda e: e.entry_id), notes


def usable_entries(
    entries: list[Any], counts: list[int | None], cfg: ConceptsConfig, ctx: StageContext
) -> dict[str, list[Entry]]:
    """Apply the filters (each drop is a reject with its reason) and bucket the rest by tier."""
    allow, deny = _read_list(cfg.allow_list), _read_list(cfg.deny_list)
    seen: dict[str, int] = {}
    pool: dict[str, list[Entry]] = {t: [] for t in TIERS}
    ctx.batch_size = max(ctx.batch_size, 5_000)  # many small rejects: fewer, larger transactions
    for eid, (text, count) in enumerate(zip(entries, counts, strict=True)):
        key = f"entry-{eid}"
        reason = filter_reason(text, cfg, allow, deny)
        if reason is not None:
            ctx.reject(key, reason, f"entry {eid}: {str(text)[:200]!r}")
            continue
        norm = text.strip().casefold()
        if norm in seen:
            ctx.reject(key, "duplicate_entry", f"entry {eid} {text!r} repeats entry {seen[norm]}")
            continue
        seen[norm] = eid
        c = count or 0
        pool[tier_of(c, cfg.threshold)].append(Entry(eid, text.strip(), c, tier_of(c, cfg.threshold)))
    return pool


class ConceptsStage(Stage):
    """metadata.json + counts -> `concepts` (head/tail/zero tiers, seeded sample)."""

    name = STAGE
    outputs = ("concepts",)
    description = "sample head/tail visual concepts from the MetaCLIP vocabulary"

    def run(self, ctx: StageContext) -> None:
        cfg: ConceptsConfig = ctx.cfg
        metadata, counts_path, categories_path = resolve_paths(cfg, ctx.config)
        entries = _load_json(metadata, "concepts.metadata_path")
        if not isinstance(entries, list):
            raise ConfigError(f"{metadata}: MetaCLIP metadata must be a JSON list of strings")
        if counts_path is None:
            counts, counts_source = match_counts(ctx.ws, entries), "match:entry_counts"
        else:
            counts = load_counts(_load_json(counts_path, "concepts.counts_path"), entries, str(counts_path))
            counts_source = counts_path.name
        categories = {k.casefold(): v for k, v in load_categories(categories_path).items()}
        ctx.stats.n_in = len(entries)
        missing = sum(1 for c in counts if c is None)
        if missing:
            ctx.stats.notes.append(f"{missing} entries have no count in {counts_source}: treated as zero")

        pool = usable_entries(entries, counts, cfg, ctx)
        ctx.stats.extra["population"] = {t: len(pool[t]) for t in TIERS}
        sample, notes = sample_tiers(pool, cfg)
        ctx.stats.notes.extend(notes)
        ctx.stats.extra["sampled"] = {t: sum(1 for e in sample if e.tier == t) for t in TIERS}
        ctx.stats.notes.append(
            "vocabulary by tier: " + ", ".join(f"{t} {len(pool[t])}" for t in TIERS)
            + " | sampled: " + ", ".join(f"{t} {n}" for t, n in ctx.stats.extra["sampled"].items()))

        todo = set(ctx.todo([concept_id(e.entry_id) for e in sample], column="concept_id"))
        stamp = now().isoformat()
        for e in ctx.progress(_only(sample, todo), total=len(todo), description=STAGE):
            ctx.emit("concepts", dict(
                concept_id=concept_id(e.entry_id), entry_id=e.entry_id, concept=e.text, count=e.count,
                tier=e.tier, category=categories.get(e.text.casefold()),
                provenance=json.dumps({STAGE: {
                    "source": "metaclip", "metadata": metadata.name, "counts": counts_source,
                    "threshold": cfg.threshold, "seed": cfg.seed, "time": stamp}}),
            ))


def _only(sample: Iterable[Entry], todo: set[str]) -> list[Entry]:
    return [e for e in sample if concept_id(e.entry_id) in todo]
