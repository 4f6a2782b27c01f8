"""A local stand-in for the Hugging Face Hub: enough of its HTTP API for huggingface_hub 2.4.

Tests point `HF_ENDPOINT` at it (see the `hub_server` fixture in conftest.py) so `HfApi().model_info`,
`snapshot_download` and `hf_hub_download` run their real code paths against repositories served from
local folders, with no network. It answers:

- `GET /api/models/<org>/<name>` and `/api/models/<org>/<name>/revision/<rev>`: model info JSON
  (`id`, `sha`, `siblings` with sizes, `gated`, ...),
- `GET /api/models/<org>/<name>/tree/<rev>[/<path>]?recursive=...`: the file list snapshot_download uses,
- `HEAD`/`GET /<org>/<name>/resolve/<rev>/<file>`: the file, with `ETag`, `X-Repo-Commit`,
  `Content-Length` and `Range` support (what resumable downloads need).

Errors carry the headers `huggingface_hub.utils.hf_raise_for_status` maps to its exceptions:
`X-Error-Code: RepoNotFound` (404, or 401 for a private repo without a token), `RevisionNotFound`,
`EntryNotFound`, and `GatedRepo` (401 on file downloads of a gated repo without a valid token).

`interrupt_next(repo_id, filename, after_bytes)` makes the next download of a file stop after that
many bytes (connection dropped) and the retry that huggingface_hub makes fail with 503, so the
download errors out with a partial file left behind, as after a network cut or Ctrl-C.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

DEFAULT_TOKEN = "hf_test_token"


@dataclass
class _Revision:
    name: str
    sha: str
    folder: Path
    files: dict[str, Path]  # repo path -> file on disk


@dataclass
class _Repo:
    repo_id: str
    revisions: dict[str, _Revision]  # by name and by sha
    gated: bool = False
    private: bool = False


@dataclass
class _Interruption:
    after_bytes: int
    fail_retries: int


class Headers(dict):
    """Request headers with case-insensitive `get` / `[]` (clients differ: 'Range' vs 'range')."""

    def __init__(self, items=()) -> None:
        super().__init__((k.lower(), v) for k, v in items)

    def get(self, key: str, default=None):  # type: ignore[override]
        return super().get(key.lower(), default)

    def __getitem__(self, key: str) -> str:
        return super().__getitem__(key.lower())

    def __contains__(self, key: object) -> bool:
        return super().__contains__(str(key).lower())


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: Headers = field(default_factory=Headers)


def _list_files(folder: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts):
            out[p.relative_to(folder).as_posix()] = p
    return out


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _commit_sha(repo_id: str, revision: str, files: dict[str, Path]) -> str:
    h = hashlib.sha1(f"{repo_id}@{revision}".encode())
    for name, path in files.items():
        h.update(name.encode())
        h.update(_file_sha256(path).encode())
    return h.hexdigest()


class HubServer:
    """A threaded HTTP server on a free 127.0.0.1 port serving repositories from local folders."""

    def __init__(self) -> None:
        self.repos: dict[str, _Repo] = {}
        self.tokens: set[str] = {DEFAULT_TOKEN}
        self.requests: list[RecordedRequest] = []
        self.bytes_per_second: int | None = None
        self._interruptions: dict[tuple[str, str], _Interruption] = {}
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hub-server", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def add_repo(
        self,
        repo_id: str,
        folder: str | Path,
        *,
        revisions: dict[str, str | Path] | None = None,
        gated: bool = False,
        private: bool = False,
    ) -> str:
        """Serve `folder` as `repo_id` at revision `main`; `revisions` maps more branch/tag names to folders.

        Returns the commit sha of `main`. Each revision is also reachable by its commit sha.
        Files are read from disk on every request, so a test may change them afterwards.
        """
        repo = _Repo(repo_id, {}, gated=gated, private=private)
        for name, path in {"main": folder, **(revisions or {})}.items():
            path = Path(path)
            files = _list_files(path)
            rev = _Revision(name, _commit_sha(repo_id, name, files), path, files)
            repo.revisions[name] = rev
            repo.revisions[rev.sha] = rev
        with self._lock:
            self.repos[repo_id] = repo
        return repo.revisions["main"].sha

    def throttle(self, bytes_per_second: int | None) -> None:
        """Serve file bodies at about this rate (None: full speed), to catch a download in flight."""
        self.bytes_per_second = bytes_per_second

    def interrupt_next(self, repo_id: str, filename: str, after_bytes: int, *, fail_retries: int = 1) -> None:
        """Cut the next GET of `filename` after `after_bytes` bytes, then answer 503 to `fail_retries` GETs."""
        with self._lock:
            self._interruptions[(repo_id, filename)] = _Interruption(after_bytes, fail_retries)

    def file_requests(self, filename: str) -> list[RecordedRequest]:
        """The GET requests recorded for one file (to check `Range` headers of resumed downloads)."""
        return [
            r
            for r in self.requests
            if r.method == "GET" and "/resolve/" in r.path and r.path.endswith(filename)
        ]

    def _next_interruption(self, repo_id: str, filename: str) -> int | None:
        """None: serve normally; n >= 0: cut after n bytes; -1: fail this request with 503."""
        with self._lock:
            intr = self._interruptions.get((repo_id, filename))
            if intr is None:
                return None
            if intr.after_bytes >= 0:
                cut, intr.after_bytes = intr.after_bytes, -1
                if intr.fail_retries <= 0:
                    del self._interruptions[(repo_id, filename)]
                return cut
            intr.fail_retries -= 1
            if intr.fail_retries <= 0:
                del self._interruptions[(repo_id, filename)]
            return -1


_API_RE = re.compile(r"^/api/models/([^/]+/[^/]+)(?:/(revision|tree)/([^/]+)(?:/(.*))?)?$")
_RESOLVE_RE = re.compile(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")


def _make_handler(server: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - quiet in tests
            pass

        # ---- helpers -------------------------------------------------------------------------
        def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD" and body:
                self.wfile.write(body)

        def _json(self, obj: object, status: int = 200, headers: dict[str, str] | None = None) -> None:
            self._send(
                status, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})}
            )

        def _error(self, status: int, code: str | None, message: str) -> None:
            headers = {"X-Error-Message": message}
            if code:
                headers["X-Error-Code"] = code
            self._json({"error": message}, status, headers)

        def _authorized(self) -> bool:
            auth = self.headers.get("Authorization", "")
            return auth.startswith("Bearer ") and auth[len("Bearer ") :] in server.tokens

        def _repo(self, repo_id: str) -> _Repo | None:
            repo = server.repos.get(repo_id)
            if repo is None or (repo.private and not self._authorized()):
                status = 401 if repo is not None else 404
                self._error(status, "RepoNotFound", "Repository not found")
                return None
            return repo

        def _revision(self, repo: _Repo, name: str) -> _Revision | None:
            rev = repo.revisions.get(unquote(name))
            if rev is None:
                self._error(404, "RevisionNotFound", "Invalid rev id: " + unquote(name))
            return rev

        # ---- routes --------------------------------------------------------------------------
        def do_HEAD(self) -> None:  # noqa: N802 - http.server naming
            self._route()

        def do_GET(self) -> None:  # noqa: N802
            self._route()

        def _route(self) -> None:
            parts = urlsplit(self.path)
            path = parts.path
            server.requests.append(RecordedRequest(self.command, path, Headers(self.headers.items())))
            m = _API_RE.match(path)
            if m:
                repo_id, kind, rev_name, sub = m.groups()
                repo = self._repo(repo_id)
                if repo is None:
                    return
                rev = self._revision(repo, rev_name or "main")
                if rev is None:
                    return
                if kind == "tree":
                    recursive = parse_qs(parts.query).get("recursive", ["false"])[0].lower() == "true"
                    return self._tree(rev, unquote(sub or ""), recursive)
                return self._model_info(repo, rev)
            m = _RESOLVE_RE.match(path)
            if m:
                repo_id, rev_name, filename = m.groups()
                return self._resolve(repo_id, rev_name, unquote(filename))
            self._error(404, None, "Not found")

        def _model_info(self, repo: _Repo, rev: _Revision) -> None:
            siblings = [{"rfilename": name, "size": p.stat().st_size} for name, p in rev.files.items()]
            config = {}
            if "config.json" in rev.files:
                try:
                    raw = json.loads(rev.files["config.json"].read_text(encoding="utf-8"))
                    config = {k: raw[k] for k in ("architectures", "model_type") if k in raw}
                except (OSError, ValueError):
                    config = {}
            self._json(
                {
                    "_id": rev.sha[:24],
                    "id": repo.repo_id,
                    "modelId": repo.repo_id,
                    "author": repo.repo_id.split("/")[0],
                    "sha": rev.sha,
                    "private": repo.private,
                    "gated": "manual" if repo.gated else False,
                    "disabled": False,
                    "downloads": 0,
                    "likes": 0,
                    "tags": ["transformers"],
                    "library_name": "transformers",
                    "config": config,
                    "siblings": siblings,
                    "usedStorage": sum(s["size"] for s in siblings),
                    "lastModified": "2026-01-01T00:00:00.000Z",
                    "createdAt": "2026-01-01T00:00:00.000Z",
                }
            )

        def _tree(self, rev: _Revision, sub: str, recursive: bool) -> None:
            prefix = f"{sub.strip('/')}/" if sub else ""
            entries: list[dict] = []
            dirs: set[str] = set()
            for name, p in rev.files.items():
                if not name.startswith(prefix):
                    continue
                rest = name[len(prefix) :]
                if "/" in rest:
                    top = prefix + rest.split("/", 1)[0]
                    if top not in dirs:
                        dirs.add(top)
                        entries.append({"type": "directory", "oid": "0" * 40, "size": 0, "path": top})
                    if not recursive:
                        continue
                size = p.stat().st_size
                entries.append(
                    {
                        "type": "file",
                        "oid": hashlib.sha1(name.encode()).hexdigest(),
                        "size": size,
                        "path": name,
                    }
                )
            if recursive:  # nested directories too, as the Hub lists them
                for name in rev.files:
                    if name.startswith(prefix):
                        segs = name[len(prefix) :].split("/")[:-1]
                        for i in range(2, len(segs) + 1):
                            d = prefix + "/".join(segs[:i])
                            if d not in dirs:
                                dirs.add(d)
                                entries.append({"type": "directory", "oid": "0" * 40, "size": 0, "path": d})
            self._json(entries)

        def _resolve(self, repo_id: str, rev_name: str, filename: str) -> None:
            repo = self._repo(repo_id)
            if repo is None:
                return
            rev = self._revision(repo, rev_name)
            if rev is None:
                return
            if repo.gated and not self._authorized():
                self._error(
                    401,
                    "GatedRepo",
                    f"Access to model {repo_id} is restricted. You must have access to it and be authenticated.",
                )
                return
            path = rev.files.get(filename)
            if path is None or not path.is_file():
                self._error(404, "EntryNotFound", f"{filename} does not exist on {rev_name}")
                return
            data = path.read_bytes()
            headers = {
                "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                "X-Repo-Commit": rev.sha,
                "Accept-Ranges": "bytes",
                "Content-Type": "application/octet-stream",
            }
            start = 0
            status = 200
            rng = self.headers.get("Range")
            if rng:
                m = re.match(r"bytes=(\d+)-(\d*)$", rng.strip())
                if m:
                    start = int(m.group(1))
                    end = int(m.group(2)) if m.group(2) else len(data) - 1
                    if start >= len(data):
                        self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"})
                        return
                    headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
                    data = data[start : end + 1]
                    status = 206
            if self.command == "HEAD":
                self.send_response(200)
                for k, v in headers.items():
                    if k != "Content-Range":
                        self.send_header(k, v)
                self.send_header("Content-Length", str(path.stat().st_size))
                self.end_headers()
                return
            cut = server._next_interruption(repo_id, filename)
            if cut is not None:
                if cut < 0:  # the retries after a cut: the "network" is still down
                    self._error(503, None, "Service unavailable")
                    return
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[:cut])
                self.wfile.flush()
                self.close_connection = True
                return
            if server.bytes_per_second and len(data) > 65536:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                step = max(server.bytes_per_second // 20, 1)
                try:
                    for i in range(0, len(data), step):
                        self.wfile.write(data[i : i + step])
                        self.wfile.flush()
                        time.sleep(0.05)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True
                return
            self._send(status, data, headers)

    return Handler
