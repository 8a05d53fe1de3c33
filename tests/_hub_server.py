""" An in-memory stand-in for the Hugging Face Hub on 127.0.0.1, enough for huggingface_hub's downloads and uploads.

Downloads: ``HEAD/GET /{repo}/resolve/{revision}/{file}`` with X-Repo-Commit, ETag and Content-Length (no redirect, so
no X-Linked-* headers); a missing repo answers 404 ``X-Error-Code: RepoNotFound``, a missing file 404 ``EntryNotFound``
(huggingface_hub's ``RepositoryNotFoundError`` / ``EntryNotFoundError``). Uploads: ``/api/repos/create``,
``/api/validate-yaml``, ``/api/models/{repo}/preupload/{revision}`` (every file 'regular': sent inline, no LFS) and
``/api/models/{repo}/commit/{revision}`` (ndjson). ``GET /api/models/{repo}`` answers a minimal repo info.
"""
import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List, Optional
from urllib.parse import unquote, urlsplit


class FakeHub:
    """Repos (``{repo_id: {path: bytes}}``), their head commits, and a log of the requests (``'METHOD path'``)."""

    def __init__(self) -> None:
        self.repos: Dict[str, Dict[str, bytes]] = {}
        self.commits: Dict[str, str] = {}
        self.requests: List[str] = []
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(('127.0.0.1', 0), type('Handler', (_Handler,), {'hub': self}))
        self.url = f'http://127.0.0.1:{self.server.server_port}'
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> 'FakeHub':
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()

    def commit(self, repo_id: str, files: Optional[Dict[str, bytes]] = None, deleted: List[str] = ()) -> str:
        """Create ``repo_id`` if needed, add ``files``, drop ``deleted``; returns the new commit id (40 hex)."""
        with self._lock:
            repo = self.repos.setdefault(repo_id, {})
            repo.update(files or {})
            for path in deleted:
                repo.pop(path, None)
            digest = hashlib.sha1(repr((len(self.requests), sorted(repo.items()))).encode()).hexdigest()
            self.commits[repo_id] = digest
            return digest


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, status: int, body: bytes = b'', headers: Optional[Dict[str, str]] = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        if self.command != 'HEAD':
            self.wfile.write(body)

    def _json(self, obj: Any, status: int = 200, headers: Optional[Dict[str, str]] = None) -> None:
        self._send(status, json.dumps(obj).encode(), {'Content-Type': 'application/json', **(headers or {})})

    def _repo_missing(self, repo_id: str) -> bool:
        if repo_id in self.hub.repos:
            return False
        self._json({'error': 'Repository not found'}, 404, {'X-Error-Code': 'RepoNotFound'})
        return True

    def _path(self) -> str:
        self.hub.requests.append(f'{self.command} {self.path}')
        return unquote(urlsplit(self.path).path)

    def do_HEAD(self) -> None:
        self._resolve(self._path())

    def do_GET(self) -> None:
        path = self._path()
        info = re.fullmatch(r'/api/models/([^/]+/[^/]+)(?:/revision/.+)?', path)
        if info:
            if not self._repo_missing(info[1]):
                files = [{'rfilename': f} for f in sorted(self.hub.repos[info[1]])]
                self._json({'id': info[1], 'sha': self.hub.commits[info[1]], 'siblings': files})
            return
        self._resolve(path)

    def _resolve(self, path: str) -> None:
        match = re.fullmatch(r'/([^/]+/[^/]+)/resolve/([^/]+)/(.+)', path)
        if not match:
            self._json({'error': f'no route {path}'}, 404)
            return
        repo_id, filename = match[1], match[3]
        if self._repo_missing(repo_id):
            return
        commit = self.hub.commits[repo_id]
        data = self.hub.repos[repo_id].get(filename)
        if data is None:
            self._json({'error': 'Entry not found'}, 404, {'X-Error-Code': 'EntryNotFound', 'X-Repo-Commit': commit})
            return
        etag = f'"{hashlib.sha256(data).hexdigest()}"'
        self._send(200, data, {'X-Repo-Commit': commit, 'ETag': etag, 'Content-Type': 'application/octet-stream'})

    def do_POST(self) -> None:
        path = self._path()
        body = self.rfile.read(int(self.headers.get('Content-Length') or 0))
        upload = re.fullmatch(r'/api/models/([^/]+/[^/]+)/(preupload|commit)/(.+)', path)
        if path == '/api/repos/create':
            payload = json.loads(body)
            repo_id = f'{payload.get("organization") or "user"}/{payload["name"]}'
            if repo_id in self.hub.repos:
                self._json({'error': 'You already created this model repo', 'url': f'{self.hub.url}/{repo_id}'}, 409)
            else:
                self.hub.commit(repo_id)
                self._json({'url': f'{self.hub.url}/{repo_id}'})
        elif path == '/api/validate-yaml':
            self._json({'errors': [], 'warnings': []})
        elif upload and not self._repo_missing(upload[1]):
            repo_id = upload[1]
            if upload[2] == 'preupload':
                files = json.loads(body)['files']
                self._json({'files': [
                    {'path': f['path'], 'uploadMode': 'regular', 'shouldIgnore': False, 'oid': None} for f in files]})
                return
            items = [json.loads(line) for line in body.splitlines() if line.strip()]
            added = {i['value']['path']: base64.b64decode(i['value']['content']) for i in items if i['key'] == 'file'}
            deleted = [i['value']['path'] for i in items if i['key'] == 'deletedFile']
            commit = self.hub.commit(repo_id, added, deleted)
            self._json({'commitUrl': f'{self.hub.url}/{repo_id}/commit/{commit}', 'commitOid': commit,
                        'pullRequestUrl': None})
        elif not upload:
            self._json({'error': f'no route {path}'}, 404)
