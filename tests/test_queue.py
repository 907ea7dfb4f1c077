"""The job queue end to end: workers in their own processes train real (tiny) runs; two workers share a queue, a
cancelled run stops with a checkpoint, a killed worker's job is resumed by the next one, SLURM array tasks are
stopped before their time limit, requeued and resumed."""
import json, os, signal, subprocess, sys, time
from pathlib import Path
import pytest
from nbtrain.callbacks import read_metrics
from nbtrain.queue import EXIT_REQUEUE, JobQueue, slurm_scripts

ENV = {**os.environ, 'PYTHONUNBUFFERED': '1', 'OMP_NUM_THREADS': '1'}
TINY = {'data.corpus_size': 60, 'data.seq_len': 32, 'train.micro_batch_size': 4, 'train.progress_bar': False,
        'train.log_every': 5, 'train.eval_every': 1000, 'train.eval_batches': 1, 'train.eval_at_start': False,
        'eval.samples': False, 'tracking.dashboard': False, 'checkpoint.every_steps': 5, 'checkpoint.every_minutes': None, 'checkpoint.keep_last_n': 2,
        'checkpoint.keep_best_k': 0}
FAST = ['--heartbeat', '0.5', '--poll', '0.3']

def tiny(tmp_path, steps, **over): return {'output_dir': str(tmp_path/'runs'), 'train.max_steps': steps, **TINY, **over}

def queue_cmd(*args, **kw):
    "`nbtrain queue ...` (as `python -m nbtrain.queue`) in its own process."
    return subprocess.Popen([sys.executable, '-m', 'nbtrain.queue', *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=kw.pop('env', ENV), **kw)

def wait_for(pred, procs, timeout=180):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred(): return True
        if all(p.poll() is not None for p in procs): return pred()
        time.sleep(0.05)
    return False

def saved(run_dir):
    "Steps of the run's complete checkpoints."
    return sorted(int(p.parent.name.split('-')[1]) for p in (Path(run_dir)/'checkpoints').glob('step-*/manifest.json'))

def newest_manifest(run_dir):
    return json.loads((Path(run_dir)/'checkpoints'/f'step-{max(saved(run_dir)):09d}'/'manifest.json').read_text())

def steps_logged(run_dir): return [r['step'] for r in read_metrics(run_dir) if 'loss' in r]

def finish(*procs, timeout=240):
    out = []
    for p in procs:
        try: out.append(p.communicate(timeout=timeout)[0])
        finally:
            if p.poll() is None:
                try: os.killpg(p.pid, signal.SIGKILL) if os.getpgid(p.pid) == p.pid else p.kill()
                except ProcessLookupError: pass
                p.wait()
    return out

def worker_of(job, procs):
    "The process of `procs` that holds `job` (its pid is in the worker id, host:pid:id)."
    pid = int(job.worker.split(':')[-2])
    return next(p for p in procs if p.pid == pid)

@pytest.mark.slow
def test_workers_share_a_queue_a_killed_workers_job_resumes_a_cancelled_run_stops_with_a_checkpoint(tmp_path):
    q = JobQueue(root=tmp_path)
    long = q.add(None, tiny(tmp_path, 100_000), name='long', priority=5)
    a, b = (q.add(None, tiny(tmp_path, 10), name=n) for n in 'ab')
    run_dir = Path(long.run_dir)
    workers = [queue_cmd('run', '--root', str(tmp_path), *FAST) for _ in range(2)]
    try:
        # two workers: the job of highest priority and another one, each to one of them
        assert wait_for(lambda: saved(run_dir) and q.get(a.id).state != 'queued', workers), finish(*workers)
        # the worker training `long` is killed without warning (a runtime recycled); its run stops with a checkpoint
        killed = worker_of(q.get(long.id), workers)
        killed.kill(); killed.wait()
        # a worker started afterwards (or the other one, when free) takes the dead worker's job over before job b,
        # and resumes it from its checkpoint
        workers.append(queue_cmd('run', '--root', str(tmp_path), *FAST))
        assert wait_for(lambda: 'Resumed from' in long.log.read_text(), workers), finish(*workers)
        resumed_at = max(saved(run_dir))
        assert wait_for(lambda: max(saved(run_dir)) > resumed_at, workers), finish(*workers)
        # cancelled while it trains: its worker stops it at its next step, with a checkpoint
        at_cancel = max(saved(run_dir))
        assert q.cancel(long.id).cancel_requested
    finally: outs = finish(*workers)
    assert [w.returncode for w in workers if w is not killed] == [0, 0], outs
    jobs = {j.name: j for j in q.list()}
    assert {n: j.state for n, j in jobs.items()} == {'long': 'cancelled', 'a': 'done', 'b': 'done'}, outs
    for j in (jobs['a'], jobs['b']):  # trained exactly once, by one worker
        assert j.attempts == 1 and j.log.read_text().count('started: attempt') == 1, j.log.read_text()[-2000:]
        assert steps_logged(j.run_dir) == [5, 10] and saved(j.run_dir)[-1] == 10
    log = jobs['long'].log.read_text()
    assert jobs['long'].attempts == 2 and log.count('started: attempt') == 2 and log.count('Resumed from') == 1, log[-3000:]
    last = steps_logged(run_dir)[-1]
    assert last > resumed_at and steps_logged(run_dir) == list(range(5, last + 1, 5))  # metrics continue, none twice
    assert 'SIGTERM received: stopping after step' in log.split('started: attempt 2')[-1], log[-2000:]
    m, st = newest_manifest(run_dir), json.loads((run_dir/'status.json').read_text())
    # the checkpoint of the step it stopped at: written for the stop, or already by checkpoint.every_steps at that step
    assert m['reason'] in ('interrupt', 'every_steps') and m['step'] >= at_cancel and m['step'] == st['step'], (m, st)
    assert st['state'] == 'interrupted'

@pytest.mark.slow
def test_slurm_array_task_stopped_before_its_time_limit_is_requeued_and_resumes(tmp_path):
    q = JobQueue(root=tmp_path)
    job = q.add(None, tiny(tmp_path, 40), name='long')
    run_dir = Path(job.run_dir)
    # the script written for the queue; its array task is run by hand as SLURM would (scontrol recorded, not run)
    bin_ = tmp_path/'bin'; bin_.mkdir()
    (bin_/'scontrol').write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/scontrol.txt\n'); (bin_/'scontrol').chmod(0o755)
    [script] = slurm_scripts(q, tmp_path/'queue.sh')
    assert '#SBATCH --array=0-0' in script.read_text() and '#SBATCH --requeue' in script.read_text()
    env = {**ENV, 'SLURM_ARRAY_TASK_ID': '0', 'SLURM_ARRAY_JOB_ID': '77', 'PATH': f"{bin_}:{ENV['PATH']}"}
    task = lambda: subprocess.Popen(['bash', str(script)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, start_new_session=True)
    t = task()
    try:
        assert wait_for(lambda: saved(run_dir), [t]), finish(t)
        t.send_signal(signal.SIGUSR1)  # SLURM's warning before the time limit (--signal=B:USR1@120)
    finally: out = finish(t)[0]
    assert t.returncode == EXIT_REQUEUE, out
    assert (tmp_path/'scontrol.txt').read_text().split() == ['requeue', '77_0']
    j = q.get(job.id)
    assert (j.state, j.attempts) == ('queued', 1), (j, out)
    stopped_at = max(saved(run_dir))
    assert stopped_at < 40 and newest_manifest(run_dir)['reason'] in ('interrupt', 'every_steps')
    # SLURM requeues the task: the same command resumes the run from its checkpoint and finishes it
    t = task()
    out = finish(t)[0]
    assert t.returncode == 0, out
    j = q.get(job.id)
    assert (j.state, j.attempts) == ('done', 2)
    log = j.log.read_text()
    assert log.count('started: attempt') == 2 and f'checkpoints/step-{stopped_at:09d} at step {stopped_at}' in log, log[-3000:]
    assert steps_logged(run_dir) == list(range(5, 41, 5))  # metrics continue: no step twice, none missing
    assert max(saved(run_dir)) == 40
    # a task started again after its job is done does nothing
    t = task()
    out = finish(t)[0]
    assert t.returncode == 0 and 'is done: nothing to do' in out and q.get(job.id).attempts == 2
