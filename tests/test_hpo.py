"""Hyperparameter search end to end: a search that completes and resumes, one killed mid-trial and run again, pruning.

Trials are tiny (a one-layer GPT on 60 stories, 20-40 optimizer steps). Torch runs on one thread here: on a shared
2-core machine two intra-op threads per process slow such small models down many times over.
"""
import contextlib, io, os, signal, subprocess, sys, time
from pathlib import Path
import pytest
import yaml

optuna = pytest.importorskip('optuna')
from optuna.trial import TrialState
from nbtrain.cli import main
from nbtrain.config import load_config
from nbtrain.hpo import SearchError, finished_trials, search

ROOT = Path(__file__).resolve().parent.parent
TINY = {'data.corpus_size': 60, 'data.seq_len': 32, 'model.n_layer': 1, 'model.d_model': 32, 'model.n_head': 2,
        'train.micro_batch_size': 8, 'train.max_steps': 20, 'train.eval_every': 5, 'train.eval_batches': 2,
        'train.log_every': 5, 'train.progress_bar': False, 'checkpoint.every_steps': 5}

pytestmark = pytest.mark.usefixtures('one_thread')  # tests/conftest.py

def states(study): return [t.state for t in study.trials]

def nested(dotted:dict) -> dict:
    out = {}
    for k, v in dotted.items():
        *parents, last = k.split('.')
        d = out
        for p in parents: d = d.setdefault(p, {})
        d[last] = v
    return out

@pytest.mark.slow
def test_search_completes_writes_best_config_and_resumes(tmp_path):
    spec = {'trials': 3, 'pruner': 'none', 'space': {'optim.lr': {'low': 1e-3, 'high': 1e-2, 'log': True},
                                                     'train.micro_batch_size': [4, 8]}}
    config = {'search': spec, **nested({**TINY, 'output_dir': str(tmp_path)})}  # the file layer: the space may search it
    res = search(config, name='s')
    assert states(res.study) == [TrialState.COMPLETE] * 3
    assert res.best_value == min(t.value for t in res.study.trials)

    # best.yaml is a standalone run config: `nbtrain train --config best.yaml` reads it
    best = load_config(res.best_config)
    assert (best.optim.lr, best.train.micro_batch_size) == (res.best_params['optim.lr'], res.best_params['train.micro_batch_size'])
    assert (best.name, best.output_dir, best.checkpoint.keep_last_n, best.checkpoint.save_final) == (None, str(tmp_path), 2, True)
    trial_cfg = yaml.safe_load((res.study_dir/'trials'/f'trial-{res.best_trial:03d}'/'config.yaml').read_text())
    for k in ('model', 'data', 'optim', 'schedule', 'train'): assert best.to_dict()[k] == trial_cfg[k], k
    with contextlib.redirect_stdout(io.StringIO()) as out: assert main(['config', '--config', str(res.best_config)]) == 0
    assert 'lr: ' in out.getvalue()

    # the results: trials.csv, plots, and each trial's run folder with only its best checkpoint
    rows = (res.study_dir/'trials.csv').read_text().splitlines()
    assert len(rows) == 4 and rows[0].startswith('number,state,val_loss,steps')
    assert {'optimization_history', 'param_importances', 'parallel_coordinate', 'intermediate_values'} == set(res.plots)
    assert all(p.stat().st_size > 1000 for p in res.plots.values())
    for t in res.study.trials:
        assert len(list((Path(t.user_attrs['run_dir'])/'checkpoints').iterdir())) == 1
        assert t.user_attrs['steps'] == 20
    assert list(res.table.index) == [0, 1, 2]

    # the same search again: nothing to do; asked for more trials, it adds only those
    values = [t.value for t in res.study.trials]
    again = search(config, name='s')
    assert len(again.study.trials) == 3
    more = search(study_dir=res.study_dir, trials=4)  # from the folder alone (its search.yaml)
    assert len(more.study.trials) == 4 and [t.value for t in more.study.trials[:3]] == values

@pytest.mark.slow
def test_killed_search_resumes_and_retries_the_cut_off_trial(tmp_path, monkeypatch, capsys):
    cfg = tmp_path/'search.yaml'
    cfg.write_text(yaml.safe_dump({'search': {'trials': 3, 'pruner': 'none', 'seed': 1,
                                              'space': {'optim.lr': {'low': 1e-3, 'high': 1e-2, 'log': True}}},
                                   **nested({**TINY, 'train.max_steps': 40, 'output_dir': str(tmp_path/'runs')})}))
    cmd = [sys.executable, '-m', 'nbtrain.cli', 'search', '--config', str(cfg), '--name', 'k', '--train.eval_every', '5']
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'}
    study_dir = tmp_path/'runs'/'k'
    ckpts = study_dir/'trials'/'trial-001'/'checkpoints'
    p = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (ckpts.is_dir() and any((c/'manifest.json').exists() for c in ckpts.glob('step-*'))):  # not .tmp-*
            assert p.poll() is None, p.stdout.read()[-3000:]
            assert time.monotonic() < deadline, 'trial 1 never wrote a checkpoint'
            time.sleep(0.02)
        p.send_signal(signal.SIGKILL)  # a disconnect: no handler runs, nothing is cleaned up
    finally:
        p.kill(); p.wait()
    first = p.stdout.read()

    storage = f"sqlite:///{study_dir/'study.db'}"
    before = optuna.load_study(study_name='k', storage=storage)
    assert states(before) == [TrialState.COMPLETE, TrialState.RUNNING], first[-3000:]
    done_value, cut_params = before.trials[0].value, before.trials[1].params

    # run it again (here in this process: the same code path as the command, without a second start-up)
    monkeypatch.chdir(tmp_path)
    search(cfg, name='k', overrides=['--train.eval_every', '5'])
    out = capsys.readouterr().out
    assert 'trial 1 was cut off: retrying it with the same parameters' in out
    assert 'Resumed from' in out

    study = optuna.load_study(study_name='k', storage=storage)
    t = study.trials
    assert states(study) == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert t[0].value == done_value                                  # the finished trial is kept as it was
    assert t[2].user_attrs['retry_of'] == 1 and t[2].params == cut_params  # the cut-off trial, run again
    assert t[2].user_attrs['run_dir'] == t[1].user_attrs['run_dir']    # ... in its own run folder,
    assert t[2].user_attrs['resumed_step'] >= 5                        # ... resumed from its checkpoint
    assert t[2].user_attrs['steps'] == 40 and 'retry_of' not in t[3].user_attrs
    assert sorted(t[2].intermediate_values) == list(range(0, 45, 5))   # the curve before the checkpoint, re-reported
    assert finished_trials(study) == 3
    assert (study_dir/'best.yaml').exists()

@pytest.mark.slow
def test_pruning_stops_a_terrible_learning_rate(tmp_path):
    spec = {'trials': 2, 'pruner': {'type': 'median', 'n_startup_trials': 1},
            'space': {'optim.lr': {'low': 1e-4, 'high': 100.0, 'log': True}},
            'enqueue': [{'optim.lr': 3e-3}, {'optim.lr': 50.0}]}
    res = search({'search': spec}, overrides={**TINY, 'output_dir': str(tmp_path)}, name='p')
    good, bad = res.study.trials
    assert (good.state, bad.state) == (TrialState.COMPLETE, TrialState.PRUNED)
    assert bad.params['optim.lr'] == 50.0 and bad.user_attrs['steps'] == 5  # stopped at its first evaluation after step 0
    assert good.user_attrs['steps'] == 20 and res.best_params == {'optim.lr': 3e-3}

def test_search_errors_are_clear(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path/'bad.yaml'
    bad.write_text(yaml.safe_dump({'search': {'space': {'optim.lr': {'low': 1e-2, 'high': 1e-4}}}, 'train': {'max_steps': 5}}))
    with contextlib.redirect_stderr(io.StringIO()) as err: assert main(['search', '--config', str(bad)]) == 2
    assert "search.space['optim.lr']: low=0.01 must be below high=0.0001" in err.getvalue()
    assert not (tmp_path/'runs').exists()

    with pytest.raises(SearchError, match="search.metric='val_los' is not reported by evaluation. Did you mean 'val_loss'?"):
        search({'search': {'metric': 'val_los', 'space': {'optim.lr': [1e-3]}}}, overrides={**TINY, 'output_dir': str(tmp_path)}, name='m')
