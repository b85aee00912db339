"""`fvqa search ...`: build the local index, serve the search service, and try a query by hand.

Mounted by `fvqa.cli` as the `search` sub-app. Heavy imports happen inside commands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

search_app = typer.Typer(help="Search tools: local index, search service, ad-hoc queries.", no_args_is_help=True)
index_app = typer.Typer(help="The offline local search index.", no_args_is_help=True)
search_app.add_typer(index_app, name="index")

out = Console()
err = Console(stderr=True)

ConfigOpt = Annotated[Path | None, typer.Option(
    "--config", "-c", help="A build or eval YAML config (its `search` section and `workspace`).")]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="Override a config value: search.key=value (repeatable).")
]


def _search_config(config: Path | None, overrides: list[str] | None):
    """(SearchConfig, cache dir) from a config file; the cache defaults to <workspace>/cache/search."""
    from fvqa.search.config import load_search_file

    found = load_search_file(config, overrides)
    return found.search, found.cache_dir


@index_app.command("build")
def index_build(
    corpus: Annotated[Path, typer.Option(help="Pages jsonl (Wiki6M fields or {url, title, text}).")],
    out_dir: Annotated[Path, typer.Option(
        "--out", help="Index folder to write (replaced when the build succeeds; one build per folder at a time).")],
    images: Annotated[Path | None, typer.Option(help="Image manifest jsonl or a folder of images.")] = None,
    clip_model: Annotated[str | None, typer.Option(help="open_clip model name (default: from config).")] = None,
    clip_pretrained: Annotated[str | None, typer.Option(help="open_clip pretrained tag (default: from config).")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Build the BM25 text index and the CLIP image index from a page corpus and images."""
    from fvqa.search.local_index import build_index

    cfg, _ = _search_config(config, set_)
    local = cfg.local.model_copy(update={
        k: v for k, v in {"clip_model": clip_model, "clip_pretrained": clip_pretrained}.items() if v is not None
    })
    with err.status("building index...") as status:
        stats = build_index(corpus, images, out_dir, config=local,
                            progress=lambda phase, done, total: status.update(f"{phase}: {done}"))
    table = Table(title=f"search index {out_dir}")
    table.add_column("what")
    table.add_column("count", justify="right")
    table.add_row("pages", str(stats.pages))
    table.add_row("images", str(stats.images))
    for reason, n in sorted(stats.rejected.items()):
        table.add_row(f"rejected - {reason}", str(n))
    table.add_row("size (MB)", f"{stats.bytes_on_disk / 1e6:.1f}")
    table.add_row("seconds", f"{stats.seconds:.1f}")
    out.print(table)
    if local.clip_pretrained is None:
        err.print("[yellow]note:[/] random CLIP weights (clip_pretrained: null): exact-duplicate lookups work, "
                  "similar-image search does not")


@search_app.command("serve")
def serve(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    host: Annotated[str | None, typer.Option(help="Bind address (default: from config, 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default: from config, 8765).")] = None,
) -> None:
    """Serve /image_search, /text_search, /healthz, /metrics over the configured backend and cache."""
    from fvqa.search.service import serve as run
    from fvqa.search.tools import SearchTools, make_backend

    cfg, cache_dir = _search_config(config, set_)
    if cfg.backend == "http":
        raise typer.BadParameter("search.backend is 'http' (a client); serve a local, web or replay backend")
    svc = cfg.service.model_copy(update={k: v for k, v in {"host": host, "port": port}.items() if v is not None})
    tools = SearchTools(cfg, make_backend(cfg), cache_dir=cache_dir)
    err.print(f"serving {cfg.backend} search on http://{svc.host}:{svc.port} (cache: {cache_dir})")
    run(tools, svc)


@search_app.command("text")
def text(
    query: Annotated[str, typer.Argument(help="Search query.")],
    question: Annotated[str, typer.Option(help="Question the summaries should answer.")] = "",
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Run one text search and print upstream's rendering of the results."""
    from fvqa.protocol import render_text_results
    from fvqa.search.tools import make_search_tools

    cfg, cache_dir = _search_config(config, set_)
    tools = make_search_tools(cfg, cache_dir=cache_dir)
    typer.echo(render_text_results(tools.text_search(query, question)))


@search_app.command("image")
def image(
    path: Annotated[Path, typer.Argument(help="Image file.")],
    image_url: Annotated[str | None, typer.Option(help="Public URL of the image (web backend, url mode).")] = None,
    data_id: Annotated[str | None, typer.Option(help="Upstream data_id (replay backend).")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Run one image search and print the result titles and URLs."""
    from fvqa.search.tools import make_search_tools

    cfg, cache_dir = _search_config(config, set_)
    tools = make_search_tools(cfg, cache_dir=cache_dir)
    for rank, hit in enumerate(tools.image_search(path, image_url=image_url, data_id=data_id), start=1):
        thumb = "thumbnail" if hit.thumbnail is not None else "no thumbnail"
        typer.echo(f"{rank}. {hit.title}  ({hit.url}, {thumb})")
