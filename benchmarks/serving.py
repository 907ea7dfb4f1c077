"""Throughput and latency of a serving bundle's server (`serve.py`, which is `nbtrain.serve`) under 1, 16 and 128 clients.

Each client is a thread holding one kept-alive HTTP/1.1 connection and sending `POST /predict` in a loop for
`--seconds`; the server runs as its own process on 127.0.0.1, as a user runs it. Measured in the same run, on the
same machine, with the same clients:
- the baseline: the standard library's bare `ThreadingHTTPServer` (with serve.py's listen backlog) reading the body
  and answering a fixed JSON (no validation, no model, no limits): what HTTP in Python costs by itself;
- a direct in-process call of the bundle's request path (`parse_request`, the model, `make_response`), no HTTP:
  what the model and the request handling cost by themselves.

Prints, per number of clients: requests/s, p50 and p99 latency, errors (any status but 200 or a connection error)
and the requests/s as a ratio of the bare server's. The clients share the CPUs with the server, so on a small
machine the numbers at 128 clients are the machine's, not the server's limit.

    python benchmarks/serving.py [--bundle DIR] [--clients 1,16,128] [--seconds 3]

Without --bundle it trains a tiny model (a few seconds) and exports its ONNX bundle into a temporary folder.
"""
import argparse, http.client, json, os, re, subprocess, sys, tempfile, textwrap, threading, time
from pathlib import Path

BODY = b'{"input_ids": [[5, 17, 3, 9, 12, 4, 8, 1]], "top_k": 3}'

BARE = textwrap.dedent('''
    import json, sys
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    ANSWER = json.dumps({'task': 'causal_lm', 'predictions': [{'next_token_id': 1, 'top_k': []}]}).encode()
    class H(BaseHTTPRequestHandler):
        protocol_version = 'HTTP/1.1'
        disable_nagle_algorithm = True
        def log_message(self, *a): pass
        def do_POST(self):
            self.rfile.read(int(self.headers['Content-Length']))
            self.send_response(200)
            self.send_header('Content-Type', 'application/json')
            self.send_header('Content-Length', str(len(ANSWER)))
            self.end_headers()
            self.wfile.write(ANSWER)
    class S(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 1024  # the backlog serve.py has: the default (5) resets connections in a burst
    s = S(('127.0.0.1', 0), H)
    print(f'serving on http://127.0.0.1:{s.server_address[1]}', flush=True)
    s.serve_forever()
''')


def make_bundle(root: Path) -> Path:
    import contextlib, io
    from nbtrain.trainer import train
    from nbtrain.export import export_run
    quick = {'train.max_steps': 6, 'train.eval_every': 3, 'train.log_every': 2, 'train.micro_batch_size': 4, 'train.eval_batches': 2,
             'train.progress_bar': False, 'data.corpus_size': 60, 'data.seq_len': 32}
    with contextlib.redirect_stdout(io.StringIO()):
        run = train(overrides={**quick, 'output_dir': str(root/'runs'), 'name': 'bench'}).run_dir
        return export_run(run, 'onnx', bundle=True, exporter='torchscript', log=None).bundle


def start(cmd: list[str], cwd) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, 'PYTHONUNBUFFERED': '1'})
    m = re.search(r'http://127\.0\.0\.1:(\d+)', proc.stdout.readline())
    if not m: proc.kill(); raise RuntimeError(f'{cmd} did not start')
    return proc, int(m[1])


def wait_ready(port: int, timeout: float = 60):
    t0 = time.time()
    while time.time() - t0 < timeout:
        c = http.client.HTTPConnection('127.0.0.1', port, timeout=5)
        try:
            c.request('GET', '/ready'); r = c.getresponse(); r.read()
            if r.status == 200: return
        except OSError: pass
        finally: c.close()
        time.sleep(0.1)
    raise TimeoutError(f'port {port} not ready')


def load(port: int, clients: int, seconds: float) -> dict:
    "`clients` threads, one kept-alive connection each, POSTing for `seconds`; requests/s, p50, p99 (ms), errors."
    lat, errors, go = [], [0], threading.Barrier(clients + 1)
    stop = [0.0]
    def client():
        mine, c = [], http.client.HTTPConnection('127.0.0.1', port, timeout=30)
        go.wait()
        while time.perf_counter() < stop[0]:
            t0 = time.perf_counter()
            try:
                c.request('POST', '/predict', BODY, {'Content-Type': 'application/json'})
                r = c.getresponse(); r.read()
                if r.status == 200: mine.append(time.perf_counter() - t0)
                else: errors[0] += 1
                if r.will_close: c.close(); c = http.client.HTTPConnection('127.0.0.1', port, timeout=30)
            except OSError:
                errors[0] += 1
                c.close(); c = http.client.HTTPConnection('127.0.0.1', port, timeout=30)
        c.close()
        lat.extend(mine)
    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads: t.start()
    stop[0] = time.perf_counter() + seconds
    t0 = time.perf_counter()
    go.wait()
    for t in threads: t.join(seconds + 60)
    wall = time.perf_counter() - t0
    lat.sort()
    q = lambda p: lat[min(len(lat) - 1, int(len(lat) * p))] * 1000 if lat else float('nan')
    return {'rps': len(lat) / wall, 'p50': q(0.50), 'p99': q(0.99), 'errors': errors[0], 'n': len(lat)}


def direct(bundle: Path, seconds: float) -> dict:
    "The bundle's request path called in this process, one at a time: requests/s and latency without HTTP."
    sys.path.insert(0, str(bundle))
    import importlib.util
    spec = importlib.util.spec_from_file_location('bundle_serve', bundle/'serve.py')
    srv = importlib.util.module_from_spec(spec); spec.loader.exec_module(srv)
    st = srv.State(str(bundle)).load('cpu')
    lat, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        req = srv.parse_request(BODY, st.meta, st.tokenizer)
        json.dumps(srv.make_response(st.model(req['inputs']), req, st.meta, st.tokenizer))
        lat.append(time.perf_counter() - t0)
    lat.sort()
    return {'rps': len(lat) / seconds, 'p50': lat[len(lat) // 2] * 1000, 'p99': lat[int(len(lat) * 0.99)] * 1000, 'errors': 0, 'n': len(lat)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--bundle', help='a serving bundle folder (default: build a tiny one)')
    ap.add_argument('--clients', default='1,16,128', help='numbers of concurrent clients, comma-separated')
    ap.add_argument('--seconds', type=float, default=3.0, help='seconds of load per row')
    a = ap.parse_args(argv)
    try: levels = [int(x) for x in a.clients.split(',')]
    except ValueError: ap.error(f'--clients={a.clients!r}: give whole numbers separated by commas, e.g. 1,16,128')
    if any(n < 1 for n in levels): ap.error(f'--clients={a.clients!r}: every number of clients must be 1 or more')
    tmp = tempfile.TemporaryDirectory()
    bundle = Path(a.bundle) if a.bundle else make_bundle(Path(tmp.name))
    if not (bundle/'serve.py').is_file(): ap.error(f'--bundle={a.bundle!r} has no serve.py: give a folder written by make_bundle')
    meta = json.loads((bundle/'metadata.json').read_text())
    print(f"{os.cpu_count()} CPUs, python {sys.version.split()[0]}; bundle: {meta['model'].get('class')} "
          f"({meta['bundle']['runtime']}), body {len(BODY)} bytes, {a.seconds:g} s per row")
    d = direct(bundle, a.seconds)
    print(f"direct call, no HTTP (1 at a time): {d['rps']:,.0f} requests/s, p50 {d['p50']:.2f} ms, p99 {d['p99']:.2f} ms\n")
    procs = {}
    try:
        procs['bare'] = start([sys.executable, '-c', BARE], bundle)
        procs['serve'] = start([sys.executable, 'serve.py', '--port', '0', '--quiet', '--max-connections', str(max(levels) + 64)], bundle)
        wait_ready(procs['serve'][1])
        print(f"{'clients':>7}  {'server':<24} {'requests/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}  {'vs bare':>7}")
        for n in levels:
            base = load(procs['bare'][1], n, a.seconds)
            got = load(procs['serve'][1], n, a.seconds)
            for name, r in (('bare http.server', base), ('nbtrain serve.py', got)):
                ratio = f"{r['rps'] / base['rps']:.2f}x" if base['rps'] else 'n/a'
                print(f"{n:>7}  {name:<24} {r['rps']:>10,.0f} {r['p50']:>8.2f} {r['p99']:>8.2f} {r['errors']:>6}  {ratio:>7}")
    finally:
        for proc, _ in procs.values():
            proc.terminate()
            try: proc.wait(10)
            except subprocess.TimeoutExpired: proc.kill()
        tmp.cleanup()
    return 0


if __name__ == '__main__':
    sys.exit(main())
