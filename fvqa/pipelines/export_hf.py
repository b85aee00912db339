"""The `hf` export in the Hub's own layout, its dataset card, and `fvqa export --push-to-hub`.

The folder is what `datasets.push_to_hub` would leave in a repo: Parquet shards per split under
`data/` (`data/<split>-00000-of-00001.parquet`, images embedded as bytes) and a README whose YAML
holds `configs` (split -> shard pattern) and `dataset_info` (the `Image` feature, counts). So
`datasets.load_dataset(folder)` works on the folder itself and on a repo it was uploaded to unchanged,
and the card is ours (real counts, where the search labels come from, the license from the config),
not the stub `push_to_hub` writes. There is no `save_to_disk` copy: `load_from_disk` cannot read
Parquet, and a second copy of every image would double the folder.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fvqa.errors import FvqaError
from fvqa.pipelines.probe_labels import POPULARITY_METHOD
from fvqa.redact import Scrubber
from fvqa.schema import ITEM_ARROW_SCHEMA
from fvqa.store import Workspace

if TYPE_CHECKING:
    import datasets

    from fvqa.config import RunConfig

DATA_DIR = "data"
"""Shard folder, as `push_to_hub` names it (a shard pattern per split points here)."""
DEMO_URL_HOST = "demo.fvqa.local"
"""Host of every page / image URL of the offline demo world (`fvqa.demo.world.Entity.url`)."""
TOKEN_ENV = "HF_TOKEN"

LABEL_SOURCES = {
    "human": "human annotation (an annotation round's `gold` label)",
    "probe": "probe rollouts of a model (k with search, k without)",
    "prior": "popularity prior from MetaCLIP match counts: a stand-in for the probe, not a model's answers",
    "other": "another labelling method (see `probe_method`)",
    "unlabelled": "no search label",
}
"""Where an item's `search_label` came from, in the order the card lists them."""


class HubPushError(FvqaError):
    """The Hub (or the endpoint in HF_ENDPOINT) refused or could not take the upload."""


@dataclass(frozen=True)
class CardOptions:
    """What the card says that the rows do not: license, name, and whether the world is the demo's."""

    license: str = "cc-by-4.0"
    pretty_name: str = "FVQA (fvqa build)"
    demo_world: bool = False

    @classmethod
    def from_config(cls, config: RunConfig) -> CardOptions:
        """The export section's license / name; a `world` section means the build read the demo world."""
        return cls(license=config.export.license, pretty_name=config.export.pretty_name,
                   demo_world=config.world is not None)


def hf_features() -> datasets.Features:
    """The item schema with `image` as an `Image` feature (decoded to PIL by `datasets`)."""
    import datasets

    features = datasets.Features.from_arrow_schema(ITEM_ARROW_SCHEMA)
    features["image"] = datasets.Image()
    return features


def human_labelled(ws: Workspace) -> set[str]:
    """Items whose search label an annotation round set (the `dataset` view shows it over the probe's)."""
    return {r[0] for r in ws.execute("SELECT item_id FROM gold WHERE search_label IS NOT NULL")}


def label_source(row: dict[str, Any], human: set[str]) -> str:
    """One of LABEL_SOURCES for a `dataset` row: the gold label wins, else the probe method says."""
    if not row.get("search_label"):
        return "unlabelled"
    if row["item_id"] in human:
        return "human"
    method = row.get("probe_method") or ""
    if method == POPULARITY_METHOD:
        return "prior"
    return "probe" if method.startswith("rollouts:") else "other"


def is_demo_row(row: dict[str, Any]) -> bool:
    """Whether a row points at the demo world's fictional pages (for an export run without its config)."""
    return any(DEMO_URL_HOST in (row.get(k) or "") for k in ("page_url", "image_url"))


def size_category(n: int) -> str:
    """The Hub's `size_categories` bucket for n items."""
    bounds = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
              (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B")]
    return next((label for bound, label in bounds if n < bound), "n>1T")


def _table(title: str, counts: Counter[str], total: int | None = None) -> str:
    head = ["### " + title, ""]
    if total is None:
        return "\n".join(head + ["| value | items |", "|---|---|"]
                         + [f"| {k} | {v} |" for k, v in sorted(counts.items())])
    return "\n".join(head + ["| value | items | share |", "|---|---|---|"]
                     + [f"| {k} | {v} | {v / total:.1%} |" for k, v in counts.items()])


def card_body(rows: list[dict[str, Any]], human: set[str], options: CardOptions) -> str:
    """The card's Markdown: what the data is, counts, and where each share of the labels comes from."""
    n = len(rows)
    sources = Counter(label_source(r, human) for r in rows)
    label_counts = Counter({k: sources[k] for k in LABEL_SOURCES if sources[k]})
    methods = Counter(r.get("probe_method") for r in rows
                      if label_source(r, human) in ("probe", "other") and r.get("probe_method"))
    demo = options.demo_world or any(is_demo_row(r) for r in rows)
    lines = [f"# {options.pretty_name}", ""]
    if demo:
        lines += ["> **Fictional data.** This build used fvqa's offline demo world: every entity, image, page "
                  "and fact in it is procedurally generated and fictional. It exists to exercise the pipeline "
                  "end to end; a model trained or evaluated on it learns nothing about the real world.", ""]
    lines += [
        "Search-balanced visual question answering, built with `fvqa build`. Each item carries its lineage "
        "(source, concept and MetaCLIP tier, entity, knowledge type, probe statistics, the 4-way search "
        "label, split, annotation status, and per-stage `provenance` JSON); `image` holds the image bytes.",
        "",
        f"Items: {n}",
        "",
        "## Where the search labels come from",
        "",
    ]
    if n:
        lines += [f"- **{k}**: {v} ({v / n:.1%}) — {LABEL_SOURCES[k]}" for k, v in label_counts.items()]
        if methods:
            lines += ["", "Probe methods: " + ", ".join(f"`{m}` ({c})" for m, c in sorted(methods.items()))]
        if sources["prior"]:
            lines += ["", f"**{sources['prior'] / n:.1%} of the labels are a popularity prior (a stand-in), not "
                      "measured by probing a model**: `probe_method` is `popularity-prior` on those rows."]
        if sources["human"]:
            lines += ["", "A human label (an annotation round's) replaces the probe's in `search_label`; "
                      "`probe_method`, `p_direct` and `p_search` stay the probe's."]
    else:
        lines += ["No items."]
    lines += [
        "",
        "## Counts",
        "",
        _table("Items per split", Counter(r["split"] for r in rows)),
        "",
        _table("Items per search label", Counter(r.get("search_label") or "unlabelled" for r in rows)),
        "",
        _table("Items per knowledge type", Counter(r.get("knowledge_type") or "untagged" for r in rows)),
        "",
        _table("Items per source", Counter(r["source"] for r in rows)),
        "",
        "## License",
        "",
        f"`{options.license}` (set by `export.license` in the build config).",
    ]
    return "\n".join(lines) + "\n"


@contextmanager
def _quiet_datasets() -> Iterator[None]:
    """No per-shard "Creating parquet" bars in a build's output (the stage has its own summary)."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _split_rows(ws: Workspace, rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    by_split: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        image = ({"bytes": ws.find_image(row["image_sha256"]).read_bytes(), "path": None}
                 if row.get("image_sha256") else None)
        by_split.setdefault(row["split"], []).append({**row, "image": image})
    return dict(sorted(by_split.items()))


def export_hf(ws: Workspace, rows: list[dict[str, Any]], root: Path | None = None,
              options: CardOptions | None = None, max_shard_bytes: int | None = None) -> Path:
    """Write `root`/hf (default: the workspace's exports folder) in the Hub's layout; returns the folder.

    Shards hold at most ~`max_shard_bytes` of Arrow data each (default: `datasets`' 500MB, as
    `push_to_hub`), so a large split uploads and streams in pieces."""
    import datasets
    from datasets.info import DatasetInfo, DatasetInfosDict
    from datasets.splits import SplitDict, SplitInfo
    from datasets.utils.metadata import MetadataConfigs
    from datasets.utils.py_utils import convert_file_size_to_int
    from huggingface_hub import DatasetCard, DatasetCardData

    options = options or CardOptions()
    limit = max_shard_bytes or convert_file_size_to_int(datasets.config.MAX_SHARD_SIZE)
    features = hf_features()
    final = (root or ws.exports_dir) / "hf"
    (final / DATA_DIR).mkdir(parents=True, exist_ok=True)
    info = DatasetInfo(config_name="default", features=features, splits=SplitDict(), download_size=0,
                       dataset_size=0)
    data_files = []
    with _quiet_datasets():
        for split, split_rows in _split_rows(ws, rows).items():
            ds = datasets.Dataset.from_list(split_rows, features=features, split=datasets.NamedSplit(split))
            nbytes = ds.data.nbytes
            n_shards = max(1, math.ceil(nbytes / limit))
            for i in range(n_shards):
                path = final / DATA_DIR / f"{split}-{i:05d}-of-{n_shards:05d}.parquet"
                info.download_size += ds.shard(n_shards, i, contiguous=True).to_parquet(str(path))
            info.splits.add(SplitInfo(name=split, num_bytes=nbytes, num_examples=len(ds)))
            info.dataset_size += nbytes
            data_files.append({"split": split, "path": f"{DATA_DIR}/{split}-*"})
    info.size_in_bytes = info.download_size + info.dataset_size

    demo = options.demo_world or any(is_demo_row(r) for r in rows)
    data = DatasetCardData(
        license=options.license, pretty_name=options.pretty_name, language=["en"],
        task_categories=["visual-question-answering"], size_categories=[size_category(len(rows))],
        tags=["fvqa", "search", *(["synthetic", "fictional"] if demo else [])],
    )
    if data_files:
        DatasetInfosDict({"default": info}).to_dataset_card_data(data)
        MetadataConfigs({"default": {"data_files": data_files}}).to_dataset_card_data(data)
    card = DatasetCard(f"---\n{data.to_yaml()}\n---\n\n{card_body(rows, human_labelled(ws), options)}")
    card.save(final / "README.md")
    return final


def hub_token() -> str:
    """The write token from HF_TOKEN (never logged); one clear error line when it is missing."""
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise HubPushError(f"--push-to-hub needs a Hugging Face write token in {TOKEN_ENV} "
                           "(https://huggingface.co/settings/tokens); nothing was uploaded")
    return token


def check_push(repo_id: str) -> None:
    """Fail before exporting when the push cannot work: a malformed repo id, or offline mode."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise HubPushError(f"--push-to-hub {repo_id!r}: not a Hub repo id (owner/name): "
                           f"{str(exc).splitlines()[0]}") from None
    if constants.is_offline_mode():
        raise HubPushError("--push-to-hub: offline mode is on (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set); "
                           "unset it to upload (nothing was uploaded)")


def push_hf(folder: Path, repo_id: str, *, token: str, private: bool = False,
            endpoint: str | None = None) -> str:
    """Create the dataset repo (if needed) and upload `folder` as one commit; returns the repo URL.

    `upload_folder`, not `push_to_hub`, so our README is the card; shards under `data/` that the
    folder no longer has (a split that shrank to fewer shards) are deleted in the same commit, else
    the `data/<split>-*` patterns would still match them. `endpoint` (default: HF_ENDPOINT, else the
    Hub) is read per call, so a test can point it at a loopback stand-in."""
    import httpx
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    check_push(repo_id)
    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or "").rstrip("/") or None
    api = HfApi(endpoint=endpoint, token=token, library_name="fvqa")
    try:
        url = api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        api.upload_folder(folder_path=folder, repo_id=url.repo_id, repo_type="dataset",
                          commit_message="Upload FVQA export (fvqa export --push-to-hub)",
                          delete_patterns=[f"{DATA_DIR}/*.parquet"])
    except (HfHubHTTPError, OfflineModeIsEnabled, httpx.HTTPError, OSError, ValueError) as exc:
        detail = Scrubber([token]).text(" ".join(str(exc).split())) or type(exc).__name__  # one line, no token
        raise HubPushError(f"push to {repo_id} at {api.endpoint} failed: {detail[:500]}") from None
    return str(url)


__all__ = ["CardOptions", "HubPushError", "check_push", "export_hf", "hf_features", "hub_token",
           "label_source", "push_hf"]
