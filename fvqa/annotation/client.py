"""A thin wrapper over `label_studio_sdk` that turns connection and auth failures into one clear error.

Where the server is: `--url`, else $FVQA_LS_URL, else the server `fvqa annotate server start`
recorded. The API key only ever comes from an environment variable (default FVQA_LS_API_KEY).

Every API call goes through the SDK, which also trades a personal access token for short-lived
access tokens. Three raw requests stay, all sent with the SDK's current header: `/health` (no
key, and not in the SDK: "no server" reads differently from "wrong key"), `download` (files the
server serves; no SDK call) and bulk import. The SDK's import walks every task through its
`jsonable_encoder` (~0.1 s per 1,000 tasks on a busy 2-core machine, a quarter of the server's
own import time); plain JSON is the same bytes for our str/list-only tasks, and encoding apart
from sending lets `rounds.push` build the body while the project is being created. Both HTTP
clients (ours and the one handed to the SDK) set TCP_NODELAY (see `http_client`).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
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


def is_personal_token(key: str) -> bool:
    """Whether a key looks like a personal access token (a JWT) rather than a legacy token (for messages)."""
    return key.count(".") == 2 and key.startswith("eyJ")


def http_client(timeout: float, **kwargs: Any) -> httpx.Client:
    """An httpx client whose sockets send at once (TCP_NODELAY).

    On a reused (keep-alive) connection to Label Studio's server each request otherwise waits for
    the peer's delayed ACK: measured on loopback, 50 ms per GET instead of 14 ms, which is more than
    the server's own work for most of our calls.
    """
    nodelay = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
    return httpx.Client(timeout=timeout, transport=httpx.HTTPTransport(socket_options=nodelay), **kwargs)


class SdkAuth(httpx.Auth):
    """The SDK's own Authorization header on our few raw requests (file downloads), so a personal
    access token is refreshed in one place (the SDK) and never by hand here."""

    def __init__(self, sdk: Any) -> None:
        self.sdk = sdk

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        # the SDK has no public accessor for its current header; its client wrapper refreshes on expiry
        request.headers["Authorization"] = self.sdk._client_wrapper.get_headers()["Authorization"]
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
        from label_studio_sdk.core.api_error import ApiError

        self.conn = conn
        self._health(conn)
        self._sdk_http = http_client(timeout, follow_redirects=True)  # what the SDK makes itself, plus no-delay
        try:  # an expired or exp-less personal access token is refused here by the SDK
            self.sdk = LabelStudio(base_url=conn.url, api_key=conn.api_key, timeout=timeout,
                                   httpx_client=self._sdk_http)
        except ApiError as exc:
            self._sdk_http.close()
            raise self._refused(exc.status_code, exc.body) from exc
        self._whoami()
        self.http = http_client(timeout, base_url=conn.url, auth=SdkAuth(self.sdk))
        self._users: dict[int, str] | None = None

    @staticmethod
    def _health(conn: Connection) -> None:
        """`/health` needs no key and is not in the SDK: tells "no server" apart from "wrong key"."""
        try:
            health = httpx.get(f"{conn.url}/health", timeout=15)
        except httpx.HTTPError as exc:
            raise FvqaError(f"cannot reach Label Studio at {conn.url} ({exc.__class__.__name__}): is the server "
                            "running? check `fvqa annotate server status` or the --url / FVQA_LS_URL value") from exc
        if health.status_code != 200:
            raise FvqaError(f"{conn.url}/health answered HTTP {health.status_code}: is this a Label Studio server?")

    def _refused(self, status: int | None, body: Any) -> FvqaError:
        detail = body.get("detail") if isinstance(body, dict) else None
        why = f"HTTP {status}" + (f": {detail}" if detail else "")
        if is_personal_token(self.conn.api_key):
            return FvqaError(f"Label Studio at {self.conn.url} refused the personal access token ({why}): check "
                             "the key environment variable, or create a new token")
        return FvqaError(f"Label Studio at {self.conn.url} refused the API key ({why}): check that the key "
                         "environment variable holds this server's token (legacy tokens must be enabled on the "
                         "server, or use a personal access token)")

    def _whoami(self) -> None:
        """One authenticated call up front, so a bad key is one clear error before any work."""
        from label_studio_sdk.core.api_error import ApiError

        try:
            self.sdk.users.whoami()
        except ApiError as exc:
            if exc.status_code in (401, 403):
                raise self._refused(exc.status_code, exc.body) from exc
            raise FvqaError(f"Label Studio at {self.conn.url} answered HTTP {exc.status_code} to whoami") from exc
        except httpx.HTTPError as exc:
            raise FvqaError(f"lost the connection to Label Studio at {self.conn.url} while checking the API key: "
                            f"{exc.__class__.__name__}") from exc
        except ValueError as exc:  # the SDK's token refresh reads the server's refusal as JSON
            raise FvqaError(f"Label Studio at {self.conn.url} gave an unreadable answer while refreshing the "
                            f"personal access token: {exc}") from exc

    def close(self) -> None:
        """Close the HTTP connections."""
        self.http.close()
        self._sdk_http.close()

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
            try:
                body = exc.response.json()
            except ValueError:
                body = None
            body = body if isinstance(body, dict) else {}
            detail = body.get("validation_errors") or body.get("detail") or exc.response.text[:300]
            raise FvqaError(f"Label Studio refused to {what} (HTTP {exc.response.status_code}): {detail}") from exc
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
        from label_studio_sdk.core.api_error import ApiError

        try:
            with self._api(f"look up project {project_id}"):
                self.sdk.projects.get(project_id)
        except FvqaError as exc:
            if isinstance(exc.__cause__, ApiError) and exc.__cause__.status_code == 404:
                return False
            raise
        return True

    def create_project(self, title: str, label_config: str, description: str, max_annotations: int) -> int:
        """Create a project; each task wants `max_annotations` annotators."""
        with self._api(f"create project '{title}'"):
            p = self.sdk.projects.create(title=title, label_config=label_config, description=description,
                                         maximum_annotations=max_annotations, show_skip_button=True)
        return int(p.id)

    def attach_local_storage(self, project_id: int, path: Path, *, new_project: bool = False) -> None:
        """Local-file storage over the workspace image store (needed to serve /data/local-files).

        `new_project`: the project was just created, so it has no storage yet (one GET fewer).
        """
        if not new_project:
            with self._api("list local storages"):
                existing = self.sdk.import_storage.local.list(project=project_id)
            if any(Path(s.path or "") == path for s in existing):
                return
        with self._api(f"attach local-file storage {path} (the server's LOCAL_FILES_DOCUMENT_ROOT must "
                       "contain the workspace: start it with `fvqa annotate server start --workspace ...`)"):
            self.sdk.import_storage.local.create(project=project_id, path=str(path), title="fvqa images",
                                                 use_blob_urls=False)

    @staticmethod
    def encode_tasks(tasks: Sequence[dict[str, Any]]) -> list[tuple[int, bytes]]:
        """Import request bodies, IMPORT_CHUNK tasks each, as (task count, JSON bytes).

        Tasks must hold JSON values only (fvqa's hold strings and lists): encoding is plain `json`,
        no SDK type coercion.
        """
        return [(len(chunk), json.dumps(chunk, ensure_ascii=False, separators=(",", ":"),
                                        allow_nan=False).encode())
                for chunk in (tasks[i:i + IMPORT_CHUNK] for i in range(0, len(tasks), IMPORT_CHUNK))]

    def import_encoded(self, project_id: int, bodies: Sequence[tuple[int, bytes]]) -> list[int]:
        """Bulk import of `encode_tasks` bodies; returns the new task ids in input order."""
        ids: list[int] = []
        for n, body in bodies:
            with self._api(f"import {n} tasks"):
                r = self.http.post(f"/api/projects/{project_id}/import", params={"return_task_ids": "true"},
                                   content=body, headers={"Content-Type": "application/json"})
                r.raise_for_status()
            try:
                answer = r.json()
            except ValueError as exc:
                raise FvqaError(f"Label Studio answered an import with something other than JSON: "
                                f"{r.text[:300]}") from exc
            task_ids = answer.get("task_ids") if isinstance(answer, dict) else None
            ids.extend(int(t) for t in task_ids or [])
        return ids

    def import_tasks(self, project_id: int, tasks: Sequence[dict[str, Any]]) -> list[int]:
        """Bulk import in chunks; returns the new task ids in input order."""
        return self.import_encoded(project_id, self.encode_tasks(tasks))

    def export_tasks(self, project_id: int, poll_s: float = 0.5, timeout: float = 3600) -> list[dict[str, Any]]:
        """All tasks of a project with all annotations (skipped ones too), as one JSON snapshot.

        The snapshot API is faster than the one-shot export (predictions come as ids only) and is the
        one Label Studio Enterprise keeps; servers without it fall back to the one-shot export.
        """
        from label_studio_sdk.core.api_error import ApiError
        from label_studio_sdk.types import (
            LseAnnotationFilterOptionsRequest,
            LseTaskFilterOptionsRequest,
            SerializationOptionRequest,
            SerializationOptionsRequest,
        )

        exports = self.sdk.projects.exports
        with self._api(f"export project {project_id}"):
            try:
                created = exports.create(
                    project_id, title="fvqa pull",
                    task_filter_options=LseTaskFilterOptionsRequest(only_with_annotations=False),
                    annotation_filter_options=LseAnnotationFilterOptionsRequest(usual=True, ground_truth=True,
                                                                                skipped=True),
                    serialization_options=SerializationOptionsRequest(
                        predictions=SerializationOptionRequest(only_id=True),
                        drafts=SerializationOptionRequest(only_id=True)))
            except ApiError as exc:
                if exc.status_code in (404, 405):
                    return self._export_one_shot(project_id)
                raise
            export_id = int(created.id or 0)
            try:
                deadline = time.monotonic() + timeout
                while (state := str(exports.get(project_id, export_id).status or "")) not in ("completed", "failed"):
                    if time.monotonic() > deadline:
                        raise FvqaError(f"Label Studio export of project {project_id} still {state} after {timeout:.0f}s")
                    time.sleep(poll_s)
                if state == "failed":
                    raise FvqaError(f"Label Studio failed to export project {project_id} (see its log)")
                data = b"".join(exports.download(project_id, export_id, export_type="JSON"))
            finally:
                with contextlib.suppress(ApiError, httpx.HTTPError):
                    exports.delete(project_id, export_id)
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
