"""Checkpoints under fire: SIGKILL at random points (also mid-write), corrupted and failed writes, retention, mirror."""
import csv, json, os, random, signal, subprocess, sys, time, warnings
from pathlib import Path
import pytest, torch
from safetensors.torch import load_file
from nbtrain.checkpoint import CheckpointManager, STATE, WEIGHTS, ckpt_name
from nbtrain.callbacks import read_metrics
from nbtrain.config import load_config
from nbtrain.trainer import Trainer

SCRIPT = Path(__file__).parent/'scripts'/'ckpt_run.py'

def start(out, name, mb=0, *extra):
    return subprocess.Popen([sys.executable, str(SCRIPT), str(out), name, str(mb), *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, 'PYTHONUNBUFFERED': '1'})

def run(out, name, mb=0, *extra, timeout=300):
    p = start(out, name, mb, *extra)
    o, e = p.communicate(timeout=timeout)
    return p.returncode, o, e

def wait_for(pred, proc, timeout=300, every=0.0005):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred(): return True
        if proc.poll() is not None: return False
        time.sleep(every)
    return False

def steps_logged(run_dir):
    return [r['step'] for r in read_metrics(run_dir) if 'loss' in r]

TIMING = {'time', 'samples_per_s', 'tokens_per_s', 'mfu', 'gpu_mem_gb', 'elapsed_s'}

def untimed(run_dir):
    "The rows of metrics.jsonl and metrics.csv without the columns that measure time."
    with open(Path(run_dir)/'metrics.csv', newline='', encoding='utf-8') as f: table = list(csv.DictReader(f))
    return [[{k: v for k, v in r.items() if k not in TIMING} for r in rs] for rs in (read_metrics(run_dir), table)]

@pytest.mark.slow
def test_sigkill_anywhere_then_resume_is_bitwise_identical(tmp_path):
    every4 = ('--checkpoint.every_steps', '4')  # checkpoints between log steps: the logging window travels in them
    ref = start(tmp_path, 'reference', 16, *every4)  # the uninterrupted run, on the other core while the kills go on
    run_dir, ck = tmp_path/'killed', tmp_path/'killed'/'checkpoints'
    rng = random.Random(0)
    kinds = ['mid-write', 'random', 'mid-write', 'random']
    for kind in kinds:
        p = start(tmp_path, 'killed', 16, *every4)
        before = max(steps_logged(run_dir), default=0)
        if kind == 'mid-write':  # a checkpoint directory still under its temporary name: the writer is busy
            hit = wait_for(lambda: ck.exists() and any(x.name.startswith('.tmp-') for x in ck.iterdir()), p)
        else:
            hit = wait_for(lambda: max(steps_logged(run_dir), default=0) > before, p, every=0.01)  # a random moment after it
            time.sleep(rng.uniform(0, 0.3))
        if p.poll() is None: p.send_signal(signal.SIGKILL)
        p.communicate()
        assert hit or p.returncode == 0, f'{kind}: the run ended before it could be killed'
    rc, o, e = run(tmp_path, 'killed', 16, *every4)
    assert rc == 0 and 'DONE step=60' in o, e[-2000:]
    assert 'Resumed from' in o
    o, e = ref.communicate(timeout=300)
    assert ref.returncode == 0 and 'DONE step=60' in o, e[-2000:]
    a, b = load_file(tmp_path/'reference'/'final'/WEIGHTS), load_file(run_dir/'final'/WEIGHTS)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), 'weights differ from the uninterrupted run'
    rows = read_metrics(run_dir)
    assert steps_logged(run_dir) == list(range(5, 61, 5))               # no gaps, no duplicates
    assert [r['step'] for r in rows if 'val_loss' in r] == [0, 20, 40, 60]
    ref = {r['step']: r['val_loss'] for r in read_metrics(tmp_path/'reference') if 'val_loss' in r}
    assert {r['step']: r['val_loss'] for r in rows if 'val_loss' in r} == ref
    # the metrics files equal the uninterrupted run's, timing aside: every logged loss too (the logging window in
    # progress is part of each checkpoint), and the final evaluation once
    killed_rows, killed_csv = untimed(run_dir)
    ref_rows, ref_csv = untimed(tmp_path/'reference')
    assert killed_rows == ref_rows and killed_csv == ref_csv
    assert not any(x.name.startswith('.tmp-') for x in ck.iterdir())
    # the same command once more: a finished run adds nothing
    rc, o, e = run(tmp_path, 'killed', 16, *every4)
    assert rc == 0 and 'DONE step=60' in o, e[-2000:]
    assert untimed(run_dir) == [killed_rows, killed_csv]

@pytest.mark.slow
def test_full_disk_keeps_previous_checkpoint(tmp_path):
    # 5 MB file-size limit: the first checkpoints (weights 1.7 MB, optimizer and ballast 3.7 MB) fit; after step 12 the
    # ballast grows by 2.3 MB and state.pt outgrows it
    limit = ('--grow-at', '12', '--fsize-limit', str(5 * 2**20))
    warn = start(tmp_path, 'full-warn', 0.25, *limit, '--checkpoint.on_error', 'warn')  # chosen by the user: warn and keep training
    rc, o, e = run(tmp_path, 'full', 0.25, *limit)  # at the same time, on the other core
    assert rc != 0
    assert 'Saving checkpoint' in e and 'File too large' in e and STATE in e, e[-2000:]
    cm = CheckpointManager(tmp_path/'full'/'checkpoints')
    good = cm.latest_valid()
    assert good.step == 10
    ck = cm.load(good)
    assert ck['state']['trainer']['step'] == 10
    o, e = warn.communicate(timeout=300)
    assert warn.returncode == 0 and 'DONE step=60' in o, e[-2000:]
    assert 'Training continues' in e

def quick_cfg(tmp_path, name, **over):
    return load_config(overrides={'output_dir': str(tmp_path), 'name': name, 'data.corpus_size': 60, 'data.seq_len': 32,
                                  'train.micro_batch_size': 8, 'train.max_steps': 20, 'train.log_every': 5,
                                  'train.eval_every': 10, 'train.eval_batches': 2, 'train.progress_bar': False,
                                  'checkpoint.every_steps': 5, 'checkpoint.keep_last_n': 3, 'checkpoint.keep_best_k': 0, **over})

def test_corrupted_newest_falls_back_with_warning(tmp_path):
    Trainer(quick_cfg(tmp_path, 'c')).fit()
    ck = tmp_path/'c'/'checkpoints'
    assert sorted(p.name for p in ck.iterdir()) == [ckpt_name(s) for s in (10, 15, 20)]
    f = ck/ckpt_name(20)/STATE
    f.write_bytes(f.read_bytes()[:-10])  # truncated
    with pytest.warns(RuntimeWarning, match=r'step-000000020/state.pt has \d+ bytes'):
        tr = Trainer(quick_cfg(tmp_path, 'c', **{'train.max_steps': 25}))
        res = tr.fit()
    assert res.step == 25
    assert steps_logged(tmp_path/'c') == [5, 10, 15, 20, 25]

def test_retention_and_mirror_slots(tmp_path):
    cm = CheckpointManager(tmp_path/'ck', keep_last_n=2, keep_best_k=2, monitor='acc', mode='max',
                           mirror=tmp_path/'drive', mirror_slots=3)
    accs = {1: .5, 2: .9, 3: .1, 4: .8, 5: .2, 6: .3, 7: .4, 8: .0}
    for s, acc in accs.items():
        cm.save({'model': {'w': torch.full((4,), float(s))}}, step=s, metrics={'acc': acc}, pinned=s == 3)
        cm.check()
        cm.wait()
        assert len(list((tmp_path/'drive').iterdir())) <= 3
    cm.close()
    assert [c.step for c in cm.list()] == [2, 3, 4, 7, 8]  # best two (2, 4), pinned 3, newest two (7, 8)
    assert sorted(p.name for p in (tmp_path/'drive').iterdir()) == ['slot-0', 'slot-1', 'slot-2']
    assert sorted(c.step for c in cm.mirror_list()) == [6, 7, 8]
    for c in cm.mirror_list(): assert cm.load(c)['model']['w'][0] == c.step

def test_sigterm_saves_and_stops_cleanly(tmp_path):
    p = start(tmp_path, 'term', 0, '--train.max_steps', '100000')
    assert wait_for(lambda: len(steps_logged(tmp_path/'term')) >= 2, p)
    p.send_signal(signal.SIGTERM)
    o, e = p.communicate(timeout=120)
    assert p.returncode == 0, e[-2000:]
    step = int(o.split('DONE step=')[1].split()[0])
    assert 'interrupted by SIGTERM' in o
    cm = CheckpointManager(tmp_path/'term'/'checkpoints')
    assert cm.latest_valid().step == step
    assert (tmp_path/'term'/'final'/WEIGHTS).exists()
