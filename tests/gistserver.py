"""A stand-in for the GitHub gist API on 127.0.0.1, for tests that run nbtrain's real gist client (`nbtrain.gist`).

It serves gists in the shape GitHub answers them (files with `content`, `truncated`, `raw_url`; `owner`, `history`,
`html_url`), keeps a history of revisions per gist (the newest is the default), and records every request so tests
can look at exactly what the client sent:

| client call | endpoint |
| --- | --- |
| `fetch_gist(id)` | `GET /gists/{id}`: the newest revision |
| `fetch_gist(id, revision=sha)` | `GET /gists/{id}/{sha}` |
| a truncated file's `raw_url` | `GET /raw/{id}/{sha}/{file}`: the bytes |

Files over `truncate_over` bytes (1 MiB, as GitHub), files named in `add_gist(..., truncated=...)` and files that
are not UTF-8 are answered `truncated: true` (no or partial `content`), so the client fetches them from `raw_url`.

Authentication is optional, as on GitHub: no `Authorization` header reads any gist; with `tokens` given, a `Bearer`
token that is not among them is answered 401 (GitHub's "Bad credentials"); without, any token is accepted. `fail(kind, times, status, headers, body)` makes the next
`times` requests of one kind ('gist', 'revision', 'raw', '*') answer `status` with `headers` (status 0 drops the
connection without an answer, a reset); `rate_limit(times)` is a 403 with GitHub's rate-limit headers.

Fixtures: `add_gist(folder_or_files, gist_id=None, owner='builder-user') -> id` loads a folder (every file in it) or
a {name: bytes|str} dict as a gist; `update_gist(id, {name: bytes|str|None})` makes a new revision (None deletes a
file); `delete_gist(id)`.

Run it by hand with `python tests/gistserver.py [fixture folders...]` and point the client at the printed URL
(`NBTRAIN_GIST_API=http://127.0.0.1:PORT/gists`).
"""
from __future__ import annotations
import hashlib, json, re, threading, time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, unquote, urlparse

FIXTURES = Path(__file__).parent / 'fixtures'


@dataclass
class Request:
    method: str
    path: str
    kind: str
    headers: dict     # lower-case names
    status: int = 0


@dataclass
class Revision:
    version: str      # a 40-hex commit sha
    files: dict       # name -> bytes
    committed_at: str


@dataclass
class Gist:
    gist_id: str
    owner: str | None
    description: str
    public: bool
    truncated: set = field(default_factory=set)   # file names always answered truncated
    history: list = field(default_factory=list)   # Revision, newest first

    def at(self, sha: str | None) -> Revision | None:
        if sha is None: return self.history[0]
        return next((r for r in self.history if r.version == sha), None)


def _iso(t: float) -> str: return time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(t))


def _as_bytes(v) -> bytes: return v.encode() if isinstance(v, str) else bytes(v)


class GistState:
    "What the stand-in holds: gists with their revisions, recorded requests and pending failures."
    def __init__(self, tokens=None, truncate_over: int = 1 << 20):
        self.tokens = None if tokens is None else set(tokens)  # None: any token is accepted
        self.truncate_over = truncate_over
        self.gists: dict[str, Gist] = {}
        self.requests: list[Request] = []
        self.failures: dict[str, list[tuple]] = {}
        self.lock = threading.RLock()
        self._n = 0

    def _sha(self, seed: bytes) -> str:
        self._n += 1
        return hashlib.sha1(seed + b'%d-%d' % (self._n, time.time_ns())).hexdigest()

    def fail(self, kind: str = '*', times: int = 1, status: int = 500, headers: dict | None = None, body: bytes | None = None):
        "Answer the next `times` requests of `kind` ('gist', 'revision', 'raw', '*') with `status` (0: drop the connection)."
        with self.lock: self.failures.setdefault(kind, []).extend([(status, dict(headers or {}), body)] * times)

    def rate_limit(self, times: int = 1, reset_in: float = 1.0, status: int = 403):
        "The next `times` requests hit GitHub's rate limit (403, `X-RateLimit-Remaining: 0`, reset in `reset_in` s)."
        self.fail('*', times, status, {'X-RateLimit-Limit': '60', 'X-RateLimit-Remaining': '0', 'X-RateLimit-Used': '60',
                                       'X-RateLimit-Reset': str(int(time.time() + reset_in)), 'X-RateLimit-Resource': 'core'},
                  b'{"message": "API rate limit exceeded for 127.0.0.1. (But here\'s the good news: Authenticated requests '
                  b'get a higher rate limit.)", "documentation_url": "https://docs.github.com/rest/rate-limit"}')

    def take_failure(self, kind: str):
        with self.lock:
            for k in (kind, '*'):
                if self.failures.get(k): return self.failures[k].pop(0)
        return None

    def add_gist(self, source, gist_id: str | None = None, owner: str | None = 'builder-user', *, description: str = '',
                 public: bool = False, truncated=()) -> str:
        "A new gist from a folder (its files) or a {name: bytes|str} dict; returns its id (32 hex characters unless given)."
        if isinstance(source, (str, Path)):
            files = {p.name: p.read_bytes() for p in sorted(Path(source).iterdir()) if p.is_file()}
            description = description or f'Transformer Builder export: {Path(source).name}'
        else: files = {k: _as_bytes(v) for k, v in source.items()}
        with self.lock:
            gid = gist_id or self._sha(json.dumps(sorted(files)).encode())[:32]
            g = Gist(gid, owner, description, public, set(truncated))
            g.history.insert(0, Revision(self._sha(b''.join(files.values())), files, _iso(time.time())))
            self.gists[gid] = g
        return gid

    def update_gist(self, gist_id: str, files: dict) -> str:
        "A new revision of `gist_id`: `files` replace (bytes or str) or delete (None) files; returns its version sha."
        with self.lock:
            g = self.gists[gist_id]
            new = dict(g.history[0].files)
            for k, v in files.items():
                if v is None: new.pop(k, None)
                else: new[k] = _as_bytes(v)
            rev = Revision(self._sha(b''.join(new.values())), new, _iso(time.time()))
            g.history.insert(0, rev)
        return rev.version

    def delete_gist(self, gist_id: str):
        with self.lock: self.gists.pop(gist_id, None)

    def sent_headers(self, name: str) -> list:
        "The values of header `name` in every recorded request (None where it was absent)."
        return [r.headers.get(name.lower()) for r in self.requests]


def _route(path: str) -> tuple[str, dict]:
    m = re.fullmatch(r'/gists/([^/]+)', path)
    if m: return 'gist', dict(gid=m[1])
    m = re.fullmatch(r'/gists/([^/]+)/([^/]+)', path)
    if m: return 'revision', dict(gid=m[1], sha=m[2])
    m = re.fullmatch(r'/raw/([^/]+)/([^/]+)/(.+)', path)
    if m: return 'raw', dict(gid=m[1], sha=m[2], name=unquote(m[3]))
    return 'unknown', {}


class Handler(BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'
    server_version = 'StandInGitHub/1.0'
    state: GistState  # set on the subclass made by GistServer

    def log_message(self, *args): pass  # quiet

    def _send(self, status: int, payload=None, headers: dict | None = None, body: bytes | None = None, ctype='application/json; charset=utf-8'):
        if body is None: body = b'' if payload is None else json.dumps(payload).encode()
        self._rec.status = status  # before the answer leaves: the client may look at the record as soon as it has it
        self.send_response(status)
        self.send_header('Content-Type', ctype)
        hs = {'X-RateLimit-Limit': '60', 'X-RateLimit-Remaining': '59', 'X-RateLimit-Reset': str(int(time.time()) + 3600)}
        for k, v in {**hs, **(headers or {})}.items(): self.send_header(k, str(v))
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str, headers: dict | None = None):
        self._send(status, {'message': message, 'documentation_url': 'https://docs.github.com/rest/gists'}, headers)

    def do_GET(self):
        url = urlparse(self.path)
        kind, params = _route(url.path)
        self._rec = Request(self.command, self.path, kind, {k.lower(): v for k, v in self.headers.items()})
        with self.state.lock: self.state.requests.append(self._rec)
        auth = self.headers.get('Authorization')
        if auth is not None and self.state.tokens is not None and not (auth.startswith('Bearer ') and auth[7:] in self.state.tokens):
            return self._error(401, 'Bad credentials')
        failure = self.state.take_failure(kind)
        if failure is not None:
            status, headers, body = failure
            if status == 0:  # a reset: close without answering
                self.close_connection = True
                self._rec.status = 0
                return
            if body is not None: return self._send(status, headers=headers, body=body)
            return self._error(status, f'Injected failure ({status}) for {kind}', headers)
        if kind == 'unknown': return self._error(404, 'Not Found')
        with self.state.lock:
            g = self.state.gists.get(params['gid'])
            rev = g.at(params.get('sha')) if g is not None else None
            if rev is None: return self._error(404, 'Not Found')
            if kind == 'raw':
                data = rev.files.get(params['name'])
                if data is None: return self._error(404, 'Not Found')
                return self._send(200, body=data, ctype='text/plain; charset=utf-8')
            self._send(200, self._gist_json(g, rev))

    def _gist_json(self, g: Gist, rev: Revision) -> dict:
        base = f'http://{self.headers["Host"]}'
        files = {}
        for name, data in sorted(rev.files.items()):
            try: text = data.decode('utf-8')
            except UnicodeDecodeError: text = None
            big = len(data) > self.state.truncate_over
            trunc = big or name in g.truncated or text is None
            entry = {'filename': name, 'type': 'application/json' if name.endswith('.json') else 'text/plain',
                     'language': 'Python' if name.endswith('.py') else 'JSON' if name.endswith('.json') else None,
                     'raw_url': f'{base}/raw/{g.gist_id}/{rev.version}/{quote(name)}', 'size': len(data), 'truncated': trunc}
            if text is not None:  # GitHub's truncated content is a prefix; the stand-in's is half the file, or the first MiB
                entry['content'] = text[:self.state.truncate_over] if big else text[:len(text) // 2] if trunc else text
            files[name] = entry
        owner = None if g.owner is None else {'login': g.owner, 'id': 1, 'type': 'User',
                                              'html_url': f'https://github.com/{g.owner}'}
        html = f'https://gist.github.com/{g.owner + "/" if g.owner else ""}{g.gist_id}'
        return {'url': f'{base}/gists/{g.gist_id}', 'id': g.gist_id, 'html_url': html, 'files': files,
                'public': g.public, 'created_at': g.history[-1].committed_at, 'updated_at': g.history[0].committed_at,
                'description': g.description, 'comments': 0, 'owner': owner, 'truncated': False,
                'history': [{'user': owner, 'version': r.version, 'committed_at': r.committed_at,
                             'url': f'{base}/gists/{g.gist_id}/{r.version}'} for r in g.history]}


class GistServer:
    "Start a stand-in gist API on 127.0.0.1 (a free port) in a thread; use as a context manager. `api` is the client's base URL."
    def __init__(self, tokens=None, truncate_over: int = 1 << 20):
        self.state = GistState(tokens, truncate_over)
        handler = type('BoundHandler', (Handler,), {'state': self.state})
        self.httpd = ThreadingHTTPServer(('127.0.0.1', 0), handler)
        self.httpd.daemon_threads = True
        self.url = f'http://127.0.0.1:{self.httpd.server_address[1]}'
        self.api = f'{self.url}/gists'
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    # the state's methods, on the server for short test code
    def add_gist(self, *a, **kw) -> str: return self.state.add_gist(*a, **kw)
    def update_gist(self, *a, **kw) -> str: return self.state.update_gist(*a, **kw)
    def delete_gist(self, gist_id: str): self.state.delete_gist(gist_id)
    def fail(self, *a, **kw): self.state.fail(*a, **kw)
    def rate_limit(self, *a, **kw): self.state.rate_limit(*a, **kw)
    @property
    def requests(self) -> list[Request]: return self.state.requests

    def start(self) -> 'GistServer':
        self.thread.start()
        return self

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self): return self.start()
    def __exit__(self, *exc): self.stop()


if __name__ == '__main__':
    import sys
    folders = sys.argv[1:] or [str(p) for p in sorted((FIXTURES / 'tb_exports').iterdir())] + [str(FIXTURES / 'gist_gpt')]
    with GistServer(tokens={'ghp_test_token'}) as srv:
        for f in folders: print(f'{srv.add_gist(f)}  {f}')
        print(f'stand-in gist API at {srv.api} (token ghp_test_token optional); '
              f'NBTRAIN_GIST_API={srv.api}; Ctrl-C to stop', flush=True)
        try:
            while True: time.sleep(3600)
        except KeyboardInterrupt: pass
