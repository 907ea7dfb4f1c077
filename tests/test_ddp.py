"""Data parallel training through Lightning Fabric: 2 CPU processes (gloo) reach the weights of one process with the
same global batch, and the run folder is written once."""
import json, os, subprocess, sys
import pytest, torch
from safetensors.torch import load_file

COMMON = ['--data.corpus_size', '80', '--data.seq_len', '32', '--train.max_steps', '6', '--train.log_every', '2',
          '--train.eval_every', '3', '--train.eval_batches', '2', '--train.progress_bar', 'false',
          '--train.deterministic', 'true', '--checkpoint.every_steps', '3', '--checkpoint.keep_last_n', '5',
          '--checkpoint.keep_best_k', '0', '--train.accelerator', 'cpu', '--optim.lr', '1e-2']

def nbtrain(out, name, *args):
    env = {**os.environ, 'PYTHONUNBUFFERED': '1', 'OMP_NUM_THREADS': '1'}
    r = subprocess.run([sys.executable, '-m', 'nbtrain.cli', 'train', '--output_dir', str(out), '--name', name, *COMMON, *args],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r

@pytest.mark.slow
def test_ddp_two_processes_match_one_process_same_global_batch(tmp_path):
    nbtrain(tmp_path, 'single', '--train.micro_batch_size', '8', '--train.grad_accum', '2', '--train.devices', '1')
    r = nbtrain(tmp_path, 'ddp', '--train.micro_batch_size', '8', '--train.grad_accum', '1', '--train.devices', '2',
                '--train.strategy', 'ddp')
    a = load_file(tmp_path/'single'/'final'/'model.safetensors')
    b = load_file(tmp_path/'ddp'/'final'/'model.safetensors')
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-5, f'DDP weights differ from one process by up to {worst:.2e}'
    # written once: one row per logged step, checkpoints at steps 3 and 6, no leftovers of a second writer
    rows = [json.loads(l) for l in (tmp_path/'ddp'/'metrics.jsonl').read_text().splitlines()]
    assert [x['step'] for x in rows if 'loss' in x] == [2, 4, 6]
    ck = sorted(p.name for p in (tmp_path/'ddp'/'checkpoints').iterdir())
    assert ck == ['step-000000003', 'step-000000006'], ck
    assert r.stdout.count('validation loss at end') == 1  # only rank 0 speaks
