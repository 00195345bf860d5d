"""A loopback stand-in for the Hugging Face Hub: the three routes huggingface_hub uses to
pull files (model info with its file list, and HEAD/GET of a file at a revision),
serving model repositories held in memory. Tests point HF_ENDPOINT at it."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


class FakeHub:
    def __init__(self, repos: dict[str, dict[str, bytes]]):
        self.repos = repos  # repo_id -> {path: bytes}
        self.commits = {repo: hashlib.sha1(repo.encode()).hexdigest() for repo in repos}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Authorization)
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                hub._answer(self, body=True)

            def do_HEAD(self):
                hub._answer(self, body=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _answer(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlparse(handler.path).path)
        self.requests.append((handler.command, path, handler.headers.get("Authorization")))
        info = re.fullmatch(r"/api/models/(.+?/.+?)(?:/revision/([^/]+))?", path)
        if info and info.group(1) in self.repos:
            repo = info.group(1)
            siblings = [{"rfilename": p} for p in sorted(self.repos[repo])]
            return self._send(
                handler,
                json.dumps({"id": repo, "sha": self.commits[repo], "siblings": siblings}).encode(),
                {"Content-Type": "application/json"},
                body,
            )
        resolved = re.fullmatch(r"/(.+?/.+?)/resolve/([^/]+)/(.+)", path)
        if (
            resolved
            and resolved.group(1) in self.repos
            and resolved.group(3) in self.repos[resolved.group(1)]
        ):
            repo, _revision, name = resolved.groups()
            data = self.repos[repo][name]
            headers = {"X-Repo-Commit": self.commits[repo], "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}
            return self._send(handler, data, headers, body)
        self._send(
            handler, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"}, body, status=404
        )

    @staticmethod
    def _send(handler, data: bytes, headers: dict, body: bool, status: int = 200) -> None:
        handler.send_response(status)
        for key, value in headers.items():
            handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        if body:
            handler.wfile.write(data)
