"""A stand-in for the Hugging Face Hub on 127.0.0.1, for tests that run the real `huggingface_hub` client.

It implements the endpoints the client calls to publish and fetch a model repository, keeps what is uploaded in
memory (repositories, branches, tags, commits with their files), and records every request so tests can look at
exactly what left the machine:

| client call | endpoint |
| --- | --- |
| `whoami` | `GET /api/whoami-v2` |
| `create_repo` | `POST /api/repos/create` |
| `create_commit` (README check) | `POST /api/validate-yaml` |
| `create_commit` (upload modes) | `POST /api/models/{repo}/preupload/{rev}`: every file is answered 'regular' |
| `create_commit` | `POST /api/models/{repo}/commit/{rev}`: NDJSON, header line then base64 files |
| `create_branch`, `create_tag` | `POST /api/models/{repo}/branch/{branch}`, `POST /api/models/{repo}/tag/{rev}` |
| `repo_info` / `model_info` | `GET /api/models/{repo}[/revision/{rev}]` |
| `list_repo_tree` / `list_repo_files` | `GET /api/models/{repo}/tree/{rev}[/{path}]` |
| `list_repo_refs` | `GET /api/models/{repo}/refs` |
| `hf_hub_download` | `HEAD` and `GET /{repo}/resolve/{rev}/{path}` |
| `dataset_info` (datasets' `load_dataset`) | `GET /api/datasets/{repo}[/revision/{rev}]` |
| `list_repo_tree` of a dataset (`HfFileSystem`) | `GET /api/datasets/{repo}/tree/{rev}[/{path}]` |
| `get_paths_info` of a dataset | `POST /api/datasets/{repo}/paths-info/{rev}` |
| reading a dataset file (`hf://datasets/...`) | `HEAD` and `GET /datasets/{repo}/resolve/{rev}/{path}`, with `Range` |

Dataset repositories are read-only: a test puts one in place with `state.add_dataset(repo_id, files)`.

Authentication is `Authorization: Bearer <token>` against the `tokens` the server is given; private repositories
answer 404 to anyone else, as the Hub does. `fail(kind, times, status)` makes the next `times` requests of one kind
('create', 'preupload', 'commit', 'tag', 'branch', 'whoami', 'info', 'tree', 'resolve', '*') answer `status`.

Run it by hand with `python tests/hubserver.py` (token `hf_test_token`) and point a client at the printed URL
(`HF_ENDPOINT=http://127.0.0.1:PORT`).
"""
from __future__ import annotations
import base64, hashlib, json, re, threading, time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse, parse_qs

import yaml


def git_blob_sha(data: bytes) -> str:
    "The git object id of a file's bytes (what the Hub reports as a regular file's oid and ETag)."
    return hashlib.sha1(b'blob %d\0' % len(data) + data).hexdigest()


@dataclass
class Request:
    method: str
    path: str
    kind: str
    headers: dict     # lower-case names
    body: bytes
    status: int = 0


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: dict = field(default_factory=dict)   # name -> commit oid
    tags: dict = field(default_factory=dict)       # name -> commit oid
    commits: dict = field(default_factory=dict)    # oid -> {'files': {path: bytes}, 'parent', 'message'}
    created: float = field(default_factory=time.time)

    def resolve(self, rev: str) -> str | None:
        "The commit oid a branch, tag or (full) commit id points to."
        if rev in self.branches: return self.branches[rev]
        if rev in self.tags: return self.tags[rev]
        if rev in self.commits: return rev
        return None

    def files(self, rev: str) -> dict | None:
        oid = self.resolve(rev)
        return None if oid is None else self.commits[oid]['files']


class HubState:
    "What the stand-in Hub holds: users, repositories, recorded requests and pending failures."
    def __init__(self, tokens: dict[str, str], orgs: dict[str, list[str]] | None = None):
        self.tokens = dict(tokens)   # token -> user name
        self.orgs = dict(orgs or {})  # user name -> organisations they may write to
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        self.failures: dict[str, list[int]] = {}
        self.lock = threading.RLock()
        self._empty = self._commit_oid(b'empty')

    @staticmethod
    def _commit_oid(seed: bytes) -> str: return hashlib.sha1(seed + str(time.time_ns()).encode()).hexdigest()

    def fail(self, kind: str, times: int = 1, status: int = 500):
        "Answer the next `times` requests of `kind` with `status`."
        with self.lock: self.failures.setdefault(kind, []).extend([status] * times)

    def take_failure(self, kind: str) -> int | None:
        with self.lock:
            for k in (kind, '*'):
                if self.failures.get(k): return self.failures[k].pop(0)
        return None

    def add_dataset(self, repo_id: str, files: dict[str, bytes | str], private: bool = False) -> Repo:
        "A dataset repository holding `files` (path -> content) on its main branch, for datasets' streaming to read."
        with self.lock:
            if not hasattr(self, 'dataset_repos'): self.dataset_repos = {}
            repo = Repo(repo_id, private=private)
            oid = self._commit_oid(repo_id.encode())
            repo.commits[oid] = {'files': {p: b.encode() if isinstance(b, str) else b for p, b in files.items()},
                                 'parent': None, 'message': 'add dataset'}
            repo.branches['main'] = oid
            self.dataset_repos[repo_id] = repo
            return repo

    def uploaded_bytes(self) -> bytes:
        "The bodies of every request sent to the server, joined: what left the client."
        return b''.join(r.body for r in self.requests)

    def files(self, repo_id: str, rev: str = 'main') -> dict[str, bytes]:
        "The files of `repo_id` at a branch, tag or commit."
        return dict(self.repos[repo_id].files(rev) or {})


def _route(method: str, path: str) -> tuple[str, dict]:
    "The kind of request and its parameters, from the method and the (unquoted later) path."
    p = path
    m = re.fullmatch(r'/api/whoami-v2', p)
    if m: return 'whoami', {}
    if p == '/api/repos/create': return 'create', {}
    if p == '/api/validate-yaml': return 'validate', {}
    m = re.fullmatch(r'/api/models/([^/]+/[^/]+)/(preupload|commit|tag|branch)/(.+)', p)
    if m: return m[2], dict(repo=m[1], rev=unquote(m[3]))
    m = re.fullmatch(r'/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?', p)
    if m: return 'tree', dict(repo=m[1], rev=unquote(m[2]), path=unquote(m[3] or ''))
    m = re.fullmatch(r'/api/models/([^/]+/[^/]+)/refs', p)
    if m: return 'refs', dict(repo=m[1])
    m = re.fullmatch(r'/api/models/([^/]+/[^/]+)(?:/revision/(.+))?', p)
    if m: return 'info', dict(repo=m[1], rev=unquote(m[2] or 'main'))
    m = re.fullmatch(r'/([^/]+/[^/]+)/resolve/([^/]+)/(.+)', p)
    if m: return 'resolve', dict(repo=m[1], rev=unquote(m[2]), path=unquote(m[3]))
    m = re.fullmatch(r'/api/datasets/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?', p)
    if m: return 'dataset_tree', dict(repo=m[1], rev=unquote(m[2]), path=unquote(m[3] or ''))
    m = re.fullmatch(r'/api/datasets/([^/]+/[^/]+)/paths-info/([^/]+)', p)
    if m: return 'dataset_paths_info', dict(repo=m[1], rev=unquote(m[2]))
    m = re.fullmatch(r'/api/datasets/([^/]+/[^/]+)(?:/revision/([^/]+))?', p)
    if m: return 'dataset_info', dict(repo=m[1], rev=unquote(m[2] or 'main'))
    m = re.fullmatch(r'/datasets/([^/]+/[^/]+)/resolve/([^/]+)/(.+)', p)
    if m: return 'dataset_resolve', dict(repo=m[1], rev=unquote(m[2]), path=unquote(m[3]))
    return 'unknown', {}


class Handler(BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'
    server_version = 'StandInHub/1.0'
    state: HubState  # set on the subclass made by HubServer

    def log_message(self, *args): pass  # quiet

    # ---- plumbing
    def _body(self) -> bytes:
        n = int(self.headers.get('Content-Length') or 0)
        return self.rfile.read(n) if n else b''

    def _send(self, status: int, payload=None, headers: dict | None = None, body: bytes | None = None):
        if body is None: body = b'' if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        if payload is not None: self.send_header('Content-Type', 'application/json')
        for k, v in (headers or {}).items(): self.send_header(k, str(v))
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        if self.command != 'HEAD': self.wfile.write(body)
        self._rec.status = status

    def _error(self, status: int, message: str, code: str | None = None):
        h = {'X-Error-Message': message}
        if code: h['X-Error-Code'] = code
        self._send(status, {'error': message}, h)

    def _user(self) -> str | None:
        auth = self.headers.get('Authorization', '')
        return self.state.tokens.get(auth[7:]) if auth.startswith('Bearer ') else None

    def _repo(self, repo_id: str, write: bool = False) -> Repo | None:
        "The repository if this caller may see (and, with `write`, change) it; else answers the error and returns None."
        user = self._user()
        repo = self.state.repos.get(repo_id)
        ns = repo_id.split('/')[0]
        allowed = user is not None and (ns == user or ns in self.state.orgs.get(user, []))
        if repo is None or (repo.private and not allowed):
            self._error(404, f'Repository Not Found for url: {self.path}.', 'RepoNotFound')
            return None
        if write and not allowed:
            self._error(403 if user else 401, 'You do not have write access to this repository.')
            return None
        return repo

    def _handle(self):
        body = self._body() if self.command in ('POST', 'PUT') else b''
        url = urlparse(self.path)
        kind, params = _route(self.command, url.path)
        self._rec = Request(self.command, self.path, kind, {k.lower(): v for k, v in self.headers.items()}, body)
        with self.state.lock: self.state.requests.append(self._rec)
        status = self.state.take_failure(kind)
        if status is not None: return self._error(status, f'Injected failure ({status}) for {kind}')
        fn = getattr(self, f'do_{kind}', None)
        if fn is None: return self._error(404, f'Stand-in Hub does not implement {self.command} {url.path}')
        with self.state.lock: fn(body=body, query=parse_qs(url.query), **params)

    do_GET = do_POST = do_HEAD = do_PUT = do_DELETE = _handle

    # ---- endpoints
    def do_whoami(self, body, query):
        user = self._user()
        if user is None: return self._error(401, 'Invalid credentials in Authorization header')
        self._send(200, {'type': 'user', 'name': user, 'fullname': user.title(),
                         'orgs': [{'name': o, 'type': 'org'} for o in self.state.orgs.get(user, [])],
                         'auth': {'type': 'access_token', 'accessToken': {'displayName': 'test', 'role': 'write'}}})

    def do_create(self, body, query):
        user = self._user()
        if user is None: return self._error(401, 'Invalid credentials in Authorization header')
        d = json.loads(body or b'{}')
        ns = d.get('organization') or user
        if ns != user and ns not in self.state.orgs.get(user, []):
            return self._error(403, f'You are not a member of {ns}')
        repo_id = f"{ns}/{d['name']}"
        url = f'http://{self.headers["Host"]}/{repo_id}'
        if repo_id in self.state.repos:  # the Hub's 409 names the existing repository's url
            return self._send(409, {'error': 'You already created this model repo', 'url': url},
                              {'X-Error-Message': 'You already created this model repo'})
        private = d.get('private', d.get('visibility') == 'private') or d.get('visibility') == 'private'
        repo = Repo(repo_id, private=bool(private))
        oid = self.state._commit_oid(repo_id.encode())
        repo.commits[oid] = {'files': {'.gitattributes': b'*.safetensors filter=lfs diff=lfs merge=lfs -text\n'},
                             'parent': None, 'message': 'initial commit'}
        repo.branches['main'] = oid
        self.state.repos[repo_id] = repo
        self._send(200, {'url': url, 'name': repo_id, 'id': repo_id})

    def do_validate(self, body, query):
        content = json.loads(body)['content']
        m = re.match(r'^---\s*\n(.*?)\n---\s*\n', content, re.S)
        errors = []
        if m:
            try:
                meta = yaml.safe_load(m[1])
                if not isinstance(meta, dict): errors.append({'message': '"metadata" must be a mapping'})
            except yaml.YAMLError as e: errors.append({'message': f'Invalid YAML: {e}'})
        self._send(400 if errors else 200, {'errors': errors, 'warnings': []})

    def do_preupload(self, body, query, repo, rev):
        r = self._repo(repo, write=True)
        if r is None: return
        files = r.files(rev) or r.files('main') or {}
        out = [{'path': f['path'], 'uploadMode': 'regular', 'shouldIgnore': False,
                'oid': git_blob_sha(files[f['path']]) if f['path'] in files else None} for f in json.loads(body)['files']]
        self._send(200, {'files': out, 'commitOid': r.resolve(rev) or r.resolve('main')})

    def do_commit(self, body, query, repo, rev):
        r = self._repo(repo, write=True)
        if r is None: return
        if rev not in r.branches: return self._error(404, f'Invalid rev id: {rev}', 'RevisionNotFound')
        lines = [json.loads(l) for l in body.splitlines() if l.strip()]
        header = next((l['value'] for l in lines if l['key'] == 'header'), None)
        if header is None: return self._error(400, 'The commit has no header line')
        files = dict(r.commits[r.branches[rev]]['files'])
        for l in lines:
            v = l['value']
            if l['key'] == 'file':
                if v.get('encoding') != 'base64': return self._error(400, f"Unsupported encoding {v.get('encoding')}")
                files[v['path']] = base64.b64decode(v['content'])
            elif l['key'] == 'deletedFile': files.pop(v['path'], None)
            elif l['key'] == 'deletedFolder':
                files = {p: b for p, b in files.items() if not p.startswith(v['path'].rstrip('/') + '/')}
            elif l['key'] in ('lfsFile', 'xetFile'): return self._error(400, 'The stand-in Hub takes regular files only')
        parent = r.branches[rev]
        oid = self.state._commit_oid(body)
        r.commits[oid] = {'files': files, 'parent': parent, 'message': header.get('summary', '')}
        r.branches[rev] = oid
        host = self.headers['Host']
        self._send(200, {'success': True, 'commitOid': oid, 'commitUrl': f'http://{host}/{repo}/commit/{oid}',
                         'pullRequestUrl': None})

    def do_branch(self, body, query, repo, rev):
        r = self._repo(repo, write=True)
        if r is None: return
        if rev in r.branches: return self._error(409, f'Reference already exists: refs/heads/{rev}')
        start = (json.loads(body or b'{}') or {}).get('startingPoint') or 'main'
        oid = r.resolve(start)
        if oid is None: return self._error(404, f'Invalid rev id: {start}', 'RevisionNotFound')
        r.branches[rev] = oid
        self._send(200, {})

    def do_tag(self, body, query, repo, rev):
        r = self._repo(repo, write=True)
        if r is None: return
        tag = json.loads(body)['tag']
        if tag in r.tags: return self._error(409, f'Tag already exists: {tag}')
        oid = r.resolve(rev)
        if oid is None: return self._error(404, f'Invalid rev id: {rev}', 'RevisionNotFound')
        r.tags[tag] = oid
        self._send(200, {})

    def do_refs(self, body, query, repo):
        r = self._repo(repo)
        if r is None: return
        ref = lambda kind, n, oid: {'name': n, 'ref': f'refs/{kind}/{n}', 'targetCommit': oid}
        self._send(200, {'branches': [ref('heads', n, o) for n, o in r.branches.items()],
                         'tags': [ref('tags', n, o) for n, o in r.tags.items()], 'converts': []})

    def _resolved(self, r: Repo, rev: str):
        oid = r.resolve(rev)
        if oid is None: self._error(404, f'Invalid rev id: {rev}', 'RevisionNotFound')
        return oid

    def do_info(self, body, query, repo, rev):
        r = self._repo(repo)
        if r is None or (oid := self._resolved(r, rev)) is None: return
        files = r.commits[oid]['files']
        self._send(200, {'_id': repo, 'id': repo, 'modelId': repo, 'author': repo.split('/')[0], 'sha': oid,
                         'private': r.private, 'disabled': False, 'gated': False, 'downloads': 0, 'likes': 0,
                         'tags': [], 'library_name': None, 'createdAt': '2024-01-01T00:00:00.000Z',
                         'lastModified': '2024-01-01T00:00:00.000Z',
                         'siblings': [{'rfilename': p, 'size': len(b)} for p, b in sorted(files.items())]})

    def do_tree(self, body, query, repo, rev, path):
        r = self._repo(repo)
        if r is None or (oid := self._resolved(r, rev)) is None: return
        recursive = query.get('recursive', ['false'])[0].lower() in ('1', 'true')
        prefix = path.rstrip('/') + '/' if path else ''
        entries = self._entries(r.commits[oid]['files'], prefix, recursive)
        if prefix and not entries: return self._error(404, f'Path not found: {path}', 'EntryNotFound')
        self._send(200, entries)

    def do_resolve(self, body, query, repo, rev, path):
        r = self._repo(repo)
        if r is None or (oid := self._resolved(r, rev)) is None: return
        data = r.commits[oid]['files'].get(path)
        if data is None: return self._error(404, f'Entry not found: {path}', 'EntryNotFound')
        etag = git_blob_sha(data)
        self._send(200, headers={'X-Repo-Commit': oid, 'ETag': f'"{etag}"', 'Content-Type': 'application/octet-stream'},
                   body=data)

    # ---- dataset repositories (read-only), as datasets' streaming reads them
    def _dataset(self, repo_id: str, rev: str):
        "The dataset repository and the commit `rev` names, if this caller may see them; else answers the error."
        repo = getattr(self.state, 'dataset_repos', {}).get(repo_id)
        user = self._user()
        if repo is None or (repo.private and (user is None or repo_id.split('/')[0] not in [user] + self.state.orgs.get(user, []))):
            self._error(404, f'Repository Not Found for url: {self.path}.', 'RepoNotFound')
            return None, None
        oid = self._resolved(repo, rev)
        return (repo, oid) if oid is not None else (None, None)

    def do_dataset_info(self, body, query, repo, rev):
        r, oid = self._dataset(repo, rev)
        if r is None: return
        files = r.commits[oid]['files']
        self._send(200, {'_id': repo, 'id': repo, 'author': repo.split('/')[0], 'sha': oid, 'private': r.private,
                         'disabled': False, 'gated': False, 'downloads': 0, 'likes': 0, 'tags': [], 'cardData': {},
                         'createdAt': '2024-01-01T00:00:00.000Z', 'lastModified': '2024-01-01T00:00:00.000Z',
                         'siblings': [{'rfilename': p, 'size': len(b)} for p, b in sorted(files.items())]})

    def _entries(self, files: dict, prefix: str, recursive: bool) -> list:
        entries, dirs = [], set()
        for p, b in sorted(files.items()):
            if not p.startswith(prefix): continue
            rest = p[len(prefix):]
            if '/' in rest and not recursive:
                dirs.add(prefix + rest.split('/')[0]); continue
            if recursive:
                parts = rest.split('/')[:-1]
                dirs.update(prefix + '/'.join(parts[:i + 1]) for i in range(len(parts)))
            entries.append({'type': 'file', 'path': p, 'size': len(b), 'oid': git_blob_sha(b)})
        return entries + [{'type': 'directory', 'path': d, 'size': 0, 'oid': git_blob_sha(d.encode())} for d in sorted(dirs)]

    def do_dataset_tree(self, body, query, repo, rev, path):
        r, oid = self._dataset(repo, rev)
        if r is None: return
        recursive = query.get('recursive', ['false'])[0].lower() in ('1', 'true')
        prefix = path.rstrip('/') + '/' if path else ''
        entries = self._entries(r.commits[oid]['files'], prefix, recursive)
        if prefix and not entries: return self._error(404, f'Path not found: {path}', 'EntryNotFound')
        self._send(200, entries)

    def do_dataset_paths_info(self, body, query, repo, rev):
        r, oid = self._dataset(repo, rev)
        if r is None: return
        files = r.commits[oid]['files']
        ctype = self.headers.get('Content-Type', '')
        d = json.loads(body or b'{}') if 'json' in ctype else {k: v for k, v in parse_qs(body.decode()).items()}
        paths = d.get('paths') or []
        paths = [paths] if isinstance(paths, str) else paths
        out = []
        for p in paths:
            p = p.strip('/')
            if p in files: out.append({'type': 'file', 'path': p, 'size': len(files[p]), 'oid': git_blob_sha(files[p])})
            elif p == '' or any(f.startswith(p + '/') for f in files):
                out.append({'type': 'directory', 'path': p, 'size': 0, 'oid': git_blob_sha(p.encode())})
        self._send(200, out)

    def do_dataset_resolve(self, body, query, repo, rev, path):
        r, oid = self._dataset(repo, rev)
        if r is None: return
        data = r.commits[oid]['files'].get(path)
        if data is None: return self._error(404, f'Entry not found: {path}', 'EntryNotFound')
        headers = {'X-Repo-Commit': oid, 'ETag': f'"{git_blob_sha(data)}"', 'Content-Type': 'application/octet-stream',
                   'Accept-Ranges': 'bytes'}
        m = re.fullmatch(r'bytes=(\d*)-(\d*)', self.headers.get('Range', '').strip())
        if m and (m[1] or m[2]):
            n = len(data)
            start, end = (int(m[1]), min(int(m[2]) if m[2] else n - 1, n - 1)) if m[1] else (max(0, n - int(m[2])), n - 1)
            if start >= n: return self._send(416, headers={'Content-Range': f'bytes */{n}'}, body=b'')
            headers['Content-Range'] = f'bytes {start}-{end}/{n}'
            return self._send(206, headers=headers, body=data[start:end + 1])
        self._send(200, headers=headers, body=data)


class HubServer:
    "Start a stand-in Hub on 127.0.0.1 (a free port) in a thread; use as a context manager."
    def __init__(self, tokens: dict[str, str] | None = None, orgs: dict[str, list[str]] | None = None):
        self.state = HubState(tokens or {'hf_test_token': 'tester'}, orgs)
        handler = type('BoundHandler', (Handler,), {'state': self.state})
        self.httpd = ThreadingHTTPServer(('127.0.0.1', 0), handler)
        self.httpd.daemon_threads = True
        self.url = f'http://127.0.0.1:{self.httpd.server_address[1]}'
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def start(self) -> 'HubServer':
        self.thread.start()
        return self

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self): return self.start()
    def __exit__(self, *exc): self.stop()


if __name__ == '__main__':
    with HubServer(orgs={'tester': ['acme']}) as hub:
        print(f'stand-in Hub at {hub.url} (token hf_test_token, user tester, org acme); Ctrl-C to stop', flush=True)
        try:
            while True: time.sleep(3600)
        except KeyboardInterrupt: pass
