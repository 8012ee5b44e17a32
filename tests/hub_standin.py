"""A local stand-in of the Hugging Face Hub: an HTTP server on 127.0.0.1 that serves
repositories' files and the API responses ``huggingface_hub`` / ``datasets`` ask for.

The real clients run against it unchanged (``HF_ENDPOINT=http://127.0.0.1:<port>``), so an id,
config name, split, field or file pattern the real libraries would reject fails here too. Each
repository is a folder ``<root>/<datasets|models>/<namespace>/<name>/<revision>/`` holding
that revision's files (``refs/convert/parquet`` is the folder ``refs__convert__parquet``);
a revision's commit sha is a hash of its files. Endpoints (those the pinned clients use):

    GET|HEAD /<datasets/>{repo}/resolve/{revision}/{path}      a file (ETag, X-Repo-Commit)
    GET /api/{datasets|models}/{repo}[/revision/{revision}]    repo info (sha, siblings)
    GET /api/{datasets|models}/{repo}/tree/{revision}[/{path}] a folder listing
    POST /api/{datasets|models}/{repo}/paths-info/{revision}   info about given paths
    POST /api/repos/create                                     a new, empty repository (a token needed)
    POST /api/{datasets|models}/{repo}/preupload/{revision}    every file goes as a regular blob
    POST /api/{datasets|models}/{repo}/commit/{revision}       an NDJSON commit: files added/deleted

Anything else is a 404 with the hub's ``X-Error-Code`` header (RepoNotFound, RevisionNotFound,
EntryNotFound), which the clients turn into their own errors. A repository holding a ``.gated``
file reports ``gated`` in its info; with ``HubStandIn(root, gate_tokens={...})`` its files are
also refused as the hub refuses them: 401 GatedRepo without a token, 403 GatedRepo with a token
not in ``gate_tokens`` (the default, ``None``, serves them to anyone). ``requests`` records every
request (method, path) for tests that check what was fetched.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

KINDS = ("datasets", "models")
API_OPS = ("revision", "tree", "paths-info", "preupload", "commit")


def revision_dir_name(revision: str) -> str:
    return revision.replace("/", "__")


def tree_sha(folder: Path) -> str:
    h = hashlib.sha1()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(folder)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


class HubStandIn:
    """``with HubStandIn(root) as hub: …`` serves ``root`` on ``hub.endpoint``."""

    def __init__(self, root: Path, gate_tokens: Iterable[str] | None = None) -> None:
        self.root = Path(root)
        self.gate_tokens = None if gate_tokens is None else frozenset(gate_tokens)
        self.requests: list[tuple[str, str]] = []
        self.created: list[tuple[str, str, bool]] = []  # (kind, repo, private) made by create_repo
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> HubStandIn:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    # ------------------------------------------------------------------ repositories
    def repo(self, kind: str, repo_id: str, revision: str) -> tuple[Path | None, str | None, str | None]:
        """(folder, sha, error code): the revision may be a branch name or a commit sha."""
        base = self.root / kind / repo_id
        if "/" not in repo_id or not base.is_dir():
            return None, None, "RepoNotFound"
        for folder in sorted(p for p in base.iterdir() if p.is_dir()):
            sha = tree_sha(folder)
            if revision in (folder.name.replace("__", "/"), sha):
                return folder, sha, None
        return None, None, "RevisionNotFound"

    @staticmethod
    def split_repo_and_revision(parts: list[str], kind: str) -> tuple[str, str, list[str]]:
        """``ns/name/<op>/<revision…>/<rest…>``: a revision may hold slashes (refs/convert/parquet)."""
        repo = "/".join(parts[:2])
        rest = parts[2:]
        if rest[:3] == ["refs", "convert", "parquet"] or rest[:2] == ["refs", "pr"]:
            n = 3
            return repo, "/".join(rest[:n]), rest[n:]
        return repo, rest[0] if rest else "main", rest[1:]

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def send(self, code: int, body: bytes | dict | list = b"", headers: dict | None = None) -> None:
                ctype = "application/octet-stream"
                if isinstance(body, (dict, list)):
                    body, ctype = json.dumps(body).encode(), "application/json"
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def error(self, code: str, status: int = 404, message: str | None = None) -> None:
                message = message or code
                self.send(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message})

            def gate(self, kind: str, repo: str, folder: Path) -> bool:
                """Refuse a gated repository's file as the hub does; True when refused."""
                if hub.gate_tokens is None or not (folder / ".gated").exists():
                    return False
                auth = self.headers.get("Authorization") or ""
                token = auth[len("Bearer ") :] if auth.startswith("Bearer ") else ""
                if token in hub.gate_tokens:
                    return False
                what = f"{kind[:-1]} {repo}"
                if token:
                    message = (
                        f"Access to {what} is restricted and you are not in the authorized list. "
                        f"Visit https://huggingface.co/{'datasets/' if kind == 'datasets' else ''}{repo} "
                        "to ask for access."
                    )
                    self.error("GatedRepo", 403, message)
                else:
                    message = (
                        f"Access to {what} is restricted. You must have access to it and be "
                        "authenticated to access it. Please log in."
                    )
                    self.error("GatedRepo", 401, message)
                return True

            def do_GET(self) -> None:
                self.route()

            def do_HEAD(self) -> None:
                self.route()

            def do_POST(self) -> None:
                self.route()

            def route(self) -> None:
                url = urlparse(self.path)
                path = unquote(url.path)
                hub.requests.append((self.command, path))
                size = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(size) if size else b""
                parts = [p for p in path.split("/") if p]
                if parts == ["api", "repos", "create"] and self.command == "POST":
                    return self.create(json.loads(body or b"{}"))
                if parts == ["api", "validate-yaml"] and self.command == "POST":
                    return self.validate_yaml(json.loads(body or b"{}"))
                if len(parts) >= 2 and parts[0] == "api" and parts[1] in KINDS:
                    return self.api(parts[1], parts[2:], parse_qs(url.query), body)
                kind = "datasets" if parts[:1] == ["datasets"] else "models"
                parts = parts[1:] if kind == "datasets" else parts
                if len(parts) >= 4 and parts[2] == "resolve":
                    repo, revision, rest = hub.split_repo_and_revision(parts[:2] + parts[3:], kind)
                    return self.resolve(kind, repo, revision, "/".join(rest))
                return self.error("RepoNotFound")

            def authorised(self) -> bool:
                """Writes need a token (any token: the stand-in has no accounts); 401 otherwise."""
                if (self.headers.get("Authorization") or "").startswith("Bearer "):
                    return True
                self.error("Unauthorized", 401, "Invalid credentials in Authorization header")
                return False

            def create(self, spec: dict) -> None:
                if not self.authorised():
                    return None
                kind = (spec.get("type") or "model") + "s"
                repo = f"{spec.get('organization') or 'user'}/{spec['name']}"
                base = hub.root / kind / repo
                if base.exists():
                    return self.error("RepoExists", 409, "You already created this model repo")
                (base / "main").mkdir(parents=True)
                # huggingface_hub ≥1 sends visibility ("private"/"public"); older clients sent private
                private = spec.get("visibility") == "private" or bool(spec.get("private"))
                hub.created.append((kind, repo, private))
                return self.send(200, {"url": f"{hub.endpoint}/{repo}", "name": repo})

            def validate_yaml(self, spec: dict) -> None:
                """A README's front matter must be a YAML mapping (400 with the errors otherwise),
                as the hub checks before a commit that carries a model card."""
                import yaml

                text = spec.get("content") or ""
                front = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.S)  # the README's front matter
                try:
                    meta = yaml.safe_load(front.group(1)) if front else None
                except yaml.YAMLError as e:
                    return self.send(400, {"errors": [{"message": f"invalid YAML: {e}"}]})
                if meta is not None and not isinstance(meta, dict):
                    return self.send(400, {"errors": [{"message": "metadata must be a mapping"}]})
                return self.send(200, {"errors": [], "warnings": []})

            def commit(self, folder: Path, body: bytes, url_path: str) -> None:
                if not self.authorised():
                    return None
                for line in body.splitlines():
                    item = json.loads(line)
                    value = item["value"]
                    if item["key"] == "file":
                        target = folder / value["path"]
                        target.parent.mkdir(parents=True, exist_ok=True)
                        target.write_bytes(base64.b64decode(value["content"]))
                    elif item["key"] == "deletedFile":
                        (folder / value["path"]).unlink(missing_ok=True)
                    elif item["key"] != "header":
                        return self.error("BadRequest", 400, f"the stand-in does not take {item['key']}")
                sha = tree_sha(folder)
                return self.send(
                    200,
                    {
                        "commitUrl": f"{hub.endpoint}/{url_path}/commit/{sha}",
                        "commitOid": sha,
                        "pullRequestUrl": None,
                    },
                )

            def resolve(self, kind: str, repo: str, revision: str, file: str) -> None:
                folder, sha, err = hub.repo(kind, repo, revision)
                if err:
                    return self.error(err)
                if self.gate(kind, repo, folder):
                    return None
                f = folder / file
                if not f.is_file():
                    return self.error("EntryNotFound")
                data = f.read_bytes()
                etag = hashlib.sha1(data).hexdigest()
                self.send(200, data, {"ETag": f'"{etag}"', "X-Repo-Commit": sha, "Accept-Ranges": "bytes"})

            def api(self, kind: str, parts: list[str], query: dict, body: bytes) -> None:
                if len(parts) < 2:
                    return self.error("RepoNotFound")
                op = parts[2] if len(parts) > 2 and parts[2] in API_OPS else None
                if op is None:
                    repo, revision, rest = "/".join(parts[:2]), "main", []
                else:
                    repo, revision, rest = hub.split_repo_and_revision(parts[:2] + parts[3:], kind)
                folder, sha, err = hub.repo(kind, repo, revision)
                if err:
                    return self.error(err)

                def entry(p: Path) -> dict:
                    rel = str(p.relative_to(folder))
                    if p.is_dir():
                        return {"type": "directory", "path": rel, "oid": tree_sha(p)}
                    data = p.read_bytes()
                    return {
                        "type": "file",
                        "path": rel,
                        "size": len(data),
                        "oid": hashlib.sha1(data).hexdigest(),
                    }

                if op == "preupload":
                    wanted = json.loads(body or b"{}").get("files", [])
                    return self.send(
                        200,
                        {
                            "files": [
                                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                for f in wanted
                            ]
                        },
                    )
                if op == "commit":
                    return self.commit(folder, body, ("" if kind == "models" else f"{kind}/") + repo)
                files = sorted(p for p in folder.rglob("*") if p.is_file())
                if op in (None, "revision"):
                    return self.send(
                        200,
                        {
                            "id": repo,
                            "_id": repo,
                            "sha": sha,
                            "private": False,
                            "gated": "manual" if (folder / ".gated").exists() else False,
                            "disabled": False,
                            "tags": [],
                            "downloads": 0,
                            "likes": 0,
                            "lastModified": "2024-01-01T00:00:00.000Z",
                            "createdAt": "2024-01-01T00:00:00.000Z",
                            "siblings": [
                                {"rfilename": str(p.relative_to(folder))} for p in files if p.name != ".gated"
                            ],
                        },
                    )
                if op == "tree":
                    base = folder.joinpath(*rest)
                    if not base.is_dir():
                        return self.error("EntryNotFound")
                    recursive = query.get("recursive", ["false"])[0].lower() == "true"
                    return self.send(
                        200, [entry(p) for p in sorted(base.rglob("*") if recursive else base.iterdir())]
                    )
                # paths-info: form-encoded or JSON {"paths": [...]}
                try:
                    paths = json.loads(body or b"{}").get("paths", [])
                except ValueError:
                    paths = parse_qs(body.decode()).get("paths", [])
                return self.send(200, [entry(folder / p) for p in paths if (folder / p).exists()])

        return Handler
