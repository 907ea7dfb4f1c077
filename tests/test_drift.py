"""Drift end to end: a short classification run writes data_profile.json; `nbtrain drift` on shifted data exits 1 and
names the features, on a fresh sample of the same distribution exits 0; `nbtrain watch --once` on drifted data queues
one fine-tuning job (config that loads, from RUN/final, on the old and new data), once per data set; `--dry-run`
queues nothing and says what it would queue."""
import json, os, subprocess, sys
from pathlib import Path
import pytest
from nbtrain.cli import main
from nbtrain.config import load_config
from nbtrain.data import build_data
from nbtrain.drift import DataProfile, PROFILE_FILE, WATCH_LOG, load_profile, watch
from nbtrain.embedded import embedded_sentiment, SENTIMENT_LABELS
from nbtrain.trainer import Trainer

pytestmark = pytest.mark.usefixtures('one_thread')
ROOT = Path(__file__).resolve().parents[1]


def write_jsonl(path, texts, labels):
    path.write_text(''.join(json.dumps({'text': t, 'label': SENTIMENT_LABELS[y]}) + '\n' for t, y in zip(texts, labels)))
    return path


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    "A few steps of a classifier on 600 reviews (a file), with the profile callback; and the new data sets."
    root = tmp_path_factory.mktemp('drift')
    texts, labels = embedded_sentiment(600, seed=0)
    old = write_jsonl(root/'reviews.jsonl', texts, labels)
    cfg = load_config(preset='tiny-cpu', overrides={
        'output_dir': str(root/'runs'), 'name': 'reviews', 'task.name': 'sequence_classification', 'model.name': 'encoder_classifier',
        'data.source': str(old), 'data.seq_len': 64, 'data.cache': False, 'model.n_layer': 1, 'model.d_model': 32, 'model.n_head': 2,
        'train.micro_batch_size': 16, 'train.max_steps': 4, 'train.eval_every': 4, 'train.eval_batches': 2, 'train.log_every': 2,
        'train.progress_bar': False, 'tracking.backends': ['jsonl'], 'tracking.dashboard': False, 'eval.samples': False})
    res = Trainer(cfg, callbacks=[DataProfile()]).fit()
    t2, y2 = embedded_sentiment(400, seed=5)
    same = write_jsonl(root/'same.jsonl', t2, y2)
    pos = [i for i, y in enumerate(y2) if y == 2] + [i for i, y in enumerate(y2) if y != 2][:30]
    shifted = write_jsonl(root/'shifted.jsonl', [t2[i] + ' ' + t2[i] for i in pos], [y2[i] for i in pos])  # class mix and length
    greek = write_jsonl(root/'greek.jsonl', [t.translate(str.maketrans('aeiou', 'αειου')) for t in t2], y2)
    return dict(dir=Path(res.run_dir), old=old, same=same, shifted=shifted, greek=greek)


def test_the_run_writes_its_data_profile(run):
    prof = load_profile(run['dir'])
    assert prof is not None and (run['dir']/PROFILE_FILE).is_file()
    assert set(prof['features']) == {'length', 'tokens', 'unk_rate', 'labels'}
    assert sum(prof['features']['labels']['counts'].values()) == prof['examples'] == 540  # the training split (90%)


def test_drift_command_exits_1_naming_the_features_and_0_without_drift(run, capsys):
    r = subprocess.run([sys.executable, '-m', 'nbtrain.cli', 'drift', str(run['dir']), '--data', str(run['shifted'])],
                       capture_output=True, text=True, cwd=ROOT, timeout=120, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert r.returncode == 1, r.stdout + r.stderr
    first = r.stdout.splitlines()[0]
    assert first.startswith('DRIFT in') and 'labels' in first and 'length' in first, r.stdout
    assert main(['drift', str(run['dir']), '--data', str(run['same'])]) == 0
    out = capsys.readouterr().out
    assert out.startswith('no drift') and 'loss' in out and 'accuracy' in out, out  # the model's figures are compared too
    assert main(['drift', str(run['dir']), '--data', str(run['greek']), '--json', '--no-model']) == 1
    rep = json.loads(capsys.readouterr().out)
    assert rep['drifted'] == ['tokens', 'unk_rate'], rep
    unk = next(f for f in rep['features'] if f['name'] == 'unk_rate')
    assert unk['value'] > 0.2 and unk['threshold'] == 0.01
    angry = run['dir'].parent/'angry.jsonl'  # a class the model never saw
    angry.write_text(run['same'].read_text() + json.dumps({'text': 'I am so angry', 'label': 'angry'}) + '\n')
    assert main(['drift', str(run['dir']), '--data', str(angry)]) == 1
    out = capsys.readouterr().out
    assert out.startswith('DRIFT in new_classes') and 'never trained on: angry' in out, out
    assert watch(run['dir'], str(angry), once=True, enqueue=lambda *a: pytest.fail('queued'), say=lambda s: None)[0]['action'] \
        == 'not queued: new classes'
    (run['dir']/WATCH_LOG).unlink()


def test_watch_queues_one_retraining_per_drifted_data_set(run, capsys, tmp_path):
    from nbtrain.queue import JobQueue
    assert main(['watch', str(run['dir']), '--data', str(run['shifted']), '--once', '--dry-run']) == 1
    out = capsys.readouterr().out
    assert 'dry run: nothing queued; would queue job reviews-retrain-' in out and not (run['dir']/'retrain').exists(), out
    assert not (run['dir']/WATCH_LOG).exists()
    db = tmp_path/'queue.db'
    assert main(['watch', str(run['dir']), '--data', str(run['shifted']), '--once', '--queue', str(db)]) == 1
    assert 'queued retraining job 1 (reviews-retrain-' in capsys.readouterr().out
    with JobQueue(url=str(db)) as q: jobs = q.list()
    assert len(jobs) == 1 and jobs[0].state == 'queued' and jobs[0].name.startswith('reviews-retrain-')
    path = next((run['dir']/'retrain').glob('*/config.yaml'))
    cfg = load_config(path)
    assert cfg.to_dict()['model'] == jobs[0].config['model'] and jobs[0].config['data']['source'] == cfg.data.source
    assert Path(cfg.model.path) == run['dir']/'final' and cfg.model.name == 'file'
    assert cfg.data.tokenizer == str(run['dir']/'tokenizer') and cfg.data.label_names == list(SENTIMENT_LABELS)
    folder = Path(cfg.data.source)
    assert sorted(p.name for p in folder.iterdir()) == ['new.jsonl', 'old.jsonl']
    n_old, n_new = (len((folder/f).read_text().splitlines()) for f in ('old.jsonl', 'new.jsonl'))
    assert (n_old, n_new) == (600, len(run['shifted'].read_text().splitlines()))
    b = build_data(cfg.data, cfg.task, cfg.train.seed)  # the job's data: both sources, the run's tokenizer and classes
    assert b.info['n_train'] + b.info['n_val'] == n_old + n_new and b.label_names == list(SENTIMENT_LABELS)
    more = []
    enqueue = lambda config_path, name: more.append(name) or 'job-x'
    again = watch(run['dir'], str(run['shifted']), once=True, enqueue=enqueue, say=lambda s: None)
    assert again[0]['action'] == 'already queued' and again[0]['job'] == '1' and more == []  # the same data is queued once
    quiet = watch(run['dir'], str(run['same']), once=True, enqueue=enqueue, say=lambda s: None)
    assert quiet[0]['drift'] is False and quiet[0]['action'] == 'none' and more == []
    log = [json.loads(l) for l in (run['dir']/WATCH_LOG).read_text().splitlines()]
    assert [e['action'] for e in log] == ['queued', 'already queued', 'none']
