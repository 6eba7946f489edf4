"""A local stand-in for the Hugging Face Hub's HTTP API: enough of it for huggingface_hub downloads.

It serves repositories from memory on 127.0.0.1 (tree listings, HEAD and GET of /resolve/), records
every request, and can serve bytes other than the ones it lists, as a corrupted mirror would.
No test ever reaches the real hub.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import yaml

from app.models.registry import load_registry
from app.settings import EMBEDDED_REGISTRY

LFS_SUFFIXES = (".safetensors", ".bin", ".ckpt")
TINY = Path(__file__).resolve().parents[2] / "app" / "models" / "sameseed-tiny"
REPO, COMMIT = "sameseed-test/tiny", "0123456789abcdef0123456789abcdef01234567"  # the tiny model as a hub repo


def tiny_pins() -> dict[str, str]:
    """The sha256 of every file of the embedded tiny model, as its registry entry pins them."""
    return load_registry(EMBEDDED_REGISTRY).get("sameseed-tiny").sha256


def hub_registry(folder: Path, *, pins: bool = True, revision: str = COMMIT) -> Path:
    """Write a registry whose one model, `tiny-hub`, is the tiny model from REPO at `revision`."""
    entry = {
        "id": "tiny-hub",
        "family": "sd1",
        "source": {"hub": {"repo": REPO, "revision": revision}},
        "defaults": {"width": 64, "height": 64},
        "limits": {"min_size": 16, "max_size": 512, "max_pixels": 147456},
        **({"sha256": tiny_pins()} if pins else {}),
    }
    path = folder / "registry.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "default_model": "tiny-hub", "models": [entry]}))
    return path


def git_oid(data: bytes) -> str:
    """The git blob id of some bytes."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(data: bytes) -> bytes:
    """The git-lfs pointer file git stores instead of a large file."""
    oid = hashlib.sha256(data).hexdigest()
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {len(data)}\n".encode()


def folder_files(folder: Path) -> dict[str, bytes]:
    """Every file under a folder by relative path."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


class FakeHub:
    """Serves `repos[(repo, commit)] = {path: bytes}`; `served` overrides the bytes sent for (repo, path)."""

    def __init__(self) -> None:
        self.repos: dict[tuple[str, str], dict[str, bytes]] = {}
        self.served: dict[tuple[str, str], bytes] = {}
        self.requests: list[str] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        """The endpoint to give huggingface_hub (HF_ENDPOINT or endpoint=)."""
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def add(self, repo: str, commit: str, files: dict[str, bytes]) -> None:
        """Publish a repository at a commit."""
        self.repos[(repo, commit)] = dict(files)

    def downloads(self) -> list[str]:
        """The paths of files sent with GET, in order."""
        return [r.split(" ", 1)[1] for r in self.requests if r.startswith("GET ") and "/resolve/" in r]

    def start(self) -> FakeHub:
        """Start serving in a background thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.server_close()

    def _listing(self, repo: str, files: dict[str, bytes]) -> list[dict]:
        entries = []
        for path, data in sorted(files.items()):
            entry = {"type": "file", "path": path, "size": len(data), "oid": git_oid(data)}
            if path.endswith(LFS_SUFFIXES):
                pointer = lfs_pointer(data)
                entry["oid"] = git_oid(pointer)
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": len(pointer)}
            entries.append(entry)
        return entries

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # keep test output clean
                pass

            def do_GET(self) -> None:
                self._answer(body=True)

            def do_HEAD(self) -> None:
                self._answer(body=False)

            def _send(self, status: int, data: bytes, headers: dict[str, str], body: bool) -> None:
                self.send_response(status)
                for name, value in {**headers, "Content-Length": str(len(data))}.items():
                    self.send_header(name, value)
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def _error(self, status: int, code: str, body: bool, **headers: str) -> None:
                payload = json.dumps({"error": code}).encode()
                self._send(status, payload, {"X-Error-Code": code, "Content-Type": "application/json", **headers}, body)

            def _answer(self, body: bool) -> None:
                path = unquote(urlsplit(self.path).path)
                hub.requests.append(f"{self.command} {path}")
                parts = path.strip("/").split("/")
                if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "tree":
                    repo, commit = "/".join(parts[2:4]), parts[5]
                    files = self._repo(repo, commit, body)
                    if files is not None:
                        data = json.dumps(hub._listing(repo, files)).encode()
                        self._send(200, data, {"Content-Type": "application/json"}, body)
                    return
                if len(parts) >= 5 and parts[2] == "resolve":
                    repo, commit, name = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
                    files = self._repo(repo, commit, body)
                    if files is None:
                        return
                    if name not in files:
                        self._error(404, "EntryNotFound", body, **{"X-Repo-Commit": commit})
                        return
                    listed = files[name]
                    data = hub.served.get((repo, name), listed)
                    etag = hashlib.sha256(listed).hexdigest() if name.endswith(LFS_SUFFIXES) else git_oid(listed)
                    headers = {"X-Repo-Commit": commit, "ETag": f'"{etag}"', "Content-Type": "application/octet-stream"}
                    self._send(200, data, headers, body)
                    return
                self._error(404, "NotFound", body)

            def _repo(self, repo: str, commit: str, body: bool) -> dict[str, bytes] | None:
                if not any(r == repo for r, _ in hub.repos):
                    self._error(404, "RepoNotFound", body)
                    return None
                files = hub.repos.get((repo, commit))
                if files is None:
                    self._error(404, "RevisionNotFound", body)
                return files

        return Handler


@contextmanager
def tiny_hub(extra: dict[str, bytes] | None = None) -> Iterator[FakeHub]:
    """A fake hub serving the committed tiny model at REPO@COMMIT (plus `extra` files); stopped on exit."""
    server = FakeHub().start()
    try:
        server.add(REPO, COMMIT, {**folder_files(TINY), **(extra or {})})
        yield server
    finally:
        server.stop()
