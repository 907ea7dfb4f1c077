"""Distributed training through Lightning Fabric on 2 CPU processes (gloo): DDP and FSDP reach the weights of one
process with the same global batch, evaluate to the same metrics (validation and test, torchmetrics' included), the
run folder is written once, and checkpoints resume across strategies."""
import json, os, shutil, subprocess, sys
import pytest, torch
from safetensors.torch import load_file

COMMON = ['--data.corpus_size', '80', '--data.seq_len', '32', '--train.max_steps', '6', '--train.log_every', '2',
          '--train.eval_every', '3', '--train.eval_batches', '2', '--train.progress_bar', 'false',
          '--train.deterministic', 'true', '--checkpoint.every_steps', '3', '--checkpoint.keep_last_n', '5',
          '--checkpoint.keep_best_k', '0', '--train.accelerator', 'cpu', '--optim.lr', '1e-2',
          '--monitor.every_steps', '1', '--monitor.log_layer_norms', 'true', '--data.test_fraction', '0.15']
ONE = ['--train.micro_batch_size', '8', '--train.grad_accum', '2', '--train.devices', '1']
DDP = ['--train.micro_batch_size', '8', '--train.grad_accum', '1', '--train.devices', '2', '--train.strategy', 'ddp']
FSDP = ['--train.micro_batch_size', '8', '--train.grad_accum', '1', '--train.devices', '2', '--train.strategy', 'fsdp']
pytestmark = pytest.mark.slow

def launch(out, argv):
    "Start `nbtrain train` with `argv` in the background, its output going to files; `finish` waits for it."
    log = out/f"launch-{len(list(out.glob('launch-*.out')))}"
    with open(f'{log}.out', 'w') as o, open(f'{log}.err', 'w') as e:
        p = subprocess.Popen([sys.executable, '-m', 'nbtrain.cli', 'train', '--output_dir', str(out), *argv], stdout=o, stderr=e,
                             text=True, env={**os.environ, 'PYTHONUNBUFFERED': '1', 'OMP_NUM_THREADS': '1'})
    p.log = log
    return p

def finish(p, timeout=600):
    "Wait for a run `launch` started; assert that it succeeded; its result (returncode, stdout, stderr)."
    try: p.wait(timeout)
    finally:
        if p.poll() is None: p.kill(); p.wait()
    r = subprocess.CompletedProcess(p.args, p.returncode, open(f'{p.log}.out').read(), open(f'{p.log}.err').read())
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r

def together(*launched):
    "Runs started together finish together: on a 2-core machine one's imports and single-process phases overlap another's."
    ps = list(launched)
    try: return [finish(p) for p in ps]
    finally:
        for p in ps:
            if p.poll() is None: p.kill(); p.wait()

def start(out, name, *args): return launch(out, ['--name', name, *COMMON, *args])

def weights(out, name): return load_file(out/name/'final'/'model.safetensors')

def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)

def logged(out, name):
    return [r for r in (json.loads(l) for l in (out/name/'metrics.jsonl').read_text().splitlines()) if 'loss' in r]

def evaluated(out, name):
    "The evaluation rows (validation and the test split at the end), by step and kind."
    rows = [json.loads(l) for l in (out/name/'metrics.jsonl').read_text().splitlines()]
    return {(r['step'], 'test' if 'test_loss' in r else 'val'): r for r in rows if 'val_loss' in r or 'test_loss' in r}

def same_metrics(a, b, tol=1e-5):
    "Every evaluation metric of one process equals that of several (numbers, and the confusion matrix)."
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    for key, ra in a.items():
        rb = b[key]
        names = [k for k in ra if k.startswith(('val_', 'test_'))]
        assert len(names) >= 8 and names == [k for k in rb if k.startswith(('val_', 'test_'))], (key, names)
        for k in names:
            if isinstance(ra[k], list): assert ra[k] == rb[k], (key, k)
            else: assert abs(ra[k] - rb[k]) <= tol * max(1, abs(ra[k])), (key, k, ra[k], rb[k])

def checkpoints(out, name): return sorted(p.name for p in (out/name/'checkpoints').iterdir())

def cut_back(out, src, dst, step='step-000000006'):
    "A copy of run `src` as it was when its step-3 checkpoint was the newest (as after a crash)."
    shutil.copytree(out/src, out/dst)
    shutil.rmtree(out/dst/'final'); shutil.rmtree(out/dst/'checkpoints'/step)

@pytest.fixture(scope='module')
def started(tmp_path_factory):
    """One process, DDP and FSDP on the same settings, and the FSDP run of the best-weights test below, started at once;
    the tests read their run folders."""
    out = tmp_path_factory.mktemp('distributed')
    return out, together(*(start(out, name, *args) for name, args in (('single', ONE), ('ddp', DDP), ('fsdp', FSDP))),
                         launch(out, BEST))

@pytest.fixture(scope='module')
def runs(started): return started[0]

def test_ddp_two_processes_match_one_process_same_global_batch(runs, started):
    r = started[1][1]
    worst = max_diff(weights(runs, 'single'), weights(runs, 'ddp'))
    assert worst < 1e-5, f'DDP weights differ from one process by up to {worst:.2e}'
    # written once: one row per logged step, checkpoints at steps 3 and 6, no leftovers of a second writer
    assert [x['step'] for x in logged(runs, 'ddp')] == [2, 4, 6]
    assert checkpoints(runs, 'ddp') == ['step-000000003', 'step-000000006']
    assert r.stdout.count('validation loss at end') == 1  # only rank 0 speaks
    # evaluation: the same examples, each once, so the same numbers (validation at 0, 3, 6 and the test split)
    one, ddp = evaluated(runs, 'single'), evaluated(runs, 'ddp')
    assert sorted(one) == [(0, 'val'), (3, 'val'), (6, 'test'), (6, 'val')]
    same_metrics(one, ddp)

def test_fsdp_two_processes_match_one_process_same_global_batch(runs, started):
    r = started[1][2]
    worst = max_diff(weights(runs, 'single'), weights(runs, 'fsdp'))
    assert worst < 1e-5, f'FSDP weights differ from one process by up to {worst:.2e}'
    one, sharded = logged(runs, 'single'), logged(runs, 'fsdp')
    assert [x['step'] for x in sharded] == [2, 4, 6]
    for a, b in zip(one, sharded):  # the loss, the clipped norm and the monitor's per-layer norms of whole gradients
        keys = [k for k in a if k == 'loss' or k.startswith('grad_norm')]
        assert len(keys) > 4 and keys == [k for k in b if k == 'loss' or k.startswith('grad_norm')]
        for k in keys: assert abs(a[k] - b[k]) < 1e-4 * max(1, abs(a[k])), (k, a[k], b[k])
    assert checkpoints(runs, 'fsdp') == ['step-000000003', 'step-000000006']
    man = json.loads((runs/'fsdp'/'checkpoints'/'step-000000006'/'manifest.json').read_text())
    assert man['aliases'] == {'lm_head.weight': 'tok_emb.weight'}  # gathered weights re-tied: stored once
    assert 'lm_head.weight' not in load_file(runs/'fsdp'/'checkpoints'/'step-000000006'/'model.safetensors')
    assert r.stdout.count('validation loss at end') == 1
    same_metrics(evaluated(runs, 'single'), evaluated(runs, 'fsdp'))

def test_checkpoints_resume_across_fsdp_and_one_process(runs):
    # FSDP resumes its own checkpoint exactly (the same weights as the run that was never stopped); a checkpoint written
    # under FSDP resumes on one process, and one written by one process resumes under FSDP. The three run at once.
    cut_back(runs, 'fsdp', 'fsdp-resumed'); cut_back(runs, 'fsdp', 'fsdp-then-one'); cut_back(runs, 'single', 'one-then-fsdp')
    r, _, _ = together(start(runs, 'fsdp-resumed', *FSDP), start(runs, 'fsdp-then-one', *ONE), start(runs, 'one-then-fsdp', *FSDP))
    assert 'Resumed from' in r.stdout and 'at step 3' in r.stdout
    assert max_diff(weights(runs, 'fsdp'), weights(runs, 'fsdp-resumed')) == 0
    for name in ('fsdp-then-one', 'one-then-fsdp'):
        worst = max_diff(weights(runs, 'single'), weights(runs, name))
        assert worst < 1e-5, f'{name}: weights differ from the uninterrupted run by up to {worst:.2e}'
        assert [x['step'] for x in logged(runs, name)] == [2, 4, 6]

def test_clock_decisions_agree_across_processes(tmp_path):
    "Checkpoints by the clock and the max_time deadline are agreed by all processes (one saving or stopping alone would hang)."
    strategies = ('fsdp', 'ddp')
    results = together(*(launch(tmp_path, ['--name', strategy,  # both at once
                                           '--data.corpus_size', '80', '--data.seq_len', '32', '--train.micro_batch_size', '8',
                                           '--train.devices', '2', '--train.strategy', strategy, '--train.accelerator', 'cpu',
                                           '--train.progress_bar', 'false', '--train.log_every', '3', '--train.max_steps', '100000',
                                           '--train.max_time', '0.08', '--checkpoint.every_minutes', '0.002',
                                           '--checkpoint.every_steps', '100000',
                                           '--checkpoint.final', 'last'])  # only the clock's checkpoints (none after an improving evaluation)
                         for strategy in strategies))
    for strategy, r in zip(strategies, results):
        assert 'reached max_time=0.08 min' in r.stdout
        ck = [p for p in (tmp_path/strategy/'checkpoints').iterdir() if p.name.startswith('step-')]
        steps = sorted(int(p.name.split('-')[1]) for p in ck)
        assert steps and all(s % 3 == 0 for s in steps[:-1]), steps  # decided at logging steps (the last one: at the end)

BEST = ['--name', 'best', '--data.corpus_size', '80', '--data.seq_len', '32', '--train.micro_batch_size', '8', '--train.devices', '2',
        '--train.strategy', 'fsdp', '--train.accelerator', 'cpu', '--train.progress_bar', 'false',
        '--train.deterministic', 'true', '--train.log_every', '3', '--train.max_steps', '9', '--train.eval_every', '3',
        '--train.eval_batches', '2', '--optim.lr', '0.3', '--data.test_fraction', '0.1', '--checkpoint.keep_last_n', '1']

def test_fsdp_final_gets_the_best_checkpoint_weights(started):
    "Under FSDP the best checkpoint's gathered weights go back into the shards: final/ and the test split get them."
    tmp_path, r = started[0], started[1][3]  # the run BEST, started by the fixture
    run = tmp_path/'best'
    rows = [json.loads(l) for l in (run/'metrics.jsonl').read_text().splitlines()]
    val = {x['step']: x['val_loss'] for x in rows if 'val_loss' in x and x['step'] > 0}
    best = min(val, key=val.get)
    assert best != 9, val  # a learning rate this high makes the last evaluation worse than an earlier one
    w = json.loads((run/'final'/'nbtrain.json').read_text())['weights']
    assert (w['step'], w['reason'], w['checkpoint']) == (best, 'best', f'step-{best:09d}')
    final, ck = weights(tmp_path, 'best'), load_file(run/'checkpoints'/f'step-{best:09d}'/'model.safetensors')
    same = [k for k in ck if k in final]
    assert len(same) >= len(ck) - 1 and all(torch.equal(final[k], ck[k]) for k in same)
    assert [x['weights_step'] for x in rows if 'test_loss' in x] == [best]
    assert r.stdout.count(f'final/: the weights of step {best}') == 1
