"""A Hugging Face hub of the tests' own: no machine here reaches huggingface.co.

It answers what huggingface_hub asks (``HF_ENDPOINT`` points at it): model info with each
file's size and SHA-256 (``/api/models/{repo}[/revision/{rev}]?blobs=true``), and file
downloads (``/{repo}/resolve/{rev}/{file}``, HEAD and GET) with the commit, ETag and size
headers and byte ranges. Faults are set per file or repository: a corrupt body under the
right checksum, a connection cut half-way (once), a download held half-way until released,
a gated repository that needs the token, and missing repositories, revisions and files.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

TOKEN = "hf_local_hub_test_token"
_CHUNK = 256 * 1024


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(4 * 2**20):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class HubFile:
    """One file of a repository, served from ``source``."""

    source: Path
    sha256: str
    size: int
    corrupt: bool = False  # the body differs from the checksum the metadata gives
    cut_once: bool = False  # the first download from byte 0 is cut half-way
    hold: threading.Event | None = None  # downloads stop half-way until this is set
    throttle: float = 0.0  # seconds between chunks (a slow hub)


@dataclass
class HubRepo:
    files: dict[str, HubFile]
    commit: str
    gated: bool = False


@dataclass
class Seen:
    method: str
    path: str
    range: str | None
    authorized: bool


@dataclass
class LocalHub:
    """The hub's repositories, what it was asked, and the server in a thread."""

    repos: dict[str, HubRepo] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    url: str = ""
    _server: uvicorn.Server | None = None
    _thread: threading.Thread | None = None

    def add(self, repo: str, files: dict[str, Path], *, gated: bool = False) -> HubRepo:
        entries = {name: HubFile(path, sha256_file(path), path.stat().st_size)
                   for name, path in files.items()}
        commit = hashlib.sha1(repo.encode() + str(sorted(entries)).encode()).hexdigest()
        self.repos[repo] = HubRepo(entries, commit, gated)
        return self.repos[repo]

    def downloads(self, name: str) -> list[Seen]:
        """The GET requests for file ``name``."""
        return [s for s in self.seen if s.method == "GET" and s.path.endswith("/" + name)]

    # -- the app --------------------------------------------------------------------------

    def app(self) -> Starlette:
        return Starlette(routes=[
            Route("/api/models/{owner}/{name}", self._info),
            Route("/api/models/{owner}/{name}/revision/{revision}", self._info),
            Route("/{owner}/{name}/resolve/{revision}/{file:path}", self._file,
                  methods=["GET", "HEAD"]),
        ])

    def _repo(self, request: Request) -> tuple[HubRepo | None, Response | None]:
        p = request.path_params
        repo = self.repos.get(f"{p['owner']}/{p['name']}")
        authorized = request.headers.get("authorization") == f"Bearer {TOKEN}"
        self.seen.append(Seen(request.method, request.url.path, request.headers.get("range"),
                              authorized))
        if repo is None:
            return None, _error(404, "RepoNotFound", "Repository not found")
        if repo.gated and not authorized:
            return None, _error(401, "GatedRepo", "Access to this model is restricted")
        revision = p.get("revision", "main")
        if revision not in ("main", repo.commit):
            return None, _error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return repo, None

    async def _info(self, request: Request) -> Response:
        repo, refusal = self._repo(request)
        if refusal is not None:
            return refusal
        assert repo is not None
        p = request.path_params
        return JSONResponse({
            "id": f"{p['owner']}/{p['name']}", "modelId": f"{p['owner']}/{p['name']}",
            "sha": repo.commit, "private": False, "gated": "auto" if repo.gated else False,
            "siblings": [{"rfilename": name, "size": f.size, "blobId": f.sha256[:40],
                          "lfs": {"size": f.size, "sha256": f.sha256, "pointerSize": 134}}
                         for name, f in repo.files.items()],
        })

    async def _file(self, request: Request) -> Response:
        repo, refusal = self._repo(request)
        if refusal is not None:
            return refusal
        assert repo is not None
        entry = repo.files.get(request.path_params["file"])
        if entry is None:
            return _error(404, "EntryNotFound", "Entry not found")
        headers = {"X-Repo-Commit": repo.commit, "X-Linked-Etag": f'"{entry.sha256}"',
                   "ETag": f'"{entry.sha256}"', "X-Linked-Size": str(entry.size),
                   "Accept-Ranges": "bytes"}
        if request.method == "HEAD":
            return Response(b"", headers={**headers, "Content-Length": str(entry.size)})
        start, end = 0, entry.size  # end: exclusive
        wanted = request.headers.get("range")
        if wanted and wanted.startswith("bytes="):
            first, _, last = wanted[len("bytes="):].partition("-")
            start = int(first or 0)
            end = min(entry.size, int(last) + 1) if last else entry.size
        status = 206 if wanted else 200
        if wanted:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{entry.size}"
        cut = entry.cut_once and start == 0
        if cut:
            entry.cut_once = False
        headers["Content-Length"] = str(end - start)
        return StreamingResponse(self._body(entry, start, end, cut), status_code=status,
                                 headers=headers, media_type="application/octet-stream")

    async def _body(self, entry: HubFile, start: int, end: int,
                    cut: bool) -> AsyncIterator[bytes]:
        half = entry.size // 2
        held = False
        with entry.source.open("rb") as fh:
            fh.seek(start)
            position = start
            while position < end:
                if position >= half and not held:
                    held = True
                    if cut:
                        raise ConnectionResetError("the local hub cuts this download half-way")
                    if entry.hold is not None:
                        await asyncio.to_thread(entry.hold.wait)
                limit = min(_CHUNK, end - position, half - position if position < half else _CHUNK)
                chunk = fh.read(limit)
                if not chunk:
                    break
                if entry.corrupt:
                    chunk = bytes(b ^ 0xFF for b in chunk[:16]) + chunk[16:]
                position += len(chunk)
                if entry.throttle:
                    await asyncio.sleep(entry.throttle)
                yield chunk

    # -- the server -----------------------------------------------------------------------

    def start(self) -> LocalHub:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        config = uvicorn.Config(self.app(), log_level="warning", lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]},
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            assert time.monotonic() < deadline, "the local hub did not start"
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        for repo in self.repos.values():
            for entry in repo.files.values():
                if entry.hold is not None:
                    entry.hold.set()
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(10)


def _error(status: int, code: str, message: str) -> Response:
    return JSONResponse({"error": message}, status_code=status,
                        headers={"X-Error-Code": code, "X-Error-Message": message})
