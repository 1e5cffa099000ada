"""A small stand-in for the Hugging Face Hub on 127.0.0.1, for offline tests.

It serves the endpoints huggingface_hub uses here: repo info at a revision (revision → commit),
the file tree at a commit, and file HEAD/GET under /<repo>/resolve/<revision>/<path> with the
X-Repo-Commit / ETag / Content-Length headers the client expects. Errors carry the X-Error-Code
headers the client maps to RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError and
RemoteEntryNotFoundError. Every request is logged as (method, path).

Files also answer `Range: bytes=a-b`, `bytes=a-` and `bytes=-n` (one range) with 206 and
Content-Range, and an unsatisfiable range with 416, as the Hub and its CDN do (huggingface_hub
itself sends open-ended ranges to resume downloads). A file is bytes, or a path on disk (a sparse
file stands in for a large one). `served` counts the body bytes sent per `repo/file`; `fault`
makes range responses misbehave: "short" (a shorter body, honestly declared), "cut" (the
connection closed before the declared length), "ignore-range" (200 with the whole file),
"wrong-range" (a Content-Range one byte off the range asked for); `fault_from` spares ranges
that start before it (a shard's header, say).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


@dataclass
class FakeRepo:
    """Commits (sha → path → bytes) and refs (branch/tag → sha); `token` makes it gated."""

    commits: dict[str, dict[str, bytes | Path]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    token: str | None = None

    def add_commit(self, files: dict[str, bytes | Path], *, ref: str = "main") -> str:
        digest = hashlib.sha1(repr(sorted((k, _digest(v)) for k, v in files.items())).encode())
        sha = digest.hexdigest()
        self.commits[sha] = dict(files)
        self.refs[ref] = sha
        return sha


_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def _digest(data: bytes | Path) -> str:
    """A content id: the bytes' sha256, or for a file on disk its path and size (not read)."""
    if isinstance(data, Path):
        return hashlib.sha256(f"{data}:{data.stat().st_size}".encode()).hexdigest()
    return hashlib.sha256(data).hexdigest()


def _size(data: bytes | Path) -> int:
    return data.stat().st_size if isinstance(data, Path) else len(data)


def _read(data: bytes | Path, start: int, stop: int) -> bytes:
    if isinstance(data, bytes):
        return data[start:stop]
    with open(data, "rb") as file:
        file.seek(start)
        return file.read(stop - start)


def parse_range(header: str | None, size: int) -> tuple[int, int] | None | str:
    """(start, stop) of a single `bytes=` range; None to serve the whole file; "unsatisfiable"."""
    match = _RANGE.match(header or "")
    if match is None or match[1] == match[2] == "":
        return None  # no range, or one this stand-in does not serve (several): the whole file
    if match[1] == "":
        start, stop = max(size - int(match[2]), 0), size
    else:
        start, stop = int(match[1]), size if match[2] == "" else min(int(match[2]) + 1, size)
    return (start, stop) if start < size and start < stop else "unsatisfiable"


def files_of(folder: Path) -> dict[str, bytes]:
    """Every file below `folder` by relative path, as a repository would hold them."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


class HubServer:
    def __init__(self) -> None:
        self.repos: dict[str, FakeRepo] = {}
        self.log: list[tuple[str, str]] = []
        self.served: Counter[str] = Counter()
        self.fault: str | None = None
        self.fault_from = 0  # only ranges starting at or after this byte misbehave
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> HubServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread.is_alive():  # shutdown() waits for serve_forever, which may never have run
            self._server.shutdown()
        self._server.server_close()

    def file_requests(self) -> list[tuple[str, str]]:
        """(method, path) of every request for a file (HEAD or GET under /resolve/)."""
        return [entry for entry in self.log if "/resolve/" in entry[1]]

    def downloads(self) -> list[str]:
        """Paths of the files fetched with GET (the bytes actually transferred)."""
        return [path for method, path in self.log if method == "GET" and "/resolve/" in path]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep test output quiet
                pass

            def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
                hub.log.append(("HEAD", urlsplit(self.path).path))
                self._serve(body=False)

            def do_GET(self) -> None:  # noqa: N802
                hub.log.append(("GET", urlsplit(self.path).path))
                self._serve(body=True)

            def _reply(self, status: int, payload: bytes = b"", headers: dict[str, str] | None = None,
                       body: bool = True) -> None:
                self.send_response(status)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if body:
                    self.wfile.write(payload)

            def _error(self, status: int, code: str, body: bool, extra: dict[str, str] | None = None) -> None:
                self._reply(status, json.dumps({"error": code}).encode(), {"X-Error-Code": code, **(extra or {})},
                            body)

            def _repo(self, repo_id: str, body: bool) -> FakeRepo | None:
                repo = hub.repos.get(repo_id)
                if repo is None:
                    self._error(404, "RepoNotFound", body)
                    return None
                if repo.token is not None and self.headers.get("Authorization") != f"Bearer {repo.token}":
                    self._error(403 if self.headers.get("Authorization") else 401, "GatedRepo", body)
                    return None
                return repo

            def _commit(self, repo: FakeRepo, revision: str, body: bool) -> str | None:
                sha = repo.refs.get(revision, revision if revision in repo.commits else None)
                if sha is None:
                    self._error(404, "RevisionNotFound", body)
                return sha

            def _serve(self, body: bool) -> None:
                parts = [unquote(p) for p in urlsplit(self.path).path.strip("/").split("/")]
                if parts[:2] == ["api", "models"] and len(parts) >= 4:
                    self._api(f"{parts[2]}/{parts[3]}", parts[4:], body)
                elif len(parts) >= 5 and parts[2] == "resolve":
                    self._file(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]), body)
                else:
                    self._reply(404, b"not found", body=body)

            def _api(self, repo_id: str, rest: list[str], body: bool) -> None:
                repo = self._repo(repo_id, body)
                if repo is None:
                    return
                if not rest or rest[0] in ("revision", "tree"):
                    sha = self._commit(repo, rest[1] if len(rest) > 1 else "main", body)
                    if sha is None:
                        return
                    files = repo.commits[sha]
                    if rest and rest[0] == "tree":
                        tree = [{"type": "file", "path": name, "size": _size(data), "oid": _digest(data)[:40]}
                                for name, data in sorted(files.items())]
                        self._reply(200, json.dumps(tree).encode(), {"Content-Type": "application/json"}, body)
                        return
                    info = {"id": repo_id, "modelId": repo_id, "sha": sha, "private": False,
                            "siblings": [{"rfilename": name} for name in sorted(files)]}
                    self._reply(200, json.dumps(info).encode(), {"Content-Type": "application/json"}, body)
                    return
                self._reply(404, b"not found", body=body)

            def _file(self, repo_id: str, revision: str, name: str, body: bool) -> None:
                repo = self._repo(repo_id, body)
                if repo is None:
                    return
                sha = self._commit(repo, revision, body)
                if sha is None:
                    return
                data = repo.commits[sha].get(name)
                if data is None:
                    self._error(404, "EntryNotFound", body, {"X-Repo-Commit": sha})
                    return
                self._send_file(f"{repo_id}/{name}", sha, data, body)

            def _send_file(self, key: str, sha: str, data: bytes | Path, body: bool) -> None:
                size = _size(data)
                headers = {"X-Repo-Commit": sha, "ETag": f'"{_digest(data)}"', "Accept-Ranges": "bytes",
                           "Content-Type": "application/octet-stream"}
                wanted = parse_range(self.headers.get("Range"), size)
                if hub.fault == "ignore-range" and isinstance(wanted, tuple) and wanted[0] >= hub.fault_from:
                    wanted = None
                if wanted == "unsatisfiable":
                    self._reply(416, b"", {**headers, "Content-Range": f"bytes */{size}"}, body)
                    return
                start, stop = wanted if isinstance(wanted, tuple) else (0, size)
                if isinstance(wanted, tuple):
                    misbehave = hub.fault == "wrong-range" and start >= hub.fault_from
                    shift = 1 if misbehave else 0  # says it sends other bytes than asked
                    headers["Content-Range"] = f"bytes {start + shift}-{stop - 1 + shift}/{size}"
                self.send_response(206 if isinstance(wanted, tuple) else 200)
                for key_, value in headers.items():
                    self.send_header(key_, value)
                # Whole files are served whole; ranges starting before `fault_from` are served well.
                fault = hub.fault if isinstance(wanted, tuple) and start >= hub.fault_from else None
                sent_stop = stop - 1 if fault in ("short", "cut") and stop > start else stop
                declared = sent_stop if fault == "short" else stop
                self.send_header("Content-Length", str(declared - start))
                if fault == "cut":
                    self.send_header("Connection", "close")
                    self.close_connection = True
                self.end_headers()
                if not body:
                    return
                for offset in range(start, sent_stop, 1 << 22):
                    chunk = _read(data, offset, min(offset + (1 << 22), sent_stop))
                    self.wfile.write(chunk)
                    hub.served[key] += len(chunk)

        return Handler
