"""Fetching Transformer Builder exports with nbtrain's real gist client, against a stand-in gist API on 127.0.0.1.

The stand-in (tests/gistserver.py) answers in GitHub's shapes and records every request, so these tests check what
the client sends (the token, only to GitHub's hosts), what it writes (the files, byte for byte, and gist.json), how
it rides out rate limits, server errors and resets (with the waits recorded instead of slept), and that a fetch
that fails leaves no half folder behind.
"""
import hashlib, json, socket, sys, threading, time, types
from pathlib import Path
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from gistserver import GistServer

from nbtrain.errors import ModelLoadError
from nbtrain.gist import colab_url, fetch_gist, find_gist, gist_id, parse_gist, show_code
from nbtrain.loading import load_model

FIXTURES = Path(__file__).parent / 'fixtures'
EXPORTS = FIXTURES / 'tb_exports'
TOKEN = 'ghp_TestToken9f8e7d6c5b4a3210fedcba'
LINK = 'https://colab.research.google.com/github/nbtrain/nbtrain/blob/main/template.ipynb'


@pytest.fixture
def srv(monkeypatch):
    for k in ('GITHUB_TOKEN', 'GH_TOKEN', 'NBTRAIN_GIST_ID', 'NBTRAIN_MODEL_NAME', 'NBTRAIN_GIST_REVISION'):
        monkeypatch.delenv(k, raising=False)
    with GistServer() as s:
        monkeypatch.setenv('NBTRAIN_GIST_API', s.api)
        yield s


class Waits(list):
    "A sleep function that records how long it was asked to wait."
    def __call__(self, s): self.append(s)


def record(folder) -> dict: return json.loads((Path(folder) / 'gist.json').read_text())


def all_bytes(folder) -> bytes: return b''.join(p.read_bytes() for p in sorted(Path(folder).rglob('*')) if p.is_file())


# ---- the export shapes

SHAPES = {  # fixture folder -> (class to build, max length, vocabulary size)
    'tb_exports/flat_lm': ('TransformerModel', 32, 128),
    'tb_exports/graph_lm': ('GeneratedModel', 64, 100),
    'tb_exports/two_models': ('MoELM', 48, 64),
    'tb_exports/moe_lm': ('MoETransformer', 40, 80),
    'gist_gpt': ('TransformerModel', 64, 96),
}


@pytest.mark.parametrize('fixture', list(SHAPES))
def test_fetch_each_export_shape(srv, tmp_path, fixture):
    src = FIXTURES / fixture
    gid = srv.add_gist(src)
    folder = fetch_gist(f'https://gist.github.com/builder-user/{gid}', tmp_path)
    assert folder == tmp_path / gid
    sent = sorted(p.name for p in src.iterdir() if p.suffix in ('.py', '.json'))
    assert sorted(p.name for p in folder.iterdir()) == sorted(sent + ['gist.json'])
    for name in sent: assert (folder / name).read_bytes() == (src / name).read_bytes(), name
    rec = record(folder)
    assert rec['id'] == gid and rec['owner'] == 'builder-user' and rec['url'] == f'https://gist.github.com/builder-user/{gid}'
    assert rec['revision'] == srv.state.gists[gid].history[0].version
    assert rec['files'] == {n: {'sha256': hashlib.sha256((src / n).read_bytes()).hexdigest(), 'size': (src / n).stat().st_size}
                            for n in sent}
    assert rec['fetched_at'].endswith('Z') and rec['description']
    cls, max_len, vocab = SHAPES[fixture]
    model = load_model(folder, trust_code=True, **({'class_name': cls} if fixture.endswith('two_models') else {}))
    assert type(model).__name__ == cls
    ids = torch.randint(0, vocab, (2, max_len))
    out = model(ids)
    logits = out[0] if isinstance(out, tuple) else out
    assert logits.shape == (2, max_len, vocab)
    if isinstance(out, tuple): assert out[1].ndim == 0 and torch.isfinite(out[1])  # (logits, aux_loss)


def test_export_fixtures_are_what_they_say():
    flat = json.loads((EXPORTS / 'flat_lm/config.json').read_text())
    assert 'nodes' not in flat and flat['max_seq_len'] == 32 and flat['model_name']
    graph = json.loads((EXPORTS / 'graph_lm/config.json').read_text())
    assert {n['type'] for n in graph['nodes']} >= {'embedding', 'positional'} and graph['edges']
    assert next(n for n in graph['nodes'] if n['type'] == 'positional')['params']['max_len'] == 64
    m = load_model(EXPORTS / 'graph_lm', trust_code=True)
    assert isinstance(m.positional_2, torch.nn.Parameter) and tuple(m.positional_2.shape) == (1, 64, 48)
    assert json.loads((EXPORTS / 'two_models/config.json').read_text())['model_name'] == 'MoELM'
    dense = load_model(EXPORTS / 'two_models', trust_code=True, class_name='DenseLM')
    assert isinstance(dense(torch.zeros(1, 4, dtype=torch.long)), torch.Tensor)


def test_truncated_and_big_files_come_from_raw_url(monkeypatch, tmp_path):
    monkeypatch.delenv('GITHUB_TOKEN', raising=False); monkeypatch.delenv('GH_TOKEN', raising=False)
    with GistServer(truncate_over=1000) as s:  # model.py is over 1000 bytes: truncated content, like a big file on GitHub
        gid = s.add_gist(FIXTURES / 'gist_gpt', truncated={'config.json'})
        folder = fetch_gist(gid, tmp_path, api=s.api)
        assert sorted(r.path.rsplit('/', 1)[-1] for r in s.requests if r.kind == 'raw') == ['config.json', 'model.py']
    for n in ('model.py', 'config.json'): assert (folder / n).read_bytes() == (FIXTURES / 'gist_gpt' / n).read_bytes()


def test_pinned_revision_returns_old_files(srv, tmp_path):
    gid = srv.add_gist(EXPORTS / 'flat_lm')
    first = record(fetch_gist(gid, tmp_path / 'a'))['revision']
    second = srv.update_gist(gid, {'config.json': '{"model_name": "changed"}', 'extra.py': 'X = 1\n'})
    new = fetch_gist(gid, tmp_path / 'b')
    assert record(new)['revision'] == second and (new / 'config.json').read_text() == '{"model_name": "changed"}'
    assert (new / 'extra.py').is_file()
    for old in (fetch_gist(gid, tmp_path / 'c', revision=first), fetch_gist(f'https://gist.github.com/builder-user/{gid}/{first}', tmp_path / 'd')):
        assert record(old)['revision'] == first
        assert (old / 'config.json').read_bytes() == (EXPORTS / 'flat_lm/config.json').read_bytes()
        assert not (old / 'extra.py').exists()
    assert srv.requests[-1].path == f'/gists/{gid}/{first}'
    with pytest.raises(ModelLoadError, match='HTTP 404'): fetch_gist(gid, tmp_path, revision='ab' * 20)
    with pytest.raises(ModelLoadError, match='is not a commit sha'): fetch_gist(gid, tmp_path, revision='main')


# ---- retries and the errors that remain

def test_429_then_success_is_retried(srv, tmp_path):
    gid = srv.add_gist(EXPORTS / 'flat_lm')
    srv.fail('gist', 1, 429, {'Retry-After': '3'})
    srv.fail('gist', 2, 502)
    waits = Waits()
    folder = fetch_gist(gid, tmp_path, sleep=waits, backoff=0.5)
    assert waits == [3.0, 1.0, 2.0]  # Retry-After, then exponential backoff from the attempt's number
    assert [r.status for r in srv.requests] == [429, 502, 502, 200]
    assert (folder / 'model.py').is_file()


def test_rate_limit_waits_are_capped_and_far_resets_fail_at_once(srv, tmp_path):
    gid = srv.add_gist(EXPORTS / 'flat_lm')
    srv.fail('gist', 1, 403, {'Retry-After': '600'})  # a secondary rate limit asking for longer than the cap: capped
    srv.fail('gist', 1, 503, {'Retry-After': '500'})
    waits = Waits()
    fetch_gist(gid, tmp_path, sleep=waits, max_wait=60)
    assert waits == [60, 60]
    srv.rate_limit(1, reset_in=3600)
    waits.clear()
    t = time.time()
    with pytest.raises(ModelLoadError, match=r"rate limit .*asks to wait longer.*resets at \d\d:\d\d UTC.*GITHUB_TOKEN"):
        fetch_gist(gid, tmp_path, sleep=waits)
    assert waits == [] and time.time() - t < 5


def test_persistent_rate_limit_gives_the_clear_error(srv, tmp_path):
    gid = srv.add_gist(EXPORTS / 'flat_lm')
    srv.rate_limit(100, reset_in=2)
    waits = Waits()
    with pytest.raises(ModelLoadError) as e: fetch_gist(gid, tmp_path, sleep=waits, retries=3)
    msg = str(e.value)
    assert "GitHub's rate limit refused" in msg and 'after 3 retries' in msg and 'set GITHUB_TOKEN' in msg and 'by hand' in msg
    assert len(waits) == 3 and all(0 <= w <= 60 for w in waits)
    assert len(srv.requests) == 4
    assert not (tmp_path / gid).exists()


def test_forbidden_without_rate_limit_is_not_retried(srv, tmp_path):
    gid = srv.add_gist(EXPORTS / 'flat_lm')
    srv.fail('gist', 5, 403, body=b'{"message": "Resource not accessible"}')
    with pytest.raises(ModelLoadError, match='HTTP 403.*GitHub says: Resource not accessible'): fetch_gist(gid, tmp_path, sleep=Waits())
    assert len(srv.requests) == 1


def test_server_errors_after_retries(srv, tmp_path):
    gid = srv.add_gist(EXPORTS / 'flat_lm')
    srv.fail('gist', 10, 500)
    waits = Waits()
    with pytest.raises(ModelLoadError, match='HTTP 500 .*after retries.*try again'): fetch_gist(gid, tmp_path, sleep=waits, retries=2, backoff=1)
    assert waits == [1, 2]


def test_connection_reset_is_retried(srv, tmp_path):
    gid = srv.add_gist(EXPORTS / 'flat_lm')
    srv.fail('gist', 1, 0)  # the server drops the connection without an answer
    waits = Waits()
    assert (fetch_gist(gid, tmp_path, sleep=waits) / 'model.py').is_file()
    assert len(waits) == 1


def test_404_and_deleted_gists(srv, tmp_path):
    with pytest.raises(ModelLoadError, match=r"HTTP 404.*check the gist ID 'fff000'.*secret gists work.*deleted ones do not"):
        fetch_gist('fff000', tmp_path)
    gid = srv.add_gist(EXPORTS / 'flat_lm')
    srv.delete_gist(gid)
    with pytest.raises(ModelLoadError, match='HTTP 404'): fetch_gist(gid, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_missing_required_file_lists_what_the_gist_has(srv, tmp_path):
    gid = srv.add_gist({'model.py': 'import torch\n', 'README.md': '# hi\n'})
    with pytest.raises(ModelLoadError, match=r'has no config.json \(it has README.md, model.py\)'): fetch_gist(gid, tmp_path)
    gid = srv.add_gist({'notes.txt': 'x'})
    with pytest.raises(ModelLoadError, match=r'has no model.py or config.json \(it has notes.txt\)'): fetch_gist(gid, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_not_utf8_and_not_json(srv, tmp_path):
    gid = srv.add_gist({'model.py': 'x = "caf\xe9"\n'.encode('latin-1'), 'config.json': '{}'})
    with pytest.raises(ModelLoadError, match=r'model.py is not UTF-8 text \(byte 8'): fetch_gist(gid, tmp_path)
    gid = srv.add_gist(EXPORTS / 'flat_lm')
    srv.fail('gist', 1, 200, body=b'<html><body>Sign in to the hotel wifi</body></html>')
    with pytest.raises(ModelLoadError, match=r"not JSON \('<html><body>Sign in.*captive portal"): fetch_gist(gid, tmp_path)
    assert list(tmp_path.iterdir()) == []


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_no_network(srv, tmp_path):
    gid = srv.add_gist(EXPORTS / 'flat_lm')
    api = f'http://127.0.0.1:{_closed_port()}/gists'
    waits = Waits()
    with pytest.raises(ModelLoadError, match=r"no network\?.*by hand.*load that folder instead\.$"): fetch_gist(gid, tmp_path, api=api, sleep=waits)
    assert waits == []  # a refused connection is not worth waiting for
    fetch_gist(gid, tmp_path)
    with pytest.raises(ModelLoadError, match=f"A copy fetched earlier is in {tmp_path / gid}"): fetch_gist(gid, tmp_path, api=api)


def test_timeouts_are_retried_then_explained(tmp_path):
    silent = socket.socket()  # accepts connections (the backlog does) and never answers
    silent.bind(('127.0.0.1', 0)); silent.listen(8)
    try:
        waits = Waits()
        with pytest.raises(ModelLoadError, match=r'kept failing .*after 1 retries.*raise timeout='):
            fetch_gist('abc123', tmp_path, api=f'http://127.0.0.1:{silent.getsockname()[1]}/gists', timeout=0.3, retries=1, sleep=waits)
        assert len(waits) == 1
    finally: silent.close()


# ---- tokens

def test_token_is_sent_and_never_written(monkeypatch, tmp_path):
    for k in ('GITHUB_TOKEN', 'GH_TOKEN'): monkeypatch.delenv(k, raising=False)
    with GistServer(tokens={TOKEN}) as s:
        monkeypatch.setenv('NBTRAIN_GIST_API', s.api)
        gid = s.add_gist(FIXTURES / 'gist_gpt', truncated={'model.py'})
        folder = fetch_gist(gid, tmp_path / 'arg', token=TOKEN)
        assert s.state.sent_headers('Authorization') == [f'Bearer {TOKEN}'] * 2  # the gist and model.py's raw_url
        for var in ('GITHUB_TOKEN', 'GH_TOKEN'):
            monkeypatch.setenv(var, TOKEN)
            fetch_gist(gid, tmp_path / var)
            assert s.requests[-1].headers['authorization'] == f'Bearer {TOKEN}'
            monkeypatch.delenv(var)
        fetch_gist(gid, tmp_path / 'none')
        assert 'authorization' not in s.requests[-1].headers
        assert TOKEN.encode() not in all_bytes(tmp_path)
        assert folder.is_dir()
        # errors name the problem but never the token
        with pytest.raises(ModelLoadError) as e: fetch_gist(gid, tmp_path, token='ghp_WrongToken123')
        assert 'HTTP 401' in str(e.value) and 'GITHUB_TOKEN' in str(e.value) and 'ghp_WrongToken123' not in str(e.value)
        s.rate_limit(10)
        with pytest.raises(ModelLoadError) as e: fetch_gist(gid, tmp_path, token=TOKEN, sleep=Waits())
        assert "token's hourly limit" in str(e.value) and TOKEN not in str(e.value) and TOKEN not in repr(e.value.__cause__)


def test_token_goes_to_github_hosts_only(srv, tmp_path):
    from nbtrain.gist import _send_token
    assert _send_token('https://api.github.com/gists/abc', 'https://api.github.com/gists')
    assert _send_token('https://gist.githubusercontent.com/u/abc/raw/x/model.py', 'https://api.github.com/gists')
    assert not _send_token('https://evil.example.com/model.py', 'https://api.github.com/gists')


# ---- ids and atomic folders

@pytest.mark.parametrize('gid', ['1234567', '0123456789abcdef0123456789abcdef', 'aa5a315d61ae9438b18d'])
def test_numeric_and_hex_ids(srv, tmp_path, gid):
    srv.add_gist(EXPORTS / 'flat_lm', gist_id=gid)
    assert fetch_gist(f'https://gist.github.com/builder-user/{gid}.git', tmp_path) == tmp_path / gid
    assert gist_id(gid.upper()) == gid


def test_gist_id_forms():
    gid, rev = 'aa5a315d61ae9438b18d', 'c0ffee' * 6 + 'c0de'
    for s in [gid, f'https://gist.github.com/{gid}', f'https://gist.github.com/u/{gid}#file-model-py', f'http://gist.github.com/u/{gid}?x=1',
              f'https://api.github.com/gists/{gid}', f'https://gist.githubusercontent.com/u/{gid}/raw/model.py', f' {gid}/ ']:
        assert gist_id(s) == gid, s
    assert parse_gist(f'https://gist.github.com/u/{gid}/{rev}') == (gid, rev)
    for bad, says in [('not a gist!', 'not a gist ID or URL'), ('https://example.com/u/abc', 'is not GitHub'),
                      ('https://gist.github.com/u/zzz', "'zzz' is not hexadecimal"), ('a' * 41, 'not a gist ID')]:
        with pytest.raises(ModelLoadError, match=says) as e: gist_id(bad)
        assert 'e.g. 1a2b3c4d5e6f7a8b9c0d' in str(e.value)


def test_failed_fetch_leaves_no_folder_or_the_previous_one(srv, tmp_path):
    gid = srv.add_gist(EXPORTS / 'moe_lm', truncated={'moe_layers.py'})
    srv.fail('raw', 10, 500)  # the gist answers, one of its files does not
    with pytest.raises(ModelLoadError, match='HTTP 500'): fetch_gist(gid, tmp_path, sleep=Waits())
    assert list(tmp_path.iterdir()) == []
    srv.state.failures.clear()
    good = fetch_gist(gid, tmp_path)
    before = {p.name: p.read_bytes() for p in good.iterdir()}
    srv.update_gist(gid, {'model.py': '# a new revision\n'})
    srv.fail('raw', 10, 503)
    with pytest.raises(ModelLoadError): fetch_gist(gid, tmp_path, sleep=Waits())
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before   # the previous good folder, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == [gid]            # and no temporary folders
    srv.state.failures.clear()
    assert (fetch_gist(gid, tmp_path) / 'model.py').read_text() == '# a new revision\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == [gid]


def test_concurrent_fetches_of_one_gist(srv, tmp_path):
    gid = srv.add_gist(EXPORTS / 'moe_lm')
    fetch_gist(gid, tmp_path)
    errors = []
    def run():
        try: fetch_gist(gid, tmp_path)
        except Exception as e: errors.append(e)
    threads = [threading.Thread(target=run) for _ in range(6)]
    for t in threads: t.start()
    for t in threads: t.join()
    assert errors == []
    assert sorted(p.name for p in tmp_path.iterdir()) == [gid]
    assert sorted(p.name for p in (tmp_path / gid).iterdir()) == ['config.json', 'gist.json', 'model.py', 'moe_layers.py']


def test_write_failure_keeps_the_previous_folder(srv, tmp_path, monkeypatch):
    import nbtrain.gist as g
    gid = srv.add_gist(EXPORTS / 'flat_lm')
    good = fetch_gist(gid, tmp_path)
    before = record(good)
    real = Path.write_bytes
    def failing(self, data):
        if self.name == 'config.json': raise OSError(28, 'No space left on device')
        return real(self, data)
    monkeypatch.setattr(g.Path, 'write_bytes', failing)
    with pytest.raises(OSError, match='No space left'): fetch_gist(gid, tmp_path)
    monkeypatch.undo()
    assert record(good) == before and sorted(p.name for p in tmp_path.iterdir()) == [gid]


# ---- where the gist id comes from

def test_find_gist_reads_url_then_form_then_env():
    gid, other, rev = 'aa5a315d61ae9438b18d', '1234567', 'ab' * 20
    env = {'NBTRAIN_GIST_ID': other, 'NBTRAIN_MODEL_NAME': 'EnvModel', 'NBTRAIN_GIST_REVISION': rev}
    assert find_gist(url=f'{LINK}?gist_id={gid}', env={}) == {'gist_id': gid, 'name': None, 'revision': None, 'params': {}, 'source': 'url'}
    assert find_gist(url=f'{LINK}#gist_id={gid}&name=MyModel', env={}) == \
        {'gist_id': gid, 'name': 'MyModel', 'revision': None, 'params': {}, 'source': 'url'}
    assert find_gist(url=f'{LINK}?gist={gid}&model_name=A&rev={rev}&x=1#scrollTo=abc', env={}) == \
        {'gist_id': gid, 'name': 'A', 'revision': rev, 'params': {'x': '1', 'scrollTo': 'abc'}, 'source': 'url'}
    assert find_gist(url=f'{LINK}?gist_id={other}#gist_id={gid}', env={})['gist_id'] == gid  # the fragment wins
    assert find_gist(url=f'{LINK}#gist_id=https%3A%2F%2Fgist.github.com%2Fu%2F{gid}', env={})['gist_id'] == gid
    # the link beats the form, which beats the environment; a revision stays with its gist
    assert find_gist(f'https://gist.github.com/u/{other}', 'FormModel', url=f'{LINK}#gist_id={gid}', env=env) == \
        {'gist_id': gid, 'name': 'FormModel', 'revision': None, 'params': {}, 'source': 'url'}
    assert find_gist(gid, 'FormModel', url=LINK, env=env) == \
        {'gist_id': gid, 'name': 'FormModel', 'revision': None, 'params': {}, 'source': 'form'}
    assert find_gist('', '', url=LINK, env=env) == \
        {'gist_id': other, 'name': 'EnvModel', 'revision': rev, 'params': {}, 'source': 'env'}
    assert find_gist(url='', env={}) == {'gist_id': None, 'name': None, 'revision': None, 'params': {}, 'source': None}
    with pytest.raises(ModelLoadError, match='In the form field gist'): find_gist('my model', url='', env={})
    with pytest.raises(ModelLoadError, match='In NBTRAIN_GIST_ID'): find_gist(url='', env={'NBTRAIN_GIST_ID': 'nope!'})


def test_find_gist_in_colab_reads_the_page_url(monkeypatch):
    gid = 'aa5a315d61ae9438b18d'
    calls = []
    def eval_js(script, timeout_sec=None):
        calls.append(script)
        return f'https://abc-colab.googleusercontent.com/outputframe.html\n{LINK}#gist_id={gid}&name=FromPage'
    output = types.SimpleNamespace(eval_js=eval_js)
    colab = types.ModuleType('google.colab'); colab.output = output
    google = types.ModuleType('google'); google.colab = colab
    monkeypatch.setitem(sys.modules, 'google', google)
    monkeypatch.setitem(sys.modules, 'google.colab', colab)
    assert find_gist(env={}) == {'gist_id': gid, 'name': 'FromPage', 'revision': None, 'params': {}, 'source': 'url'}
    assert 'window.location.href' in calls[0]
    def broken(script, timeout_sec=None): raise RuntimeError('no frontend')
    output.eval_js = broken
    assert find_gist('1234567', env={})['source'] == 'form'   # a failing page read is skipped silently


def test_find_gist_outside_colab_skips_the_page():
    assert 'google.colab' not in sys.modules
    assert find_gist(env={'NBTRAIN_GIST_ID': 'abc123'})['source'] == 'env'


def test_colab_url_round_trip():
    gid = '0123456789abcdef0123456789abcdef'
    params = {'gist_id': gid, 'name': 'My Model / v2 & co', 'revision': 'ab' * 20, 'max_seq_len': 64, 'lr': 3e-4,
              'tied': False, 'skip': None, 'note': 'a=b#c?d'}
    u = colab_url('training.ipynb', params)
    assert u.startswith('https://colab.research.google.com/github/nbtrain/nbtrain/blob/main/training.ipynb#gist_id=')
    assert ' ' not in u and 'skip' not in u
    assert find_gist(url=u, env={}) == {'gist_id': gid, 'name': 'My Model / v2 & co', 'revision': 'ab' * 20,
                                         'params': {'max_seq_len': '64', 'lr': '0.0003', 'tied': 'false', 'note': 'a=b#c?d'},
                                         'source': 'url'}
    assert colab_url('colab_templates/lm.ipynb', {}, repo='me/fork', branch='dev') == \
        'https://colab.research.google.com/github/me/fork/blob/dev/colab_templates/lm.ipynb'


def test_show_code(srv, tmp_path):
    gid = srv.add_gist(EXPORTS / 'moe_lm')
    folder = fetch_gist(gid, tmp_path)
    view = show_code(folder, max_lines=5)
    assert view.index('`model.py`') < view.index('`moe_layers.py`') < view.index('`config.json`')
    for n in ('model.py', 'moe_layers.py', 'config.json'): assert record(folder)['files'][n]['sha256'] in view
    assert view._repr_markdown_() == str(view) and 'more lines' in view and 'changed since' not in view
    (folder / 'moe_layers.py').write_text('import os\nos.system("echo hi")\n')
    assert 'changed since it was fetched' in show_code(folder)
