"""One search, several workers: two processes share one study through a journal file or one SQLite file.

Each worker is a separate `nbtrain search` process, with its own study folder for the journal (as on two machines)
and one shared folder for the SQLite file (as on one machine); they start each search together (each imports first, then waits for a go file), so both run trials of the study: one
process pair runs the journal search, then the SQLite one. Trials are tiny (a
one-layer GPT, 5 optimizer steps) and torch runs on one thread in each process.
"""
import contextlib, functools, importlib.util, io, json, os, subprocess, sys, textwrap, time
from pathlib import Path
import pytest
import yaml

optuna = pytest.importorskip('optuna')
from optuna.trial import TrialState
from nbtrain.cli import main
from nbtrain.errors import ConfigError
from nbtrain.hpo import Search, finished_trials, open_storage

TINY = {'data': {'corpus_size': 60, 'seq_len': 32}, 'model': {'n_layer': 1, 'd_model': 32, 'n_head': 2},
        'train': {'micro_batch_size': 8, 'max_steps': 5, 'eval_every': 5, 'eval_batches': 2, 'log_every': 5,
                  'progress_bar': False},
        'checkpoint': {'every_steps': 5}, 'tracking': {'dashboard': False, 'eval_metrics': False}, 'eval': {'samples': False}}

WORKER = textwrap.dedent('''
    import json, sys, time
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from nbtrain.cli import main
    import nbtrain.hpo, nbtrain.trainer
    me, folder, phases = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
    for i, argv in enumerate(phases):  # start each search together with the other worker
        (folder/f'ready-{i}-{me}').touch()
        deadline = time.monotonic() + 120
        while not (folder/f'go-{i}').exists():
            if time.monotonic() > deadline: sys.exit(f'no go file for phase {i}')
            time.sleep(0.02)
        print(f'=== phase {i}', flush=True)
        if rc := main(argv): sys.exit(rc)
''')

def write_config(tmp_path, trials=2) -> Path:
    cfg = tmp_path/'search.yaml'
    cfg.write_text(yaml.safe_dump({'search': {'trials': trials, 'pruner': 'none', 'seed': 3,
                                              'space': {'optim.lr': {'low': 1e-3, 'high': 1e-2, 'log': True}}},
                                   **TINY, 'output_dir': str(tmp_path/'runs')}))
    return cfg

def run_two_workers(tmp_path, storages:list[str], trials=2) -> list[list[str]]:
    """Two worker processes, each running one search per storage in `storages`, the two starting each search together:
    each in its own study folder (as on two machines), or both in one for an SQLite file (as on one machine)."""
    cfg = write_config(tmp_path, trials)
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'}
    procs = []
    for w in (0, 1):
        phases = [['search', '--config', str(cfg), '--name', 'shared', '--study-dir', str(tmp_path/('same' if st.endswith('.db') else f'worker{w}-{i}')), '--storage', st]
                  for i, st in enumerate(storages)]
        procs.append(subprocess.Popen([sys.executable, '-c', WORKER, str(w), str(tmp_path), json.dumps(phases)], env=env, cwd=tmp_path,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        deadline = time.monotonic() + 240
        for i in range(len(storages)):
            while not all((tmp_path/f'ready-{i}-{w}').exists() for w in (0, 1)):
                assert all(p.poll() is None for p in procs), [p.stdout.read()[-3000:] for p in procs if p.poll() is not None]
                assert time.monotonic() < deadline, f'the workers never reached search {i}'
                time.sleep(0.05)
            (tmp_path/f'go-{i}').touch()
        outs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs: p.kill(); p.wait()
    for p, out in zip(procs, outs): assert p.returncode == 0, out[-3000:]
    return [[o.split(f'=== phase {i}\n', 1)[1].split('=== phase', 1)[0] for o in outs] for i in range(len(storages))]

def check_one_study(study, outs, trials=2):
    t = study.trials
    assert [x.number for x in t] == list(range(trials))                   # no trial lost, none extra
    assert [x.state for x in t] == [TrialState.COMPLETE] * trials and finished_trials(study) == trials
    assert len({x.params['optim.lr'] for x in t}) == trials               # each trial its own point
    assert len({x.user_attrs['run_name'] for x in t}) == trials           # ... and its own run folder
    workers = {x.user_attrs['worker'] for x in t}
    assert len(workers) == 2, (workers, outs)                             # both workers ran trials of the one study
    for out in outs: assert f'{trials} trials' in out, out[-2000:]

@pytest.mark.slow
def test_two_workers_share_a_journal_file_and_an_sqlite_file(tmp_path):
    journal, db = tmp_path/'shared'/'study.log', tmp_path/'shared'/'study.db'
    db.parent.mkdir()
    on_journal, on_sqlite = run_two_workers(tmp_path, [str(journal), str(db)])
    check_one_study(optuna.load_study(study_name='shared', storage=open_storage(str(journal), None)), on_journal)
    check_one_study(optuna.load_study(study_name='shared', storage=f'sqlite:///{db}'), on_sqlite)
    assert not any(tmp_path.glob('worker*/study.db'))                      # the study lives in the shared storage only
    assert yaml.safe_load((tmp_path/'worker0-0'/'search.yaml').read_text())['search']['storage'] == str(journal)
    assert (tmp_path/'worker1-0'/'trials.csv').read_text().count('COMPLETE') == 2  # each worker's table shows the whole study
    assert sorted(p.name for p in (tmp_path/'same'/'trials').iterdir()) == ['trial-000', 'trial-001']  # one folder, both workers
    assert not list((tmp_path/'same').glob('*.tmp')) and (tmp_path/'same'/'best.yaml').exists()

def test_a_postgresql_url_reaches_optuna(tmp_path, monkeypatch, capsys):
    seen = []
    real = optuna.storages.RDBStorage
    @functools.wraps(real)  # the same signature, which open_storage inspects
    def spy(url, *a, **kw):
        seen.append(url)
        return real(url, *a, **kw)
    monkeypatch.setattr(optuna.storages, 'RDBStorage', spy)
    url = 'postgresql://user:s3cret@127.0.0.1:9/hpo'
    s = Search(write_config(tmp_path), storage=url, name='pg')
    assert s.spec.storage == url
    with pytest.raises(ConfigError) as e: s.open_study()
    assert seen == [url]
    msg = str(e.value)
    assert 'search.storage=' in msg and 's3cret' not in msg and 'user:***@127.0.0.1:9/hpo' in msg
    # without the driver SQLAlchemy picks for postgresql:// (psycopg2 up to SQLAlchemy 2.0, psycopg from 2.1): what to install;
    # with it: no server listens on port 9
    assert 'pip install psycopg2-binary' in msg or 'pip install "psycopg[binary]"' in msg or 'cannot open the database' in msg, msg
    pg2 = 'postgresql+psycopg2://user:s3cret@127.0.0.1:9/hpo'
    with monkeypatch.context() as m:
        m.setitem(sys.modules, 'psycopg2', None)  # as on a machine without it
        with pytest.raises(ConfigError, match='needs a database driver that is not installed .*pip install psycopg2-binary'):
            Search(tmp_path/'search.yaml', storage=pg2, name='pg').open_study()
    if importlib.util.find_spec('psycopg2') is not None:  # the driver is there: the server is not
        with pytest.raises(ConfigError, match="cannot open the database .*Check that the server is up") as e2:
            Search(tmp_path/'search.yaml', storage=pg2, name='pg').open_study()
        assert 's3cret' not in str(e2.value)

    # the same from the command line: one line naming the option, no traceback, no password
    assert main(['search', '--config', str(tmp_path/'search.yaml'), '--name', 'pg', '--storage', url]) == 2
    err = capsys.readouterr().err
    assert 'search.storage=' in err and 's3cret' not in err and 'Traceback' not in err

def test_bad_storage_is_named(tmp_path, capsys):
    cfg = write_config(tmp_path)
    with pytest.raises(ConfigError) as e: Search(cfg, storage='redis://localhost:6379')
    msg = str(e.value)
    assert "search.storage='redis://localhost:6379'" in msg
    for form in ('study.db', 'postgresql://', '.log'): assert form in msg
    assert main(['search', '--config', str(cfg), '--storage', 'study.txt']) == 2
    assert "search.storage='study.txt'" in capsys.readouterr().err
