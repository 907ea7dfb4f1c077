"""The serving bundle as a user runs it: `python serve.py` in its own process on 127.0.0.1, spoken to over HTTP.

The ONNX bundle runs with torch made unimportable, which proves it needs only numpy and onnxruntime. Its answers
are compared with the PyTorch model in this process; bad requests must get clear 4xx errors.
"""
import http.client, json, os, re, shutil, signal, socket, subprocess, sys, threading, time, urllib.error, urllib.request
from pathlib import Path
import numpy as np
import pytest
import torch

from nbtrain.export import export_run, make_bundle
from nbtrain.hub import load_final

QUICK = {'train.max_steps': 6, 'train.eval_every': 3, 'train.log_every': 2, 'train.micro_batch_size': 4, 'train.eval_batches': 2,
         'train.progress_bar': False, 'data.corpus_size': 60, 'data.seq_len': 32}
NO_TORCH = "import runpy, sys; sys.modules['torch'] = None; sys.argv = ['serve.py', *sys.argv[1:]]; runpy.run_path('serve.py', run_name='__main__')"


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
    from nbtrain.trainer import train
    run = train(overrides={**QUICK, 'output_dir': str(tmp_path_factory.mktemp('runs')), 'name': 'tiny'}).run_dir
    rep = export_run(run, 'torchscript,onnx', bundle=True, exporter='torchscript', log=None)
    return run, rep


class Server:
    "serve.py started in a real process on a free port; stopped with SIGTERM."
    def __init__(self, folder: Path, argv: list[str], env: dict | None = None):
        self.proc = subprocess.Popen([sys.executable, *argv, '--port', '0', '--quiet'], cwd=folder, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env={**os.environ, 'PYTHONUNBUFFERED': '1', **(env or {})})
        line = self.proc.stdout.readline()  # 'serving GPT (onnx) on http://127.0.0.1:PORT'
        m = re.search(r'http://127\.0\.0\.1:(\d+)', line)
        assert m, f"no address in {line!r}; stderr: {self.proc.stderr.read() if self.proc.poll() is not None else ''}"
        self.url, self.port = f'http://127.0.0.1:{m[1]}', int(m[1])

    def wait_ready(self, timeout: float = 90):
        t0 = time.time()
        while time.time() - t0 < timeout:
            assert self.proc.poll() is None, self.proc.stderr.read()
            status, body = self.get('/ready')
            if status == 200: return body
            assert status == 503 and body['ready'] is False and not body['error'].startswith(('RuntimeError', 'ModuleNotFound'))
            time.sleep(0.1)
        raise TimeoutError(f'{self.url} not ready after {timeout} s')

    def request(self, method: str, path: str, body=None, headers=None, with_headers=False):
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={'Content-Type': 'application/json', **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=30) as r: out = r.status, json.loads(r.read()), r.headers
        except urllib.error.HTTPError as e: out = e.code, (json.loads(raw) if (raw := e.read()) else None), e.headers
        return out if with_headers else out[:2]

    def get(self, path): return self.request('GET', path)
    def post(self, body, path='/predict', **kw): return self.request('POST', path, body, **kw)

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try: self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired: self.proc.kill(); self.proc.wait()
        for f in (self.proc.stdout, self.proc.stderr): f.close()


def test_bundle_contents(exported):
    run, rep = exported
    b = rep.bundle
    assert sorted(p.name for p in b.iterdir()) == ['Dockerfile', 'README.md', 'metadata.json', 'model.onnx', 'requirements.txt',
                                                  'serve.py', 'tokenizer.json']
    req = (b/'requirements.txt').read_text()
    assert 'onnxruntime==' in req and 'numpy==' in req and 'torch' not in req
    docker = (b/'Dockerfile').read_text()
    assert docker.startswith('FROM python:') and 'CMD ["python", "serve.py", "--quiet"]' in docker and 'HEALTHCHECK' in docker
    readme = (b/'README.md').read_text()
    assert 'curl -s -X POST localhost:8000/predict' in readme and 'docker run' in readme
    assert not re.search(r'^\s*(import|from)\s+nbtrain', (b/'serve.py').read_text(), re.M)  # serve.py needs no nbtrain
    import nbtrain.serve
    assert (b/'serve.py').read_bytes() == Path(nbtrain.serve.__file__).read_bytes()  # the module itself, copied
    assert 'ENV HOST=0.0.0.0' in docker and "os.environ.get('NBTRAIN_API_KEY', '')" in docker  # the health check sends the key
    assert 'Warning: without an API key, anyone who can reach the port can use the model' in readme


def test_onnx_server_answers_like_pytorch_and_refuses_bad_input(exported):
    run, rep = exported
    fm = load_final(run)
    srv = Server(rep.bundle, ['-c', NO_TORCH])  # torch cannot even be imported in this server
    try:
        assert srv.get('/health') == (200, {'status': 'ok'})
        ready = srv.wait_ready()
        assert ready['runtime'] == 'onnx' and ready['device'] == 'cpu'

        texts = ['Once upon a time', 'The dog']
        status, out = srv.post({'text': texts, 'return_logits': True, 'top_k': 3})
        assert status == 200, out
        for b, t in enumerate(texts):
            ids = fm.tokenizer.encode(t)
            with torch.no_grad(): want = fm.module(torch.tensor([ids])).logits[0].numpy()
            got = np.array(out['logits'][b])[:len(ids)]
            assert np.abs(got - want).max() < 1e-4
            p = out['predictions'][b]
            assert p['next_token_id'] == int(want[-1].argmax()) and p['next_token'] == fm.tokenizer.decode([p['next_token_id']])
            assert len(p['top_k']) == 3 and p['top_k'][0]['id'] == p['next_token_id']
        status, out2 = srv.post({'input_ids': [fm.tokenizer.encode('Once upon a time')]})
        assert status == 200 and out2['predictions'][0]['next_token_id'] == out['predictions'][0]['next_token_id']
        assert 'logits' not in out2 and out2['elapsed_ms'] >= 0

        vocab = json.loads((rep.bundle/'metadata.json').read_text())['vocab_size']
        bad = [(b'{"input_ids": [[1, 2', 400, None, 'not valid JSON'),
               ({'input_ids': [[1, 2, vocab + 5]]}, 400, 'input_ids', f'input_ids[0][2]={vocab + 5} is out of range'),
               ({'input_ids': [[1, 'a']]}, 400, 'input_ids', "input_ids[0][1]='a' is not a whole number"),
               ({'input_ids': [[1] * 500]}, 400, 'input_ids', 'the model takes at most 32'),
               ({'prompt': 'hi'}, 400, 'prompt', "unknown field 'prompt'"),
               ({'text': ''}, 400, 'text', 'has no tokens'),
               ({'text': 'hi', 'top_k': 99}, 400, 'top_k', 'top_k must be'),
               ([1, 2, 3], 400, None, 'must be a JSON object'),
               ({}, 400, 'input_ids', 'send text or input_ids')]
        for body, code, field, words in bad:
            status, err = srv.post(body)
            assert status == code and err.get('field') == field and words in err['error'], (body, status, err)
        assert srv.post({'text': 'hi'}, headers={'Content-Type': 'text/plain'})[0] == 415
        assert srv.post(b'{"text": "' + b'a' * (2 << 20) + b'"}')[0] == 413
        assert srv.get('/predict')[0] == 405
        assert srv.get('/nope')[0] == 404
        assert srv.post({'text': 'hi'}, path='/health')[0] == 405
        assert srv.get('/health')[0] == 200  # still serving after all that
    finally:
        srv.stop()
    assert srv.proc.returncode == 0  # SIGTERM stops it cleanly


def sse(port: int, body: dict, path: str = '/generate') -> tuple[int, dict, list]:
    "POST `body` and read the server-sent events of the answer: (status, headers, the JSON of each data line, [DONE] last)."
    c = http.client.HTTPConnection('127.0.0.1', port, timeout=60)
    c.request('POST', path, json.dumps(body).encode(), {'Content-Type': 'application/json'})
    r = c.getresponse()
    events, lines = [], r.read().decode().split('\n\n')
    c.close()
    for block in lines:
        for line in block.splitlines():
            if line.startswith('data: '): events.append('[DONE]' if line == 'data: [DONE]' else json.loads(line[6:]))
            elif line: events.append({'sse_line': line})
    return r.status, dict(r.getheaders()), events


def test_onnx_server_generates_like_nbtrain_generate(exported):
    "POST /generate on the ONNX bundle (no torch in the server): the text nbtrain.generate writes, whole or streamed."
    from nbtrain.generate import generate
    run, rep = exported
    srv = Server(rep.bundle, ['-c', NO_TORCH, '--max-new-tokens', '40'])
    try:
        srv.wait_ready()
        prompts = ['Once upon a time', 'The dog']
        status, out = srv.post({'text': prompts, 'max_new_tokens': 30, 'temperature': 0}, path='/generate')
        assert status == 200, out
        want = generate(run, prompts, max_new_tokens=30, temperature=0)
        assert [g['text'] for g in out['generations']] == want
        for g in out['generations']:
            assert g['finish_reason'] in ('length', 'eos') and g['prompt_tokens'] > 0 and out['elapsed_ms'] > 0
            assert g['finish_reason'] == 'eos' or len(g['token_ids']) == 30
        sampled = {'text': 'The dog', 'max_new_tokens': 25, 'temperature': 0.9, 'top_k': 20, 'top_p': 0.95, 'repetition_penalty': 1.1, 'seed': 4}
        a, b = srv.post(sampled, path='/generate')[1], srv.post(sampled, path='/generate')[1]
        assert a['generations'] == b['generations']
        status, out = srv.post({'text': 'Once upon a time', 'max_new_tokens': 30, 'temperature': 0, 'stop': want[0][3:6]}, path='/generate')
        assert out['generations'][0]['text'] == want[0][:want[0].find(want[0][3:6])] and out['generations'][0]['finish_reason'] == 'stop'
        assert srv.post({'text': '', 'max_new_tokens': 3}, path='/generate')[0] == 200  # an empty prompt starts a document

        status, headers, events = sse(srv.port, {'text': prompts, 'max_new_tokens': 30, 'temperature': 0, 'stream': True})
        assert status == 200 and headers['Content-Type'] == 'text/event-stream' and events[-1] == '[DONE]', events[-3:]
        for i, w in enumerate(want):
            mine = [e for e in events[:-1] if e['index'] == i]
            assert mine[-1]['done'] and mine[-1]['text'] == w
            assert ''.join(e.get('text', '') for e in mine[:-1]) == w  # the pieces add up to the text
            assert sum('token_id' in e for e in mine) == len(mine[-1]['token_ids'])

        vocab = json.loads((rep.bundle/'metadata.json').read_text())['vocab_size']
        bad = [({'text': 'a', 'max_new_tokens': 41}, 'max_new_tokens', 'give a whole number from 1 to 40'),
               ({'text': 'a', 'temperature': 'hot'}, 'temperature', 'temperature="hot" is not valid'),
               ({'text': 'a', 'top_p': 2}, 'top_p', 'top_p=2 is not valid'),
               ({'text': 'a', 'stop': ['x'] * 5}, 'stop', 'at most 4'),
               ({'text': 'a', 'seed': -1}, 'seed', 'seed=-1 is not valid'),
               ({'text': 'a', 'stream': 1}, 'stream', 'stream must be true or false'),
               ({'prompt': 'a'}, 'prompt', "unknown field 'prompt'"),
               ({'input_ids': [[1, vocab]]}, 'input_ids', f'input_ids[0][1]={vocab} is out of range'),
               ({}, 'input_ids', 'send text or input_ids')]
        for body, field, words in bad:
            status, err = srv.post(body, path='/generate')
            assert status == 400 and err.get('field') == field and words in err['error'], (body, status, err)
        assert srv.post({'text': ['a'] * 9}, path='/generate')[0] == 413
        assert srv.post({'text': 'a'}, path='/generate', headers={'Content-Type': 'text/plain'})[0] == 415
        assert srv.get('/generate')[0] == 405
        assert srv.get('/health')[0] == 200
    finally:
        srv.stop()
    assert srv.proc.returncode == 0


@pytest.mark.slow
def test_torchscript_bundle_serves_the_same(exported, tmp_path):
    run, rep = exported
    b = make_bundle(rep.out_dir, tmp_path/'ts', runtime='torchscript')
    assert 'torch==' in (b/'requirements.txt').read_text() and (b/'model.pt').is_file()
    fm = load_final(run)
    srv = Server(b, ['serve.py'])
    try:
        assert srv.wait_ready()['runtime'] == 'torchscript'
        status, out = srv.post({'text': 'Once upon a time', 'return_logits': True})
        assert status == 200
        with torch.no_grad(): want = fm.module(torch.tensor([fm.tokenizer.encode('Once upon a time')])).logits[0].numpy()
        assert np.abs(np.array(out['logits'][0]) - want).max() < 1e-4
    finally:
        srv.stop()


# ---- a server that holds ------------------------------------------------------------------------------------------

def raw(port: int, data: bytes, *, half_close: bool = False, timeout: float = 15) -> tuple[int, dict | None, dict]:
    "Send `data` as it is on a new connection; (status, JSON body, headers) of the answer, read until the server closes."
    s = socket.create_connection(('127.0.0.1', port), timeout=timeout)
    s.sendall(data)
    if half_close: s.shutdown(socket.SHUT_WR)
    buf = b''
    try:
        while chunk := s.recv(65536): buf += chunk
    finally: s.close()
    head, _, body = buf.partition(b'\r\n\r\n')
    lines = head.decode('latin-1').split('\r\n')
    headers = {k.strip().lower(): v.strip() for k, v in (l.split(':', 1) for l in lines[1:] if ':' in l)}
    return int(lines[0].split()[1]), (json.loads(body) if body else None), headers


def post(port: int, body: bytes = b'', headers: str = '', **kw):
    return raw(port, b'POST /predict HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nConnection: close\r\n'
               + headers.encode() + b'\r\n' + body, **kw)


def chunked(data: bytes, size: int = 1000) -> bytes:
    return b''.join(b'%x\r\n%s\r\n' % (len(data[i:i + size]), data[i:i + size]) for i in range(0, len(data), size)) + b'0\r\n\r\n'


GOOD = b'{"input_ids": [[1, 2, 3, 4]]}'


@pytest.fixture(scope='module')
def quick_server(exported):
    "The ONNX bundle served with a 1 s deadline to receive a request."
    srv = Server(exported[1].bundle, ['serve.py', '--timeout', '1'])
    srv.wait_ready()
    yield srv
    srv.stop()


def test_200_concurrent_requests_all_answered(exported):
    srv = Server(exported[1].bundle, ['serve.py'])
    try:
        srv.wait_ready()
        n, start, lat, errors = 200, threading.Barrier(200, timeout=60), [], []
        def client():
            try:
                start.wait()
                t0 = time.perf_counter()
                c = http.client.HTTPConnection('127.0.0.1', srv.port, timeout=60)
                c.request('POST', '/predict', GOOD, {'Content-Type': 'application/json'})
                r = c.getresponse()
                body = r.read()
                c.close()
                if r.status != 200: errors.append((r.status, body[:200]))
                else: lat.append(time.perf_counter() - t0)
            except Exception as e: errors.append(repr(e))
        threads = [threading.Thread(target=client) for _ in range(n)]
        t0 = time.perf_counter()
        for t in threads: t.start()
        for t in threads: t.join(90)
        wall = time.perf_counter() - t0
        assert errors == [] and len(lat) == n, errors[:5]
        lat.sort()
        p50, p99 = lat[n // 2] * 1000, lat[int(n * 0.99) - 1] * 1000
        print(f'\n{n} concurrent POST /predict: 0 errors, p50 {p50:.1f} ms, p99 {p99:.1f} ms, {n / wall:.0f} requests/s')
        assert srv.get('/health') == (200, {'status': 'ok'})
    finally:
        srv.stop()


def test_stalled_clients_are_closed_and_predict_still_answers(quick_server):
    srv = quick_server
    stalled = []
    for i in range(20):  # half stall in the body, half in the headers
        s = socket.create_connection(('127.0.0.1', srv.port), timeout=10)
        s.sendall(b'POST /predict HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{"inp'
                  if i % 2 else b'POST /predict HTTP/1.1\r\nHost: t\r\nContent-Le')
        stalled.append(s)
    t0 = time.monotonic()
    status, out, _ = post(srv.port, GOOD, f'Content-Length: {len(GOOD)}\r\n')  # answered while they hang
    assert status == 200 and out['predictions'], out
    closed = []
    for i, s in enumerate(stalled):
        buf = b''
        try:
            while chunk := s.recv(65536): buf += chunk
        except ConnectionResetError: pass
        closed.append(time.monotonic() - t0)
        s.close()
        if i % 2: assert buf.startswith(b'HTTP/1.1 408 ') and b'did not arrive within 1 s' in buf, buf[:300]
    assert max(closed) < 4, closed  # a 1 s deadline, checked every 0.25 s
    assert post(srv.port, GOOD, f'Content-Length: {len(GOOD)}\r\n')[0] == 200


def test_body_limits_cannot_be_bypassed(quick_server):
    port = quick_server.port
    big = b'{"text": "' + b'a' * (1 << 20) + b'"}'
    cases = [  # (headers, body, half close, status, words)
        ('Content-Length: -5\r\n', GOOD, False, 400, "Content-Length '-5' is not a whole number"),
        ('Content-Length: abc\r\n', GOOD, False, 400, "Content-Length 'abc' is not a whole number"),
        ('Content-Length: +29\r\n', GOOD, False, 400, 'is not a whole number'),
        ('Content-Length: 29\r\nContent-Length: 30\r\n', GOOD, False, 400, 'different Content-Length headers'),
        ('Content-Length: 5000\r\n', GOOD, True, 400, 'the body ended after 29 of the 5000 bytes'),  # lying: longer
        ('Content-Length: 5\r\n', GOOD, False, 400, 'not valid JSON'),                               # lying: shorter
        ('', GOOD, False, 411, 'a Content-Length header is required'),                                # missing, with a body
        (f'Content-Length: {len(big)}\r\n', big, False, 413, 'over the limit of 1048576 bytes'),
        ('Transfer-Encoding: chunked\r\n', chunked(big, 1 << 16), False, 413, 'chunked body is over the limit'),
        ('Transfer-Encoding: chunked\r\n', b'zz\r\nhello\r\n0\r\n\r\n', False, 400, "chunk size 'zz' is not a hexadecimal number"),
        ('Transfer-Encoding: chunked\r\nContent-Length: 29\r\n', chunked(GOOD), False, 400, 'not both'),
        ('Transfer-Encoding: gzip\r\n', GOOD, False, 501, "Transfer-Encoding 'gzip' is not supported"),
        ('Content-Length: 100000\r\n', b'[' * 100_000, False, 400, 'nests 100000 levels deep; at most 32'),
        ('Transfer-Encoding: chunked\r\n', chunked(b'[' * 100_000), False, 400, 'nests 100000 levels deep'),
    ]
    for headers, body, half, code, words in cases:
        status, out, h = post(port, body, headers, half_close=half)
        assert status == code and words in out['error'], (headers, status, out)
        assert h['content-type'] == 'application/json'
    status, out, _ = post(port, chunked(GOOD, 7), 'Transfer-Encoding: chunked\r\n')  # a chunked body within the limit is read
    assert status == 200 and out['predictions'], out
    assert quick_server.get('/health')[0] == 200


def test_every_status_is_json_without_paths(exported, quick_server, tmp_path):
    srv, bundle = quick_server, exported[1].bundle
    for method in ('HEAD', 'PUT', 'DELETE', 'PATCH', 'OPTIONS', 'TRACE', 'BREW'):
        for path, allowed in (('/predict', 'POST'), ('/health', 'GET'), ('/ready', 'GET')):
            status, out, h = raw(srv.port, f'{method} {path} HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n'.encode())
            assert status == 405 and h['allow'] == allowed and h['content-type'] == 'application/json', (method, path, status)
            if method != 'HEAD': assert out['error'] == f'{method} is not allowed on {path}: use {allowed} {path}'
    status, out, h = srv.request('DELETE', '/nowhere', with_headers=True)
    assert status == 404 and 'no endpoint /nowhere' in out['error'] and h['Content-Type'] == 'application/json'
    assert raw(srv.port, b'GARBAGE\r\n\r\n')[0] == 400  # the standard library's own refusals are JSON too
    status, out, _ = raw(srv.port, b'GET /' + b'a' * 70000 + b' HTTP/1.1\r\n\r\n')
    assert status == 414 and 'error' in out
    status, ready = srv.get('/ready')
    assert status == 200 and str(bundle) not in json.dumps(ready) and '/' not in json.dumps(ready)

    broken = tmp_path/'broken'  # a bundle whose model cannot load: /ready says why, without a path
    shutil.copytree(bundle, broken)
    (broken/'model.onnx').write_bytes(b'not a model')
    bad = Server(broken, ['serve.py'])
    try:
        for _ in range(100):
            status, out = bad.get('/ready')
            if out.get('error') != 'loading the model': break
            time.sleep(0.1)
        assert status == 503 and out['error'] and str(broken) not in out['error'] and str(tmp_path) not in out['error'], out
        status, out, h = bad.request('POST', '/predict', GOOD, with_headers=True)
        assert status == 503 and str(tmp_path) not in out['error'] and h['Retry-After'] == '1'
    finally: bad.stop()


def test_api_key(exported):
    srv = Server(exported[1].bundle, ['serve.py'], env={'NBTRAIN_API_KEY': 'k3y-' + 'x' * 30})
    try:
        assert srv.get('/health') == (200, {'status': 'ok'})  # open: a load balancer probes it
        for headers in ({}, {'Authorization': 'Bearer wrong'}, {'X-API-Key': 'k3y'}, {'Authorization': 'k3y-' + 'x' * 30}):
            status, out, h = srv.request('GET', '/ready', headers=headers, with_headers=True)
            assert status == 401 and 'needs an API key' in out['error'] and h['WWW-Authenticate'] == 'Bearer', headers
            assert srv.post({'input_ids': [[1, 2]]}, headers=headers)[0] == 401
            assert srv.post({'input_ids': [[1, 2]]}, path='/generate', headers=headers)[0] == 401
            assert srv.get('/nowhere')[0] == 401  # nothing about the endpoints without the key
        for headers in ({'Authorization': 'Bearer k3y-' + 'x' * 30}, {'X-API-Key': 'k3y-' + 'x' * 30}):
            assert srv.request('GET', '/ready', headers=headers)[0] in (200, 503)
        srv.wait_ready = lambda: None
        t0 = time.time()
        while srv.request('GET', '/ready', headers={'X-API-Key': 'k3y-' + 'x' * 30})[0] != 200 and time.time() - t0 < 60: time.sleep(0.1)
        status, out = srv.post({'input_ids': [[1, 2]]}, headers={'Authorization': 'Bearer k3y-' + 'x' * 30})
        assert status == 200 and out['predictions']
        status, out = srv.post({'input_ids': [[1, 2]], 'max_new_tokens': 2}, path='/generate', headers={'X-API-Key': 'k3y-' + 'x' * 30})
        assert status == 200 and len(out['generations'][0]['token_ids']) <= 2
    finally:
        srv.stop()


def test_connections_over_the_cap_get_503(exported):
    srv = Server(exported[1].bundle, ['serve.py', '--max-connections', '3'])
    try:
        srv.wait_ready()
        for attempt in range(5):  # a connection of wait_ready may still be closing on a busy machine: then try again
            time.sleep(0.3 * (attempt + 1))
            held = [socket.create_connection(('127.0.0.1', srv.port), timeout=10) for _ in range(3)]
            for s in held: s.sendall(b'GET /health HTTP/1.1\r\n')  # started, not finished
            time.sleep(0.3)
            status, out, h = raw(srv.port, b'GET /health HTTP/1.1\r\nHost: t\r\n\r\n')
            for s in held: s.close()
            if status == 503: break
        assert status == 503 and h['retry-after'] == '1' and 'connections open, its limit' in out['error'], out
        assert h['content-type'] == 'application/json'
        time.sleep(0.3)
        assert srv.get('/health') == (200, {'status': 'ok'})
    finally:
        srv.stop()
