"""The serving bundle as a user runs it: `python serve.py` in its own process on 127.0.0.1, spoken to over HTTP.

The ONNX bundle runs with torch made unimportable, which proves it needs only numpy and onnxruntime. Its answers
are compared with the PyTorch model in this process; bad requests must get clear 4xx errors.
"""
import json, os, re, signal, subprocess, sys, time, urllib.error, urllib.request
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
    def __init__(self, folder: Path, argv: list[str]):
        self.proc = subprocess.Popen([sys.executable, *argv, '--port', '0', '--quiet'], cwd=folder, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env={**os.environ, 'PYTHONUNBUFFERED': '1'})
        line = self.proc.stdout.readline()  # 'serving GPT (onnx) on http://127.0.0.1:PORT'
        m = re.search(r'http://127\.0\.0\.1:(\d+)', line)
        assert m, f"no address in {line!r}; stderr: {self.proc.stderr.read() if self.proc.poll() is not None else ''}"
        self.url = f'http://127.0.0.1:{m[1]}'

    def wait_ready(self, timeout: float = 90):
        t0 = time.time()
        while time.time() - t0 < timeout:
            assert self.proc.poll() is None, self.proc.stderr.read()
            status, body = self.get('/ready')
            if status == 200: return body
            assert status == 503 and body['ready'] is False and not body['error'].startswith(('RuntimeError', 'ModuleNotFound'))
            time.sleep(0.1)
        raise TimeoutError(f'{self.url} not ready after {timeout} s')

    def request(self, method: str, path: str, body=None, headers=None):
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={'Content-Type': 'application/json', **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=30) as r: return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e: return e.code, json.loads(e.read())

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
