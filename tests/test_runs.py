"""The runs index on real run folders: runs the trainer wrote (finished, failed at its first step, killed during setup),
listed by `nbtrain runs` in another process, and the index rebuilt by two processes at once."""
import json, os, signal, subprocess, sys, threading, time
from pathlib import Path
import pytest
import yaml

from nbtrain.runs import INDEX, RunsCommand, diff_runs, runs_records, show_run

ROOT = Path(__file__).resolve().parent.parent
QUICK = ['--train.max_steps', '4', '--train.eval_every', '2', '--train.eval_batches', '2', '--train.log_every', '2',
         '--data.corpus_size', '60', '--train.micro_batch_size', '4', '--data.seq_len', '32', '--tracking.dashboard', 'false',
         '--eval.samples', 'false', '--train.progress_bar', 'false', '--train.compile', 'false']
ENV = {**os.environ, 'PYTHONUNBUFFERED': '1', 'OMP_WAIT_POLICY': 'PASSIVE', 'OMP_NUM_THREADS': '1'}


def nbtrain_runs(*args, timeout=120):
    "`nbtrain runs ARGS` in a fresh process (through the CLI once it lists the command, else the command class itself)."
    code = ("import sys, argparse\nfrom nbtrain import cli\n"
            "if 'runs' in cli.COMMANDS: sys.exit(cli.main(['runs', *sys.argv[1:]]))\n"
            "from nbtrain.runs import RunsCommand\np = argparse.ArgumentParser(); c = RunsCommand(); c.add_arguments(p)\n"
            "a, r = p.parse_known_args(sys.argv[1:]); sys.exit(c.run(a, r))")
    return subprocess.run([sys.executable, '-c', code, *map(str, args)], capture_output=True, text=True, env=ENV,
                          cwd=ROOT, timeout=timeout)


def start_killed_at_setup(root:Path):
    """A `nbtrain train` process killed as soon as its run folder is set up (config.yaml and the lock written), in a
    thread, so it runs beside the in-process runs; returns the thread and what it saw (the row while the run lived)."""
    cmd = [sys.executable, '-m', 'nbtrain.cli', 'train', *QUICK, '--train.max_steps', '100000', '--checkpoint.every_steps', '100000',
           '--checkpoint.every_minutes', '1000', '--output_dir', str(root), '--name', 'killed']
    seen = {}
    def watch():
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV, cwd=root)
        d = root/'killed'
        try:
            deadline = time.monotonic() + 240
            while not ((d/'config.yaml').exists() and (d/'.nbtrain-lock.json').exists()):
                if p.poll() is not None or time.monotonic() > deadline:
                    seen['error'] = f'the run never set up its folder: {p.poll()} {p.stderr.read()[-2000:] if p.poll() is not None else ""}'
                    return
                time.sleep(0.05)
            seen['live'] = runs_records(root)[0]
        finally:
            p.send_signal(signal.SIGKILL)
            p.wait(timeout=60)
    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t, seen


@pytest.fixture(scope='module')
def real_runs(tmp_path_factory):
    """A finished run and a run whose model fails on its first batch, both by the trainer in this process, and beside
    them a run killed during its setup in another process."""
    import torch
    from torch import nn
    from nbtrain.config import load_config
    from nbtrain.trainer import Trainer
    root, other = tmp_path_factory.mktemp('runs'), tmp_path_factory.mktemp('killed')
    killer = start_killed_at_setup(other)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        good = Trainer(load_config(None, None, QUICK + ['--output_dir', str(root), '--name', 'good']))
        good.fit()

        class Rejects(nn.Module):
            def __init__(self):
                super().__init__()
                self.w = nn.Parameter(torch.zeros(1))
            def forward(self, *a, **k): raise ValueError('this model rejects every batch')

        with pytest.raises(Exception):
            Trainer(load_config(None, None, QUICK + ['--output_dir', str(root), '--name', 'bad']), model=Rejects(), data=good.data).fit()
    finally: torch.set_num_threads(n)
    return root, other, killer


@pytest.mark.slow
def test_real_runs_listed_shown_and_compared(real_runs):
    root = real_runs[0]
    rows = {r['name']: r for r in runs_records(root)}
    assert set(rows) == {'good', 'bad'}
    good, bad = rows['good'], rows['bad']
    assert (good['status'], good['step'], good['max_steps'], good['final'], good['model'], good['data']) == \
           ('finished', 4, 4, True, 'gpt:tiny', 'embedded')
    evals = [json.loads(l) for l in (root/'good'/'metrics.jsonl').read_text().splitlines() if '"val_loss"' in l]
    assert good['best_val_loss'] == min(e['val_loss'] for e in evals) and good['last_val_loss'] == evals[-1]['val_loss']
    assert good['duration_s'] is not None and good['duration_s'] >= 0 and good['started']
    assert bad['status'] == 'failed' and 'rejects every batch' in (bad['error'] or ''), bad  # never a row of nothing
    assert bad['model'] and bad['data'] == 'embedded' and bad['step'] == 0

    r = nbtrain_runs(root, '--sort', 'val_loss')
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:5] == ['name', 'status', 'step', 'best', 'val_loss']
    assert lines[1].split()[:3] == ['good', 'finished', '4/4'] and lines[2].split()[:2] == ['bad', 'failed']
    assert 'bad failed:' in r.stdout and 'rejects every batch' in r.stdout
    r = nbtrain_runs(root, '--where', 'val_loss<100', '--where', 'train.max_steps==4', '--model', 'gpt', '--json')
    assert [x['name'] for x in json.loads(r.stdout)] == ['good'], r.stdout + r.stderr

    info = show_run('good', root)
    assert info['final']['weights'] and info['checkpoints'] and info['config']['train.max_steps'] == 4
    assert info['metrics']['best']['val_loss'] == good['best_val_loss']
    r = nbtrain_runs('show', 'good', '--root', root)
    assert r.returncode == 0 and 'final/: step 4' in r.stdout and 'train.max_steps' in r.stdout, r.stdout + r.stderr
    dd = diff_runs('good', 'bad', root)
    assert dd['status'] == ['finished', 'failed'] and not any(c['field'] == 'name' for c in dd['config'])
    r = nbtrain_runs('diff', 'good', 'bad', '--root', root)
    assert r.returncode == 0 and 'best_val_loss' in r.stdout, r.stdout + r.stderr
    r = nbtrain_runs(root, '--where', 'val_los<2')
    assert r.returncode != 0 and "Did you mean 'val_loss'" in r.stderr and 'Traceback' not in r.stderr, r.stderr


@pytest.mark.slow
def test_running_then_killed_during_setup_is_failed_with_why(real_runs):
    "Another process's live lock reads as running; killed before its first step, the run is failed, and the row says why."
    _, root, (thread, seen) = real_runs
    thread.join(timeout=300)
    assert 'error' not in seen, seen['error']
    assert seen['live']['status'] == 'running' and seen['live']['host'], seen
    row = runs_records(root)[0]
    assert row['status'] == 'failed' and row['step'] == 0, row
    assert row['error'] or row['stop_reason'], row  # never a row of nothing
    if (root/'killed'/'status.json').exists(): assert 'without recording why' in row['error'], row


def fake_run(root:Path, name:str, i:int):
    d = root/name
    (d/'checkpoints').mkdir(parents=True)
    (d/'config.yaml').write_text(yaml.safe_dump(dict(model=dict(name='gpt', size='tiny'), data=dict(source='embedded'),
                                                     optim=dict(lr=1e-3 * (i + 1)), train=dict(max_steps=100))))
    rows = [dict(step=s, time=1.8e9 + s, loss=5 - s / 50) for s in range(0, 100, 10)] + [dict(step=100, time=1.8e9 + 101, val_loss=3 - i / 100)]
    (d/'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    (d/'status.json').write_text(json.dumps(dict(state='finished', started='2026-12-05T10:00:00+00:00', ended='2026-12-05T10:05:00+00:00',
                                                 step=100, stop_reason='reached 100 steps', error=None)))


def test_two_processes_rebuilding_the_index_leave_a_valid_one(tmp_path):
    for i in range(60): fake_run(tmp_path, f'run-{i:02d}', i)
    code = ("import sys, json, os\nfrom pathlib import Path\nfrom nbtrain.runs import runs_records, INDEX\n"
            "root, me = Path(sys.argv[1]), int(sys.argv[2])\n"
            "for k in range(15):\n"
            "    (root/INDEX).unlink(missing_ok=True) if k % 3 == 0 else None\n"
            "    with open(root/f'run-{(me * 15 + k) % 60:02d}'/'metrics.jsonl', 'a') as f: f.write(json.dumps({'step': 101, 'loss': 1.0}) + '\\n')\n"
            "    assert len(runs_records(root)) == 60\n")
    procs = [subprocess.Popen([sys.executable, '-c', code, str(tmp_path), str(me)], env=ENV, stderr=subprocess.PIPE, text=True)
             for me in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    idx = json.loads((tmp_path/INDEX).read_text())  # complete JSON: one writer's whole index
    assert len(idx['runs']) == 60
    assert not [p for p in tmp_path.iterdir() if p.name.endswith('.tmp')]  # no temporary file left behind
    rows = runs_records(tmp_path)  # and it agrees with the folders
    assert len(rows) == 60 and all(r['status'] == 'finished' and r['step'] == 101 for r in rows
                                    if (tmp_path/r['name']/'metrics.jsonl').read_text().count('\n') > 11)
    assert {r['name']: r['best_val_loss'] for r in rows}['run-07'] == 3 - 7 / 100


def test_command_class_through_argparse(tmp_path, capsys):
    "The command as the CLI calls it: `add_arguments` on its sub-parser, then `run(args, rest)`."
    import argparse
    for i in range(3): fake_run(tmp_path, f'run-{i}', i)
    p = argparse.ArgumentParser(); c = RunsCommand(); c.add_arguments(p)
    args, rest = p.parse_known_args([str(tmp_path), '--sort', 'val_loss', '--limit', '2', '--columns', 'optim.lr'])
    assert c.run(args, rest) == 0
    out = capsys.readouterr().out.splitlines()
    assert [l.split()[0] for l in out[1:3]] == ['run-2', 'run-1'] and 'optim.lr' in out[0]
    assert '2 of 3 runs' in out[-1]


def test_benchmark_runs_at_its_smallest(tmp_path):
    "benchmarks/runs.py with 20 runs: every line is printed (no timing checks)."
    r = subprocess.run([sys.executable, str(ROOT/'benchmarks'/'runs.py'), '--runs', '20', '--rows', '20', '--repeat', '1',
                        '--dir', str(tmp_path/'b')], capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    for what in ('cold  runs_records', 'warm  runs_records (index', 'runs growing', 'warm  runs_table', 'target:'):
        assert what in r.stdout, r.stdout
