"""A thin wrapper over `label_studio_sdk` that turns connection and auth failures into one clear error.

Where the server is: `--url`, else $FVQA_LS_URL, else the server `fvqa annotate server start`
recorded. The API key only ever comes from an environment variable (default FVQA_LS_API_KEY).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Generator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from fvqa.annotation import server
from fvqa.errors import FvqaError

DEFAULT_KEY_ENV = "FVQA_LS_API_KEY"
IMPORT_CHUNK = 2000


class TokenAuth(httpx.Auth):
    """Legacy token (`Token <key>`) or personal access token (a JWT refresh token, traded for a short-lived
    access token and traded again when the server answers 401)."""

    def __init__(self, base_url: str, key: str) -> None:
        self.base_url, self.key = base_url, key
        self.personal = key.count(".") == 2 and key.startswith("eyJ")
        self._access: str | None = None

    def _refresh(self) -> str:
        r = httpx.post(f"{self.base_url}/api/token/refresh/", json={"refresh": self.key}, timeout=30)
        if r.status_code != 200:
            raise FvqaError(f"Label Studio at {self.base_url} refused the personal access token (HTTP "
                            f"{r.status_code}): check the key environment variable, or create a new token")
        self._access = str(r.json()["access"])
        return self._access

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if not self.personal:
            request.headers["Authorization"] = f"Token {self.key}"
            yield request
            return
        request.headers["Authorization"] = f"Bearer {self._access or self._refresh()}"
        response = yield request
        if response.status_code == 401:
            request.headers["Authorization"] = f"Bearer {self._refresh()}"
            yield request


@dataclass(frozen=True)
class Connection:
    """Where Label Studio is and which folder its local-file serving is rooted at."""

    url: str
    api_key: str
    document_root: Path | None = None


def resolve(url: str | None = None, key_env: str = DEFAULT_KEY_ENV, data_dir: Path | None = None,
            document_root: Path | None = None) -> Connection:
    """Find the server URL, key and document root from options, environment or the state file."""
    state = server.read_state(data_dir or server.default_data_dir())
    url = url or os.environ.get("FVQA_LS_URL") or (state.url if state else None)
    if not url:
        raise FvqaError("no Label Studio server known: run `fvqa annotate server start`, "
                        "or pass --url / set FVQA_LS_URL for a server you already run")
    key = os.environ.get(key_env)
    if not key:
        raise FvqaError(f"environment variable {key_env} is not set: it must hold the Label Studio API key "
                        "(Account & Settings -> Access token, or the token given to `annotate server start`)")
    root = document_root or (Path(os.environ["LOCAL_FILES_DOCUMENT_ROOT"])
                             if os.environ.get("LOCAL_FILES_DOCUMENT_ROOT") else None)
    if root is None and state and state.url.rstrip("/") == url.rstrip("/"):
        root = Path(state.document_root)
    return Connection(url.rstrip("/"), key, root)


class LabelStudioClient:
    """The few Label Studio calls fvqa needs, with errors a user can act on."""

    def __init__(self, conn: Connection, timeout: float = 600.0) -> None:
        from label_studio_sdk import LabelStudio  # heavy import: only when a command talks to the server

        self.conn = conn
        self.auth = TokenAuth(conn.url, conn.api_key)
        self._check(conn, self.auth)
        self.sdk = LabelStudio(base_url=conn.url, api_key=conn.api_key, timeout=timeout)
        self.http = httpx.Client(base_url=conn.url, auth=self.auth, timeout=timeout)
        self._users: dict[int, str] | None = None

    @staticmethod
    def _check(conn: Connection, auth: TokenAuth) -> None:
        try:
            health = httpx.get(f"{conn.url}/health", timeout=15)
        except httpx.HTTPError as exc:
            raise FvqaError(f"cannot reach Label Studio at {conn.url} ({exc.__class__.__name__}): is the server "
                            "running? check `fvqa annotate server status` or the --url / FVQA_LS_URL value") from exc
        if health.status_code != 200:
            raise FvqaError(f"{conn.url}/health answered HTTP {health.status_code}: is this a Label Studio server?")
        who = httpx.get(f"{conn.url}/api/current-user/whoami", timeout=30, auth=auth)
        if who.status_code in (401, 403):
            raise FvqaError(f"Label Studio at {conn.url} refused the API key (HTTP {who.status_code}): check that "
                            "the key environment variable holds this server's token (legacy tokens must be "
                            "enabled on the server, or use a personal access token)")
        if who.status_code != 200:
            raise FvqaError(f"Label Studio at {conn.url} answered HTTP {who.status_code} to whoami")

    def close(self) -> None:
        """Close the HTTP connections."""
        self.http.close()

    @contextmanager
    def _api(self, what: str) -> Iterator[None]:
        from label_studio_sdk.core.api_error import ApiError

        try:
            yield
        except ApiError as exc:
            body = exc.body if isinstance(exc.body, dict) else {}
            detail = body.get("validation_errors") or body.get("detail") or str(exc.body)[:300]
            raise FvqaError(f"Label Studio refused to {what} (HTTP {exc.status_code}): {detail}") from exc
        except httpx.HTTPStatusError as exc:
            raise FvqaError(f"Label Studio refused to {what} (HTTP {exc.response.status_code}): "
                            f"{exc.response.text[:300]}") from exc
        except httpx.HTTPError as exc:
            raise FvqaError(f"lost the connection to Label Studio at {self.conn.url} while trying to {what}: "
                            f"{exc.__class__.__name__}") from exc

    # -- projects --------------------------------------------------------------------------
    def find_project(self, title: str) -> int | None:
        """Id of the project with this exact title, if any."""
        with self._api("list projects"):
            for p in self.sdk.projects.list(title=title):
                if p.title == title:
                    return int(p.id)
        return None

    def project_exists(self, project_id: int) -> bool:
        """Whether a project id still exists on the server."""
        r = self.http.get(f"/api/projects/{project_id}")
        return r.status_code == 200

    def create_project(self, title: str, label_config: str, description: str, max_annotations: int) -> int:
        """Create a project; each task wants `max_annotations` annotators."""
        with self._api(f"create project '{title}'"):
            p = self.sdk.projects.create(title=title, label_config=label_config, description=description,
                                         maximum_annotations=max_annotations, show_skip_button=True)
        return int(p.id)

    def attach_local_storage(self, project_id: int, path: Path) -> None:
        """Local-file storage over the workspace image store (needed to serve /data/local-files)."""
        with self._api("list local storages"):
            existing = self.sdk.import_storage.local.list(project=project_id)
        if any(Path(s.path or "") == path for s in existing):
            return
        with self._api(f"attach local-file storage {path} (the server's LOCAL_FILES_DOCUMENT_ROOT must "
                       "contain the workspace: start it with `fvqa annotate server start --workspace ...`)"):
            self.sdk.import_storage.local.create(project=project_id, path=str(path), title="fvqa images",
                                                 use_blob_urls=False)

    def import_tasks(self, project_id: int, tasks: Sequence[dict[str, Any]]) -> list[int]:
        """Bulk import in chunks; returns the new task ids in input order."""
        ids: list[int] = []
        for start in range(0, len(tasks), IMPORT_CHUNK):
            chunk = list(tasks[start:start + IMPORT_CHUNK])
            with self._api(f"import {len(chunk)} tasks"):
                res = self.sdk.projects.import_tasks(project_id, request=chunk, return_task_ids=True)
            ids.extend(int(t) for t in (res.task_ids or []))
        return ids

    def export_tasks(self, project_id: int, poll_s: float = 0.5, timeout: float = 3600) -> list[dict[str, Any]]:
        """All tasks of a project with all annotations (skipped ones too), as one JSON snapshot.

        The snapshot API is faster than the one-shot export (predictions come as ids only) and is the
        one Label Studio Enterprise keeps; servers without it fall back to the one-shot export.
        """
        body = {"title": "fvqa pull",
                "task_filter_options": {"only_with_annotations": False},
                "annotation_filter_options": {"usual": True, "ground_truth": True, "skipped": True},
                "serialization_options": {"predictions": {"only_id": True}, "drafts": {"only_id": True}}}
        with self._api(f"export project {project_id}"):
            created = self.http.post(f"/api/projects/{project_id}/exports", json=body)
            if created.status_code in (404, 405):
                return self._export_one_shot(project_id)
            created.raise_for_status()
            export_id = created.json()["id"]
            try:
                deadline = time.monotonic() + timeout
                while (state := self.http.get(f"/api/projects/{project_id}/exports/{export_id}").json().get(
                        "status")) not in ("completed", "failed"):
                    if time.monotonic() > deadline:
                        raise FvqaError(f"Label Studio export of project {project_id} still {state} after {timeout:.0f}s")
                    time.sleep(poll_s)
                if state == "failed":
                    raise FvqaError(f"Label Studio failed to export project {project_id} (see its log)")
                got = self.http.get(f"/api/projects/{project_id}/exports/{export_id}/download",
                                    params={"exportType": "JSON"})
                got.raise_for_status()
                data = got.content
            finally:
                self.http.delete(f"/api/projects/{project_id}/exports/{export_id}")
        return self._parse_export(project_id, data)

    def _export_one_shot(self, project_id: int) -> list[dict[str, Any]]:
        data = b"".join(self.sdk.projects.exports.download_sync(project_id, export_type="JSON",
                                                                download_all_tasks=True))
        return self._parse_export(project_id, data)

    @staticmethod
    def _parse_export(project_id: int, data: bytes) -> list[dict[str, Any]]:
        try:
            tasks = json.loads(data)
        except ValueError as exc:
            raise FvqaError(f"Label Studio's export of project {project_id} is not JSON: {data[:200]!r}") from exc
        except RecursionError:
            raise FvqaError(f"Label Studio's export of project {project_id} is nested too deeply to read "
                            f"(more than about {sys.getrecursionlimit()} levels)") from None
        if not isinstance(tasks, list):
            raise FvqaError(f"Label Studio's export of project {project_id} is not a list of tasks")
        return tasks

    def user_emails(self, refresh: bool = False) -> dict[int, str]:
        """User id -> email (annotations carry only the id)."""
        if self._users is None or refresh:
            with self._api("list users"):
                self._users = {int(u.id): (u.email or u.username or f"user-{u.id}") for u in self.sdk.users.list()}
        return self._users

    def download(self, url: str) -> bytes:
        """Bytes of a file the server serves (uploads, local files), with our token.

        Only paths on this server: a task's image URL pointing elsewhere is refused rather than
        sent our API key (and network access outside loopback is not ours to make here).
        """
        parsed = httpx.URL(url)
        if parsed.is_absolute_url and (parsed.scheme, parsed.host, parsed.port) != (
                self.http.base_url.scheme, self.http.base_url.host, self.http.base_url.port):
            raise FvqaError(f"image URL {url[:200]} is not on the Label Studio server {self.conn.url}: "
                            "upload the image to Label Studio instead")
        r = self.http.get(url)
        if r.status_code != 200:
            raise FvqaError(f"cannot download {url} from Label Studio (HTTP {r.status_code})")
        return r.content
