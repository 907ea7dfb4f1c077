"""Trackers end to end: a real offline W&B run (metrics at the right steps, no secrets, resumed run, alerts, artifact
uploads that fail and are retried without stopping training), TensorBoard across a resume, CSV next to metrics.jsonl."""
import csv, warnings
from pathlib import Path
import pytest
from nbtrain.callbacks import Callback, read_metrics
from nbtrain.config import load_config
from nbtrain.trainer import Trainer
from nbtrain.tracking import CSVLogger, TensorBoardTracker, WandbTracker, read_offline_run

WANDB_KEY = 'wbkey-0123456789abcdef0123456789abcdef0123'
HF_TOKEN = 'hf_SeCrEtToKeN0123456789xyz'
FAST = dict(x_disable_stats=True, console='off')  # no system monitor or console capture: quicker runs


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    "Offline W&B with its caches under tmp_path, and secrets in the environment that must never be written."
    for k in ('WANDB_DATA_DIR', 'WANDB_CACHE_DIR', 'WANDB_CONFIG_DIR'): monkeypatch.setenv(k, str(tmp_path/'wandb-home'/k.lower()))
    monkeypatch.setenv('WANDB_SILENT', 'true')
    monkeypatch.setenv('WANDB_MODE', 'offline')
    monkeypatch.setenv('WANDB_API_KEY', WANDB_KEY)
    monkeypatch.setenv('HF_TOKEN', HF_TOKEN)
    monkeypatch.delenv('WANDB_DIR', raising=False)
    return tmp_path


def quick_cfg(tmp_path, name, **over):
    return load_config(overrides={'output_dir': str(tmp_path/'runs'), 'name': name, 'data.corpus_size': 60, 'data.seq_len': 32,
                                  'model.n_layer': 1, 'model.d_model': 32, 'model.n_head': 2,
                                  'train.micro_batch_size': 8, 'train.max_steps': 12, 'train.log_every': 4,
                                  'train.eval_every': 6, 'train.eval_batches': 1, 'train.progress_bar': False,
                                  'checkpoint.every_steps': 6, 'checkpoint.keep_best_k': 0, **over})


def test_wandb_offline_run_has_metrics_at_steps_and_no_secrets(wandb_env):
    cfg = quick_cfg(wandb_env, 'wb')
    wb = WandbTracker(cfg, log_artifacts='all', settings=FAST)
    res = Trainer(cfg, callbacks=[wb]).fit()
    assert wb.mode == 'offline' and res.step == 12

    run = read_offline_run(res.run_dir/'wandb')
    assert run['run_id'] == wb.run_id
    hist = {h['_step']: h for h in run['history']}
    rows = read_metrics(res.run_dir)
    assert sorted(hist) == sorted({r['step'] for r in rows}) == [0, 4, 6, 8, 12]
    for r in rows:  # every value of metrics.jsonl is in the W&B row of the same optimizer step
        for k, v in r.items():
            if k not in ('step', 'time') and isinstance(v, float): assert hist[r['step']][k] == pytest.approx(v, rel=1e-12), (r['step'], k)
    assert run['config']['train']['max_steps'] == 12 and run['config']['run']['run_dir'] == str(res.run_dir)
    assert [(a['type'], sorted(a['aliases'])) for a in run['artifacts'] if a['type'] != 'run_table'] == [  # tables: samples
        ('checkpoint', ['latest', 'step-6']), ('checkpoint', ['latest', 'step-12']), ('model', ['latest', 'step-12'])]
    assert not wb.uploads.failures and len(wb.uploads.done) == 3

    written = [p for d in (res.run_dir, wandb_env/'wandb-home') for p in Path(d).rglob('*') if p.is_file()]
    assert any(p.suffix == '.wandb' for p in written) and any('artifacts' in p.parts for p in written)
    for p in written:
        data = p.read_bytes()
        assert WANDB_KEY.encode() not in data and HF_TOKEN.encode() not in data, f'a secret was written to {p}'


def test_wandb_resumed_training_continues_the_same_run(wandb_env):
    first = WandbTracker(cfg := quick_cfg(wandb_env, 'resume'), settings=FAST)
    Trainer(cfg, callbacks=[first]).fit()
    second = WandbTracker(cfg := quick_cfg(wandb_env, 'resume', **{'train.max_steps': 18}), settings=FAST)
    res = Trainer(cfg, callbacks=[second]).fit()
    assert res.step == 18
    assert second.run_id == first.run_id  # restored from the checkpoint before the run was opened
    runs = sorted((res.run_dir/'wandb').glob('offline-run-*'))
    assert len(runs) == 2
    a, b = (read_offline_run(r) for r in runs)
    assert a['run_id'] == b['run_id'] == first.run_id
    assert [h['_step'] for h in a['history']] == [0, 4, 6, 8, 12]
    assert [h['_step'] for h in b['history']] == [16, 18]  # continues after the checkpoint at step 12


def test_unreachable_server_falls_back_to_offline_without_stopping_training(wandb_env, monkeypatch):
    monkeypatch.delenv('WANDB_MODE')  # 'auto' with a key: online
    monkeypatch.setenv('WANDB_BASE_URL', 'http://127.0.0.1:9')  # nothing listens there: the online start fails
    wb = WandbTracker(cfg := quick_cfg(wandb_env, 'down'), log_artifacts='none', settings=dict(FAST, init_timeout=3))
    assert wb.mode == 'online'
    with pytest.warns(RuntimeWarning, match='could not start an online run.*logging offline instead'):
        res = Trainer(cfg, callbacks=[wb]).fit()
    assert res.step == 12 and wb.mode == 'offline' and res.callback_failures == []
    run = read_offline_run(res.run_dir/'wandb')
    assert run['run_id'] == wb.run_id and [h['_step'] for h in run['history']] == [0, 4, 6, 8, 12]
    for p in (p for d in (res.run_dir, wandb_env/'wandb-home') for p in Path(d).rglob('*') if p.is_file()):
        assert WANDB_KEY.encode() not in p.read_bytes(), f'the API key was written to {p}'  # also by the online attempt


class FailingUploader:
    "Fails the first `fail` calls for each path (all of them with fail=None)."
    def __init__(self, fail=None): self.fail, self.calls = fail, {}
    def __call__(self, run, path, *, name, type, aliases, metadata, lock=None):
        n = self.calls[Path(path).name] = self.calls.get(Path(path).name, 0) + 1
        if self.fail is None or n <= self.fail: raise ConnectionError(f'upload of {Path(path).name} refused (attempt {n})')


def test_artifact_upload_failures_are_retried_then_reported_without_stopping_training(wandb_env):
    up = FailingUploader()
    wb = WandbTracker(quick_cfg(wandb_env, 'fail'), log_artifacts='all', uploader=up, retries=2, backoff_s=0.01, settings=FAST)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        res = Trainer(quick_cfg(wandb_env, 'fail'), callbacks=[wb]).fit()
    assert res.step == 12 and res.callback_failures == []
    assert up.calls == {'step-000000006': 3, 'step-000000012': 3, 'final': 3}  # 1 try + 2 retries each
    failures = wb.state_dict()['upload_failures']
    assert [(f['what'], f['attempts']) for f in failures] == [('checkpoint step-000000006', 3), ('checkpoint step-000000012', 3), ('model final', 3)]
    assert all('ConnectionError' in f['error'] for f in failures)
    msgs = [str(x.message) for x in w if 'Upload of' in str(x.message)]
    assert len(msgs) == 3 and all('training continues' in m for m in msgs)
    assert (res.run_dir/'final'/'model.safetensors').exists()


def test_artifact_upload_succeeds_after_retries(wandb_env):
    up = FailingUploader(fail=2)
    wb = WandbTracker(quick_cfg(wandb_env, 'flaky'), uploader=up, retries=3, backoff_s=0.01, settings=FAST)
    Trainer(quick_cfg(wandb_env, 'flaky'), callbacks=[wb]).fit()
    assert up.calls == {'final': 3}
    assert wb.uploads.failures == [] and [d['attempts'] for d in wb.uploads.done] == [3]


class RaiseAlert(Callback):
    "Fires the event the gradient monitor fires on non-finite gradients."
    def on_step_end(self, trainer):
        if trainer.step == 5: trainer.callbacks.fire('on_alert', trainer, 'Non-finite gradients', 'NaN in lm_head.weight at step 5', 'warn')


def test_alerts_are_recorded_in_an_offline_run(wandb_env, capsys):
    wb = WandbTracker(quick_cfg(wandb_env, 'alerts'), log_artifacts='none', settings=FAST)
    res = Trainer(quick_cfg(wandb_env, 'alerts'), callbacks=[wb, RaiseAlert()]).fit()
    alerts = read_offline_run(res.run_dir/'wandb')['alerts']
    assert [(a['title'], a['level']) for a in alerts] == [('Non-finite gradients', 'WARN'), ('Training finished', 'INFO')]
    assert [a['step'] for a in wb.state_dict()['alerts']] == [5, 12]
    assert 'W&B alert (warn, recorded in the offline run): Non-finite gradients' in capsys.readouterr().out


def test_tensorboard_scalars_and_resume_without_duplicate_steps(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    # the first attempt logs step 12 after its last checkpoint (step 8); the resumed one logs step 12 again
    over = {'checkpoint.every_steps': 8, 'checkpoint.at_end': False, 'checkpoint.save_final': False}
    Trainer(cfg := quick_cfg(tmp_path, 'tb', **over), callbacks=[TensorBoardTracker(cfg)]).fit()
    res = Trainer(cfg := quick_cfg(tmp_path, 'tb', **over, **{'train.max_steps': 16}), callbacks=[TensorBoardTracker(cfg)]).fit()
    ea = EventAccumulator(str(res.run_dir/'tensorboard')); ea.Reload()
    assert [e.step for e in ea.Scalars('loss')] == [4, 8, 12, 16]
    assert [e.step for e in ea.Scalars('val_loss')] == [0, 6, 12, 16]
    loss = {r['step']: r['loss'] for r in read_metrics(res.run_dir) if 'loss' in r}
    assert [e.value for e in ea.Scalars('loss')] == pytest.approx([loss[s] for s in (4, 8, 12, 16)], rel=1e-6)


def test_csv_matches_metrics_jsonl_across_a_resume(tmp_path):
    over = {'checkpoint.every_steps': 8, 'checkpoint.at_end': False, 'checkpoint.save_final': False}
    Trainer(cfg := quick_cfg(tmp_path, 'csv', **over), callbacks=[CSVLogger(cfg)]).fit()
    res = Trainer(cfg := quick_cfg(tmp_path, 'csv', **over, **{'train.max_steps': 16}), callbacks=[CSVLogger(cfg)]).fit()
    with open(res.run_dir/'metrics.csv', newline='') as f: rows = list(csv.DictReader(f))
    js = read_metrics(res.run_dir)
    assert [int(r['step']) for r in rows] == [r['step'] for r in js] == [0, 4, 6, 8, 12, 12, 16, 16]
    for r, j in zip(rows, js):
        for k, v in j.items():
            if isinstance(v, float): assert float(r[k]) == pytest.approx(v, rel=1e-12)


def test_missing_packages_name_the_extra(monkeypatch, tmp_path):
    import sys
    cfg = quick_cfg(tmp_path, 'x')
    monkeypatch.setitem(sys.modules, 'tensorboard', None)
    with pytest.raises(ImportError, match=r"pip install 'nbtrain\[tracking\]' \(or pip install tensorboard\)"): TensorBoardTracker(cfg)
    monkeypatch.setitem(sys.modules, 'wandb', None)
    with pytest.raises(ImportError, match=r"nbtrain\[tracking\].*pip install wandb"): WandbTracker(cfg)


def test_backends_from_config_build_the_trackers(wandb_env):
    "tracking.backends names trackers in nbtrain.registry.TRACKERS; the trainer builds each from the run config."
    cfg = quick_cfg(wandb_env, 'cfg', **{'tracking.backends': ['jsonl', 'csv', 'tensorboard', 'wandb']})
    tr = Trainer(cfg)
    names = [c.name for c in tr.callbacks]
    assert {'CSVLogger', 'TensorBoardTracker', 'WandbTracker'} <= set(names)
    next(c for c in tr.callbacks if c.name == 'WandbTracker').settings.update(FAST)
    res = tr.fit()
    assert (res.run_dir/'metrics.csv').exists() and (res.run_dir/'tensorboard').is_dir()
    assert read_offline_run(res.run_dir/'wandb')['history']


def test_samples_reach_tensorboard_and_wandb_across_a_resume(wandb_env):
    "TensorBoard text and a W&B table at every evaluation; the resumed run's table holds the first session's samples too."
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from nbtrain.samples import SampleCallback, read_samples
    over = {'eval.num_samples': 2, 'eval.sample_max_new_tokens': 8}
    cfg = quick_cfg(wandb_env, 'samples', **over)
    first = WandbTracker(cfg, log_artifacts='none', settings=FAST)
    Trainer(cfg, callbacks=[first, TensorBoardTracker(cfg), SampleCallback(cfg)]).fit()
    assert [r[0] for r in first.sample_rows] == [0, 0, 6, 6, 12, 12]
    cfg = quick_cfg(wandb_env, 'samples', **{**over, 'train.max_steps': 18})
    second = WandbTracker(cfg, log_artifacts='none', settings=FAST)
    res = Trainer(cfg, callbacks=[second, TensorBoardTracker(cfg), SampleCallback(cfg)]).fit()
    assert [r[0] for r in second.sample_rows] == [0, 0, 6, 6, 12, 12, 18, 18]  # the earlier ones read back from samples.jsonl
    assert [[r['step'], r['prompt'], r['text']] for r in read_samples(res.run_dir)] == second.sample_rows

    ea = EventAccumulator(str(res.run_dir/'tensorboard'), size_guidance={'tensors': 0}); ea.Reload()
    texts = {e.step: e.tensor_proto.string_val[0].decode() for e in ea.Tensors('samples/text_summary')}
    assert sorted(texts) == [0, 6, 12, 18]
    last = [r for r in read_samples(res.run_dir) if r['step'] == 18]
    assert all(f"**{r['prompt'].strip()}" in texts[18] for r in last), texts[18]
    runs = sorted((res.run_dir/'wandb').glob('offline-run-*'))
    tables = [[h['_step'] for h in read_offline_run(r)['history'] if h.get('samples/_type') == 'table-file'] for r in runs]
    assert tables == [[0, 6, 12], [18]] and [h.get('samples/nrows') for h in read_offline_run(runs[1])['history'] if 'samples/nrows' in h] == [8]
