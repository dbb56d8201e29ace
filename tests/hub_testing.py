"""A stand-in for the Hugging Face Hub on 127.0.0.1: the few HTTP routes that huggingface_hub's
`snapshot_download` calls (revision info, file tree, file metadata and content), serving folders of files
under repo ids and revisions. Downloads from it are written into the cache by huggingface_hub itself, so the
cache the tests read offline is laid out exactly as a real download lays it out.

    with FakeHub({"org/model": {"main": folder_a, "v2": folder_b}}) as hub:
        env = hub.environ(hf_home)      # HF_ENDPOINT and HF_HOME for a subprocess
"""
import hashlib
import http.server
import json
import threading
from pathlib import Path
from urllib.parse import unquote, urlparse


class FakeHub:
    def __init__(self, repos: dict):
        # repo id -> revision name -> (commit sha, {path in repo: bytes})
        self.repos = {}
        for repo_id, revisions in repos.items():
            self.repos[repo_id] = {}
            for revision, folder in revisions.items():
                files = {p.relative_to(folder).as_posix(): p.read_bytes()
                         for p in sorted(Path(folder).rglob("*")) if p.is_file()}
                commit = hashlib.sha1(json.dumps([repo_id, revision, sorted(files)]).encode()).hexdigest()
                self.repos[repo_id][revision] = (commit, files)
        self.requests: list[str] = []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                hub._serve(self, body=False)

            def do_GET(self):
                hub._serve(self, body=True)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def environ(self, hf_home: Path) -> dict:
        return {"HF_ENDPOINT": self.url, "HF_HOME": str(hf_home), "HF_HUB_DISABLE_TELEMETRY": "1",
                "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0"}

    def _revision(self, repo_id: str, revision: str):
        revisions = self.repos.get(repo_id, {})
        if revision in revisions:
            return revisions[revision]
        return next((entry for entry in revisions.values() if entry[0] == revision), None)

    def _serve(self, handler, *, body: bool):
        url = urlparse(handler.path)
        path = unquote(url.path)
        self.requests.append(f"{handler.command} {path}")
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"]:
            rest = parts[2:]
            kind = next((i for i, p in enumerate(rest) if p in ("revision", "tree")), None)
            if kind is None or kind + 1 >= len(rest):
                return self._send(handler, 404, b"{}", {"X-Error-Code": "RepoNotFound"}, body)
            repo_id, revision = "/".join(rest[:kind]), rest[kind + 1]
            if repo_id not in self.repos:
                return self._send(handler, 404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"},
                                  body)
            entry = self._revision(repo_id, revision)
            if entry is None:
                return self._send(handler, 404, b'{"error": "Invalid rev id"}', {"X-Error-Code": "RevisionNotFound"},
                                  body)
            commit, files = entry
            if rest[kind] == "revision":
                info = {"id": repo_id, "modelId": repo_id, "sha": commit, "private": False,
                        "siblings": [{"rfilename": name} for name in files]}
            else:
                info = [{"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                        for name, data in files.items()]
            return self._send(handler, 200, json.dumps(info).encode(), {"Content-Type": "application/json"}, body)
        if "resolve" in parts:
            at = parts.index("resolve")
            repo_id, revision, name = "/".join(parts[:at]), parts[at + 1], "/".join(parts[at + 2:])
            entry = self._revision(repo_id, revision) if repo_id in self.repos else None
            if entry is None or name not in entry[1]:
                return self._send(handler, 404, b"{}", {"X-Error-Code": "EntryNotFound"}, body)
            commit, files = entry
            data = files[name]
            headers = {"X-Repo-Commit": commit, "ETag": f'"{hashlib.sha1(data).hexdigest()}"',
                       "Content-Type": "application/octet-stream"}
            return self._send(handler, 200, data, headers, body)
        return self._send(handler, 404, b"{}", {}, body)

    @staticmethod
    def _send(handler, status: int, data: bytes, headers: dict, body: bool):
        handler.send_response(status)
        for key, value in headers.items():
            handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        if body:
            handler.wfile.write(data)
