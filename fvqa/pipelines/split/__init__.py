"""Balance and split: labelled items -> FVQA-train and FVQA-test with no leakage between them.

In: the `dataset` view (items with tags, labels and human decisions). Work:
0. wait for inputs: an item with no search label yet, or (when the train/test cells use knowledge
   types and the tag stage is on) no tag yet, is not decided now — no row, no reject; it is counted
   in the notes ("waiting for label/tag") and the next `fvqa build` considers it, since it is still
   missing from `splits`;
1. exclude items that cannot be used (`unanswerable`, unknown label, found in a benchmark file) with a
   reject each;
2. group items that must stay together (shared entity/concept, near-duplicate image, duplicate
   normalised question; `fvqa.pipelines.split.leakage`);
3. test first: per-source quotas (paper: 600 visual-concept, 600 InfoSeek, 600 manual), spread
   evenly over knowledge types, each source's own search-label mix, small groups preferred so few
   items are held out; a picked item claims its whole group for the test side;
4. train from the rest: per search class quotas (paper: 3,400 search-required, 1,600 search-free)
   spread evenly over knowledge type x source cells (`fvqa.pipelines.split.balance.water_fill`), fine
   labels alternating within a cell.
Out: one `splits` row per considered item (`train`, `test`, or `unassigned` with the reason in its
provenance), achieved-vs-target per cell in the stage notes.

The split is one decision, so its rows are committed in a single transaction. Rows already in
`splits` (an earlier run, or an upstream import) are kept and count towards the quotas; new items
only fill what is still missing, and never onto the side opposite to an item they are linked to.
That is what makes waiting safe: items that get their tag or label later are assigned by a later run
into the cells still short, on the side their leakage group already has.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from typing import Any

from fvqa.config import SplitConfig
from fvqa.pipelines.base import Stage, StageContext
from fvqa.pipelines.split.balance import cell_reports, round_robin, water_fill
from fvqa.pipelines.split.leakage import (
    UnionFind,
    benchmark_index,
    contamination_match,
    entity_keys,
    near_duplicate_pairs,
    phash_of_file,
    question_key,
)
from fvqa.schema import SearchLabel

STAGE = "split"
UNTAGGED = "untagged"
COLUMNS = ("item_id", "source", "question", "answer", "image_sha256", "concept", "entity_id",
           "entity_text", "knowledge_type", "search_label")


def coarse(label: str) -> str:
    """search_free | search_required (the class the train quotas are set for)."""
    return SearchLabel(label).coarse


class Grouping:
    """Leakage groups over a set of rows, with a readable reason for any link between two items."""

    def __init__(self, rows: list[dict[str, Any]], phashes: dict[str, str], cfg: SplitConfig) -> None:
        self.rows = {r["item_id"]: r for r in rows}
        self.uf = UnionFind(self.rows)
        self.qkey = {r["item_id"]: question_key(r["question"], r["answer"], cfg.question_key) for r in rows}
        self.ekeys = {r["item_id"]: set(entity_keys(r)) for r in rows}
        self.near: dict[str, dict[str, int]] = defaultdict(dict)
        by_key: dict[str, str] = {}
        for r in rows:
            iid = r["item_id"]
            for key in (*self.ekeys[iid], "q:" + self.qkey[iid],
                        *(["img:" + r["image_sha256"]] if r.get("image_sha256") else [])):
                if key in by_key:
                    self.uf.union(iid, by_key[key])
                else:
                    by_key[key] = iid
        with_hash = [r for r in rows if r.get("image_sha256") in phashes]
        pairs = near_duplicate_pairs([phashes[r["image_sha256"]] for r in with_hash], cfg.phash_distance)
        for i, j, dist in pairs:
            a, b = with_hash[i]["item_id"], with_hash[j]["item_id"]
            self.near[a][b] = self.near[b][a] = dist
            self.uf.union(a, b)
        self.members: dict[str, list[str]] = defaultdict(list)
        for iid in self.rows:
            self.members[self.uf.find(iid)].append(iid)
        self.n_near_pairs = len(pairs)

    def group(self, item_id: str) -> str:
        return self.uf.find(item_id)

    def size(self, item_id: str) -> int:
        return len(self.members[self.group(item_id)])

    def link_reason(self, a: str, b: str) -> str | None:
        """Why two items are directly linked, or None if only through other items."""
        shared = self.ekeys[a] & self.ekeys[b]
        if shared:
            return f"shares entity/concept {sorted(shared)[0].split(':', 1)[1]!r}"
        ra, rb = self.rows[a], self.rows[b]
        if ra.get("image_sha256") and ra.get("image_sha256") == rb.get("image_sha256"):
            return "has the same image"
        if b in self.near[a]:
            return f"has a near-duplicate image (phash distance {self.near[a][b]})"
        if self.qkey[a] == self.qkey[b]:
            return "has the same normalised question"
        return None


class SplitStage(Stage):
    """Labelled items -> balanced, leakage-free train/test (`splits`)."""

    name = STAGE
    inputs = ("items", "labels")
    outputs = ("splits",)
    description = "balance labelled items and split them into train/test without leakage"

    def run(self, ctx: StageContext) -> None:
        cfg: SplitConfig = ctx.cfg
        ctx.batch_size = 1 << 60  # one decision: committed all-or-nothing by execute_stage
        ws = ctx.ws
        rows = [dict(zip(COLUMNS, r, strict=True)) for r in ws.execute(
            f"SELECT {', '.join(COLUMNS)} FROM dataset ORDER BY item_id")]
        fixed = {iid: split for iid, split in ws.execute("SELECT item_id, split FROM splits")}
        todo = set(ctx.todo([r["item_id"] for r in rows if r["item_id"] not in fixed]))
        ctx.stats.n_in = len(todo)

        ready = self._wait_for_inputs(ctx, cfg, [r for r in rows if r["item_id"] in todo])
        usable = self._exclude(ctx, cfg, ready)
        pool = [r for r in rows if r["item_id"] in fixed and fixed[r["item_id"]] in ("train", "test")] + usable
        grouping = Grouping(pool, self._phashes(ctx, pool), cfg)
        side: dict[str, str] = {}  # group -> train | test
        for iid, split in fixed.items():
            if split in ("train", "test") and iid in grouping.rows:
                g = grouping.group(iid)
                if side.get(g, split) != split:
                    ctx.stats.notes.append(f"pre-existing leak: group of {iid} is in both train and test")
                side[g] = split
        chosen: dict[str, tuple[str, tuple[str, ...]]] = {}
        self._pick_test(ctx, cfg, usable, fixed, grouping, side, chosen)
        self._pick_train(ctx, cfg, usable, fixed, grouping, side, chosen)
        test_ids = [i for i, s in fixed.items() if s == "test"] + [i for i, v in chosen.items() if v[0] == "test"]
        self._emit(ctx, cfg, usable, grouping, side, chosen, test_ids)
        ctx.stats.extra["near_duplicate_pairs"] = grouping.n_near_pairs
        ctx.stats.extra["leaks"] = len(cross_split_links(grouping, {**fixed, **{k: v[0] for k, v in chosen.items()}}))

    # -- 0. inputs not there yet -----------------------------------------------------------------
    def _wait_for_inputs(self, ctx: StageContext, cfg: SplitConfig, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Rows that have what the split decides on; the others wait (no row, no reject), counted.

        A label is always needed. A tag is needed when cells use knowledge types and the tag stage is
        enabled; an item the tag stage rejected, or tagged without a type, will not get one and goes
        in as `untagged`."""
        from fvqa.pipelines import load_stage

        need_tag = "knowledge_type" in cfg.strata and load_stage("tag").enabled(ctx.config)
        decided = ctx.ws.keys("tags", "item_id") | ctx.ws.rejected_keys("tag") if need_tag else set()
        probe_rejected = ctx.ws.rejected_keys("probe")
        ready, no_label, no_tag = [], [], []
        for r in rows:
            if r["search_label"] is None:
                no_label.append(r["item_id"])
            elif need_tag and r["knowledge_type"] is None and r["item_id"] not in decided:
                no_tag.append(r["item_id"])
            else:
                ready.append(r)
        if no_label:
            gone = sum(1 for i in no_label if i in probe_rejected)
            ctx.stats.notes.append(
                f"{len(no_label)} item(s) waiting for label: not assigned yet (the next build assigns them once "
                f"probed)" + (f"; {gone} of them rejected by probe (see its rejects)" if gone else ""))
        if no_tag:
            ctx.stats.notes.append(f"{len(no_tag)} item(s) waiting for tag: not assigned yet (run the tag stage, "
                                   "then build again)")
        ctx.stats.extra["waiting"] = {"label": len(no_label), "tag": len(no_tag)}
        return ready

    # -- 1. exclusions -------------------------------------------------------------------------
    def _exclude(self, ctx: StageContext, cfg: SplitConfig, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        index = benchmark_index(cfg.contamination_files, cfg.question_key) if cfg.contamination_files else {}
        keep = []
        for r in rows:
            label = r["search_label"]
            if label == SearchLabel.unanswerable:
                ctx.reject(r["item_id"], "unanswerable",
                           "no probe rollout answered it correctly, with or without search")
            elif label not in SearchLabel.__members__:
                ctx.reject(r["item_id"], "unknown_search_label", f"label {label!r} is not one of {list(SearchLabel)}")
            elif index and (bench := contamination_match(r["question"], r["answer"], index, cfg.question_key)):
                ctx.reject(r["item_id"], "benchmark_contamination", f"question found in {bench}: {r['question']!r}")
            else:
                keep.append(r)
        return keep

    def _phashes(self, ctx: StageContext, rows: list[dict[str, Any]]) -> dict[str, str]:
        """sha256 -> phash for the pool's images; missing ones computed once and stored in `images`."""
        if ctx.cfg.phash_distance < 0:
            return {}
        shas = {r["image_sha256"] for r in rows if r.get("image_sha256")}
        known = {sha: (ph, ext) for sha, ph, ext in ctx.ws.execute("SELECT sha256, phash, ext FROM images")}
        out: dict[str, str] = {}
        updates = []
        for sha in ctx.progress(sorted(shas), description="split: image hashes"):
            ph, ext = known.get(sha, (None, None))
            if ph and len(ph) == 16:
                out[sha] = ph
                continue
            if ext is None:
                continue
            try:
                ph = phash_of_file(ctx.ws.image_path(sha, ext))
            except (OSError, ValueError) as exc:
                ctx.stats.notes.append(f"image {sha[:12]} unreadable for phash ({exc}); near-duplicate check skipped")
                continue
            out[sha] = ph
            updates.append((ph, sha))
        if updates:  # one statement: DuckDB's executemany is row by row
            values = ", ".join("(?, ?)" for _ in updates)
            ctx.ws.execute(f"UPDATE images SET phash = u.ph FROM (VALUES {values}) u(ph, sha) "
                           "WHERE images.sha256 = u.sha", [v for pair in updates for v in pair])
        return out

    # -- 2. test ---------------------------------------------------------------------------------
    def _pick_test(self, ctx: StageContext, cfg: SplitConfig, usable: list[dict[str, Any]], fixed: dict[str, str],
                   grouping: Grouping, side: dict[str, str], chosen: dict[str, tuple[str, tuple[str, ...]]]) -> None:
        fixed_rows = [grouping.rows[i] for i, s in fixed.items() if s == "test" and i in grouping.rows]
        for source, quota in sorted(cfg.test_per_source.items()):
            def cell(r: dict[str, Any], source: str = source) -> tuple[str, ...]:
                kt = (r["knowledge_type"] or UNTAGGED) if "knowledge_type" in cfg.strata else "*"
                return (source, kt)

            eligible = [r for r in usable if r["source"] == source and side.get(grouping.group(r["item_id"])) != "train"]
            have = Counter(cell(r) for r in fixed_rows if r["source"] == source)
            supply = Counter(cell(r) for r in eligible) + have
            alloc = water_fill(quota, supply)
            by_cell: dict[tuple[str, ...], list[dict[str, Any]]] = defaultdict(list)
            for r in eligible:
                by_cell[cell(r)].append(r)
            for c, members in sorted(by_cell.items()):
                need = alloc[c] - have[c]
                # the source's own label mix (no alternation: that would drain the scarce class train needs)
                order = round_robin(members, key=lambda r: 0, seed=cfg.seed,
                                    prefer=lambda r: grouping.size(r["item_id"]))
                for r in order[:max(0, need)]:
                    chosen[r["item_id"]] = ("test", c)
                    side[grouping.group(r["item_id"])] = "test"
            self._report(ctx, f"test/{source}", quota, supply, alloc)

    # -- 3. train --------------------------------------------------------------------------------
    def _pick_train(self, ctx: StageContext, cfg: SplitConfig, usable: list[dict[str, Any]], fixed: dict[str, str],
                    grouping: Grouping, side: dict[str, str], chosen: dict[str, tuple[str, tuple[str, ...]]]) -> None:
        def cell(r: dict[str, Any]) -> tuple[str, ...]:
            parts = [coarse(r["search_label"])]
            if "knowledge_type" in cfg.strata:
                parts.append(r["knowledge_type"] or UNTAGGED)
            if "source" in cfg.strata:
                parts.append(r["source"])
            return tuple(parts)

        fixed_rows = [grouping.rows[i] for i, s in fixed.items() if s == "train" and i in grouping.rows]
        eligible = [
            r for r in usable
            if r["item_id"] not in chosen and side.get(grouping.group(r["item_id"])) != "test"
            and (cfg.train_sources is None or r["source"] in cfg.train_sources)
        ]
        quotas = {"search_required": cfg.train_search_required, "search_free": cfg.train_search_free}
        for cls, quota in quotas.items():
            cls_rows = [r for r in eligible if coarse(r["search_label"]) == cls]
            have = Counter(cell(r) for r in fixed_rows if coarse(r["search_label"]) == cls)
            supply = Counter(cell(r) for r in cls_rows) + have
            alloc = water_fill(quota, supply)
            by_cell: dict[tuple[str, ...], list[dict[str, Any]]] = defaultdict(list)
            for r in cls_rows:
                by_cell[cell(r)].append(r)
            for c, members in sorted(by_cell.items()):
                order = round_robin(members, key=lambda r: r["search_label"], seed=cfg.seed)
                for r in order[:max(0, alloc[c] - have[c])]:
                    chosen[r["item_id"]] = ("train", c)
                    side[grouping.group(r["item_id"])] = "train"
            self._report(ctx, f"train/{cls}", quota, supply, alloc)

    # -- 4. out ----------------------------------------------------------------------------------
    def _emit(self, ctx: StageContext, cfg: SplitConfig, usable: list[dict[str, Any]], grouping: Grouping,
              side: dict[str, str], chosen: dict[str, tuple[str, tuple[str, ...]]], test_ids: list[str]) -> None:
        test_members = defaultdict(list)
        for iid in test_ids:
            if iid in grouping.rows:
                test_members[grouping.group(iid)].append(iid)
        counts: Counter[str] = Counter()
        for r in usable:
            iid = r["item_id"]
            g = grouping.group(iid)
            info: dict[str, Any] = {"method": "balanced", "seed": cfg.seed, "group": g, "group_size": grouping.size(iid)}
            if iid in chosen:
                split, cell = chosen[iid]
                info["cell"] = list(cell)
            else:
                split = "unassigned"
                info["reason"] = self._why_unassigned(cfg, r, grouping, side.get(g), test_members.get(g, []))
            counts[split] += 1
            ctx.emit("splits", dict(item_id=iid, split=split, provenance=json.dumps({STAGE: info})))
        ctx.stats.notes.insert(0, "new items: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        ctx.stats.extra["assigned"] = dict(counts)

    @staticmethod
    def _why_unassigned(cfg: SplitConfig, r: dict[str, Any], grouping: Grouping, side: str | None,
                        test_ids: list[str]) -> str:
        if side == "test":
            for o in test_ids:
                why = grouping.link_reason(r["item_id"], o)
                if why:
                    return f"held out to avoid leakage: {why} with test item {o}"
            return "held out to avoid leakage: linked (through other items) to a test item"
        if cfg.train_sources is not None and r["source"] not in cfg.train_sources:
            return f"source {r['source']!r} is not in split.train_sources and its test quota is full"
        return "not selected: its balancing cell had reached its quota"

    @staticmethod
    def _report(ctx: StageContext, name: str, quota: int, supply: Counter[tuple[str, ...]],
                alloc: dict[tuple[str, ...], int]) -> None:
        """Achieved vs target per cell; say which cells ran short."""
        reports = cell_reports(quota, supply, alloc)
        achieved = sum(alloc.values())
        line = f"{name}: {achieved}/{quota}"
        short = [r for r in reports if r.short]
        if achieved < quota:
            line += f" (SHORT by {quota - achieved}: only {sum(supply.values())} usable items)"
        if short:
            line += "; cells below even share " + ", ".join(
                f"{'/'.join(r.cell)} {r.achieved}/{r.target:.1f}" for r in short)
        ctx.stats.notes.append(line)
        ctx.stats.extra.setdefault("cells", {})[name] = [
            {"cell": list(r.cell), "target": round(r.target, 2), "supply": r.supply, "achieved": r.achieved}
            for r in reports]


def cross_split_links(grouping: Grouping, assignment: dict[str, str]) -> list[tuple[str, str]]:
    """Pairs (train item, test item) in one leakage group: must be empty after a split."""
    by_group: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for iid, split in assignment.items():
        if split in ("train", "test") and iid in grouping.rows:
            by_group[grouping.group(iid)][split].append(iid)
    return [(a, b) for sides in by_group.values() for a in sides["train"] for b in sides["test"]]
