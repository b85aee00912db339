"""`fvqa annotate ...`: Label Studio server and annotation rounds. Heavy imports stay inside commands."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from fvqa.errors import FvqaError

if TYPE_CHECKING:
    from fvqa.annotation.client import LabelStudioClient

annotate_app = typer.Typer(help="Human annotation rounds with Label Studio.", no_args_is_help=True)
server_app = typer.Typer(help="Run Label Studio locally (own venv, 127.0.0.1).", no_args_is_help=True)
annotate_app.add_typer(server_app, name="server")

out = Console()
err = Console(stderr=True)

WorkspaceOpt = Annotated[Path | None, typer.Option("--workspace", "-w", help="Workspace folder.")]
ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML run config (for its workspace).")]
RoundOpt = Annotated[str, typer.Option("--round", "-r", help="Round name, e.g. r1.")]
UrlOpt = Annotated[str | None, typer.Option("--url", help="Label Studio URL (default: $FVQA_LS_URL or the started server).")]
KeyEnvOpt = Annotated[str, typer.Option("--api-key-env", help="Environment variable holding the API key.")]
DataDirOpt = Annotated[Path | None, typer.Option("--data-dir", help="Label Studio data dir (default $FVQA_LS_DATA or ~/.local/share/fvqa/label-studio).")]
RootOpt = Annotated[Path | None, typer.Option("--document-root", help="The server's LOCAL_FILES_DOCUMENT_ROOT (own servers).")]


def _ws_path(config: Path | None, workspace: Path | None) -> Path:
    if workspace is not None:
        return workspace
    from fvqa.config import load_config

    return load_config(config).workspace


def _client(url: str | None, key_env: str, data_dir: Path | None, root: Path | None) -> LabelStudioClient:
    from fvqa.annotation.client import LabelStudioClient, resolve

    return LabelStudioClient(resolve(url, key_env, data_dir, root))


@server_app.command("start")
def server_start(
    workspace: WorkspaceOpt = None,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    port: Annotated[int | None, typer.Option(help="Port on 127.0.0.1 (default: a free one).")] = None,
    venv: Annotated[Path | None, typer.Option(help="Label Studio venv (default $FVQA_LS_VENV or ~/.cache/fvqa/label-studio-venv).")] = None,
    document_root: Annotated[Path | None, typer.Option(help="Local-file serving root (default: the workspace's parent).")] = None,
    api_key_env: KeyEnvOpt = "FVQA_LS_API_KEY",
    password_env: Annotated[str, typer.Option(help="Env var with the admin UI password (default: the API key).")] = "FVQA_LS_PASSWORD",
    timeout: float = 600.0,
) -> None:
    """Install (first use) and start Label Studio headless on 127.0.0.1; wait until /health answers."""
    from fvqa.annotation import server

    key = os.environ.get(api_key_env)
    if not key:
        raise FvqaError(f"set {api_key_env} to the API token the server should accept (at least 8 characters), "
                        f"e.g. export {api_key_env}=$(python -c 'import secrets; print(secrets.token_hex(20))')")
    ws = _ws_path(config, workspace).resolve()
    root = (document_root or ws.parent).resolve()
    info = server.start(data_dir or server.default_data_dir(), root, key, password=os.environ.get(password_env),
                        venv=venv, port=port, timeout=timeout, log=lambda m: err.print(m))
    out.print(f"[green]Label Studio[/] {info.url}  (pid {info.pid}; user {info.username}; "
              f"password from ${password_env if os.environ.get(password_env) else api_key_env}; "
              f"local files under {info.document_root})")


@server_app.command("install")
def server_install(
    venv: Annotated[Path | None, typer.Option(help="Label Studio venv (default $FVQA_LS_VENV or ~/.cache/fvqa/label-studio-venv).")] = None,
) -> None:
    """Install Label Studio into its own venv and migrate a template database (what `start` does on first use)."""
    from fvqa.annotation import server

    target = venv or server.default_venv()
    exe = server.ensure_venv(target, log=lambda m: err.print(m))
    template = server.ensure_template(target, log=lambda m: err.print(m))
    out.print(f"Label Studio ready: {exe} (template database {template})")


@server_app.command("stop")
def server_stop(data_dir: DataDirOpt = None) -> None:
    """Stop the server started for this data dir."""
    from fvqa.annotation import server

    stopped = server.stop(data_dir or server.default_data_dir())
    out.print("stopped" if stopped else "no running server recorded")


@server_app.command("status")
def server_status(data_dir: DataDirOpt = None) -> None:
    """Is the recorded server running and healthy?"""
    from fvqa.annotation import server

    st = server.status(data_dir or server.default_data_dir())
    if not st.get("running"):
        out.print("not running")
        raise typer.Exit(1)
    out.print(f"running at {st['url']} (pid {st['pid']}, healthy: {st['healthy']}, data dir {st['data_dir']})")


@annotate_app.command()
def push(
    round_: RoundOpt,
    split: Annotated[str, typer.Option(help="Which split to review.")] = "test",
    sample: Annotated[int | None, typer.Option(help="Review a stable random sample of N items.")] = None,
    annotators: Annotated[int, typer.Option(help="Annotators per task.")] = 2,
    prefill: Annotated[bool | None, typer.Option(
        "--prefill/--no-prefill", help="Pre-fill tasks with the pipeline's labels, question and aliases "
        "(default: annotate.prefill of --config, else off; a round keeps the mode it was first pushed with).")] = None,
    workspace: WorkspaceOpt = None, config: ConfigOpt = None, url: UrlOpt = None,
    api_key_env: KeyEnvOpt = "FVQA_LS_API_KEY", data_dir: DataDirOpt = None, document_root: RootOpt = None,
) -> None:
    """Create (or reuse) the round's review project and import items not yet in it."""
    from fvqa.annotation.rounds import push as do_push
    from fvqa.store import Workspace

    if prefill is None and config is not None:
        from fvqa.config import load_config

        prefill = load_config(config).annotate.prefill
    client = _client(url, api_key_env, data_dir, document_root)
    with Workspace(_ws_path(config, workspace)) as ws:
        with err.status(f"pushing round {round_} to {client.conn.url}..."):
            res = do_push(ws, client, round_, split=split, sample=sample, annotators=annotators, prefill=prefill)
    out.print(f"round {round_}: project {res['project_id']} at {client.conn.url}; pushed {res['pushed']}, "
              f"already there {res['already']}, rejected {res['rejected']}; "
              f"prefill {'on' if res['prefill'] else 'off'}")


@annotate_app.command()
def create(
    round_: RoundOpt,
    annotators: Annotated[int, typer.Option(help="Annotators per uploaded image.")] = 1,
    workspace: WorkspaceOpt = None, config: ConfigOpt = None, url: UrlOpt = None,
    api_key_env: KeyEnvOpt = "FVQA_LS_API_KEY", data_dir: DataDirOpt = None,
) -> None:
    """A project for writing new (manual) items: upload images in Label Studio, write question + answer."""
    from fvqa.annotation.rounds import create_manual
    from fvqa.store import Workspace

    client = _client(url, api_key_env, data_dir, None)
    with Workspace(_ws_path(config, workspace)) as ws:
        pid = create_manual(ws, client, round_, annotators=annotators)
    out.print(f"round {round_}: manual-writing project {client.conn.url}/projects/{pid} "
              "(import images there, then `fvqa annotate pull` and `apply`)")


@annotate_app.command()
def pull(
    round_: RoundOpt, workspace: WorkspaceOpt = None, config: ConfigOpt = None, url: UrlOpt = None,
    api_key_env: KeyEnvOpt = "FVQA_LS_API_KEY", data_dir: DataDirOpt = None,
) -> None:
    """Export the round and store every annotation as a row (re-running replaces, never duplicates)."""
    from fvqa.annotation.rounds import pull as do_pull
    from fvqa.store import Workspace

    client = _client(url, api_key_env, data_dir, None)
    with Workspace(_ws_path(config, workspace)) as ws:
        with err.status(f"exporting round {round_} from {client.conn.url}..."):
            res = do_pull(ws, client, round_)
    out.print(f"round {round_}: {res['tasks']} tasks ({res['tasks_rejected']} rejected, {res['tasks_deleted']} "
              f"deleted in Label Studio); {res['annotations_in']} annotations: {res['annotations']} stored, "
              f"{res['annotations_rejected']} rejected, {res['skipped']} skipped", highlight=False)
    for reason, n in sorted(res["reasons"].items(), key=lambda kv: -kv[1]):
        out.print(f"  rejected {n}: {reason}", highlight=False)
    for reason, n in sorted(res["skipped_reasons"].items(), key=lambda kv: -kv[1]):
        out.print(f"  skipped {n}: {reason}", highlight=False)
    if res["anonymous"]:
        out.print(f"  {res['anonymous']} stored annotations have no annotator (each counts as its own, "
                  "anonymous:<annotation id>)", highlight=False)
    if res["superseded"]:
        out.print(f"  {res['superseded']} stored annotations superseded by a later one of the same annotator on the "
                  f"same item ({res['superseded_changed']} with other values): the latest updated_at counts",
                  highlight=False)


def _fmt(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3f}"


@annotate_app.command()
def status(
    round_: Annotated[str | None, typer.Option("--round", "-r", help="Only this round.")] = None,
    workspace: WorkspaceOpt = None, config: ConfigOpt = None,
    show: Annotated[int, typer.Option(help="Disagreements to list per round.")] = 20,
) -> None:
    """Per round: tasks, annotated, by annotator, pending; agreement per field; disagreements."""
    from fvqa.annotation import tables
    from fvqa.annotation.decide import summarize
    from fvqa.store import Workspace

    with Workspace(_ws_path(config, workspace), read_only=True) as ws:
        if "annotation_rounds" not in ws.tables():
            out.print("no annotation rounds yet")
            return
        names = [round_] if round_ else [r[0] for r in ws.execute(
            "SELECT round FROM annotation_rounds ORDER BY created_at")]
        for name in names:
            if tables.round_row(ws, name) is None:
                raise FvqaError(f"unknown round {name}")
            s = summarize(ws, name)
            mode = {True: "prefill on: agreement inflated by pre-filled values", False: "prefill off",
                    None: "prefill unknown (pushed before it was recorded)"}[s.prefill]
            t = Table(title=f"round {s.round} ({s.kind}" + ("" if s.kind == "manual" else f"; {mode}") + ")")
            for col in ("tasks", "annotated", "pending", "by annotator"):
                t.add_column(col)
            t.add_row(str(s.tasks), str(s.annotated), str(s.pending),
                      ", ".join(f"{a}: {n}" for a, n in sorted(s.by_annotator.items())) or "-")
            out.print(t)
            if s.agreement:
                a = Table(title="agreement")
                for col in ("field", "measure", "value", "items"):
                    a.add_column(col)
                for f, (method, value, n) in s.agreement.items():
                    a.add_row(f, method, _fmt(value), str(n))
                out.print(a)
            if s.disagreements:
                d = Table(title=f"disagreements ({len(s.disagreements)})")
                for col in ("item", "fields", "values"):
                    d.add_column(col)
                for row in s.disagreements[:show]:
                    d.add_row(row["item_id"], ", ".join(row["fields"]), "; ".join(
                        f"{who}: " + "/".join(str(v[f]) for f in row["fields"]) for who, v in sorted(row["values"].items())))
                out.print(d)


@annotate_app.command()
def adjudicate(
    round_: RoundOpt,
    to: Annotated[str | None, typer.Option(help="Name of the new round (default: <round>-adj).")] = None,
    workspace: WorkspaceOpt = None, config: ConfigOpt = None, url: UrlOpt = None,
    api_key_env: KeyEnvOpt = "FVQA_LS_API_KEY", data_dir: DataDirOpt = None, document_root: RootOpt = None,
) -> None:
    """Push the round's disagreements as a new round for a senior annotator."""
    from fvqa.annotation.rounds import adjudicate as do_adjudicate
    from fvqa.store import Workspace

    client = _client(url, api_key_env, data_dir, document_root)
    with Workspace(_ws_path(config, workspace)) as ws:
        with err.status(f"pushing the disagreements of round {round_}..."):
            res = do_adjudicate(ws, client, round_, to)
    out.print(f"{res['disagreements']} disagreements -> round {res['round']} (pushed {res['pushed']})")


@annotate_app.command()
def apply(round_: RoundOpt, workspace: WorkspaceOpt = None, config: ConfigOpt = None) -> None:
    """Merge the round's decisions into gold (fixed answers, rejected items, types) with provenance."""
    from fvqa.annotation.decide import apply as do_apply
    from fvqa.store import Workspace

    with Workspace(_ws_path(config, workspace)) as ws:
        res = do_apply(ws, round_)
    out.print(f"round {round_}: " + ", ".join(f"{k} {v}" for k, v in sorted(res.items())) +
              " (run `fvqa export` to write the merged dataset)")
