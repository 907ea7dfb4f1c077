"""Exact resume on corpora larger than memory: a run on memory-mapped token shards, and one on a stream, are SIGKILLed
mid-run and resumed; their final weights equal an uninterrupted run's bit for bit (CPU, deterministic mode), and the
stream's validation slice stays out of training."""
import json, signal
from pathlib import Path
import pytest, torch
from safetensors.torch import load_file
from nbtrain.callbacks import read_metrics
from nbtrain.checkpoint import WEIGHTS
from nbtrain.embedded import embedded_corpus
from test_checkpoint import start, run, wait_for

MODES = {
    'memory_map': ['--data.memory_map', 'true', '--data.prepare_workers', '1'],
    'stream': ['--data.streaming', 'true', '--data.shuffle_buffer', '64', '--data.stream_val_examples', '40'],
}

def corpus(tmp) -> Path:
    p = tmp/'corpus.jsonl'
    with open(p, 'w', encoding='utf-8') as f:
        for d in embedded_corpus(400, seed=3).split('\n\n'): f.write(json.dumps({'text': d}) + '\n')
    return p

def checkpointed(run_dir, at_least:int) -> bool:
    ck = Path(run_dir)/'checkpoints'
    return ck.exists() and any(int(p.name.split('-')[1]) >= at_least for p in ck.glob('step-*') if (p/'manifest.json').exists())

@pytest.mark.slow
@pytest.mark.parametrize('mode', list(MODES))
def test_sigkill_and_resume_on_a_large_corpus_is_bitwise_identical(tmp_path, mode):
    extra = ['--data.source', str(corpus(tmp_path)), '--data.cache_dir', str(tmp_path/'cache'), *MODES[mode]]
    rc, o, e = run(tmp_path, 'reference', 0, *extra)
    assert rc == 0 and 'DONE step=60' in o, e[-3000:]
    data = json.loads((tmp_path/'reference'/'data.json').read_text())
    if mode == 'stream': assert data['streaming'] and data['n_train'] is None and data['val_held_out_of_train']
    else: assert data['memory_mapped'].startswith(str(tmp_path/'cache'))  # tokenised once, into the data cache

    run_dir = tmp_path/'killed'
    p = start(tmp_path, 'killed', 0, *extra)
    hit = wait_for(lambda: checkpointed(run_dir, 15), p, every=0.01)
    if p.poll() is None: p.send_signal(signal.SIGKILL)
    p.communicate()
    assert hit, 'the run ended before it could be killed'
    assert not (run_dir/'final').exists()
    rc, o, e = run(tmp_path, 'killed', 0, *extra)
    assert rc == 0 and 'DONE step=60' in o and 'Resumed from' in o, e[-3000:]
    a, b = load_file(tmp_path/'reference'/'final'/WEIGHTS), load_file(run_dir/'final'/WEIGHTS)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), 'weights differ from the uninterrupted run'
    val = lambda d: {r['step']: r['val_loss'] for r in read_metrics(d) if 'val_loss' in r}
    assert val(run_dir) == val(tmp_path/'reference')

DDP_STREAM = ['--data.streaming', 'true', '--data.stream_val_examples', '20', '--data.shuffle_buffer', '32', '--data.seq_len', '32',
              '--train.max_steps', '12', '--train.eval_every', '6', '--train.eval_batches', '2', '--train.micro_batch_size', '8',
              '--train.devices', '2', '--train.strategy', 'ddp', '--train.accelerator', 'cpu', '--train.deterministic', 'true',
              '--checkpoint.every_steps', '3', '--checkpoint.keep_best_k', '0', '--train.progress_bar', 'false', '--train.log_every', '3']

def ddp(out, name, source, **kw):
    import os, subprocess, sys
    return subprocess.Popen([sys.executable, '-m', 'nbtrain.cli', 'train', '--output_dir', str(out), '--name', name,
                             '--data.source', str(source), *DDP_STREAM], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, 'PYTHONUNBUFFERED': '1', 'OMP_NUM_THREADS': '1'}, start_new_session=True, **kw)

@pytest.mark.slow
def test_a_stream_read_by_two_processes_resumes_each_at_its_own_place(tmp_path):
    "DDP on a stream: every process's reader state is in the checkpoint, and a killed run resumes to the same weights."
    import os
    src = corpus(tmp_path)
    ref = ddp(tmp_path, 'reference', src)
    o, e = ref.communicate(timeout=600)
    assert ref.returncode == 0, e[-3000:]
    st = torch.load(tmp_path/'reference'/'checkpoints'/'step-000000012'/'state.pt', weights_only=True)['sampler']['stream']
    assert [s['fingerprint']['rank'] for s in st] == [0, 1] and all(s['examples_read'] > 0 for s in st)
    p = ddp(tmp_path, 'killed', src)
    hit = wait_for(lambda: checkpointed(tmp_path/'killed', 6), p, timeout=300, every=0.01)
    if p.poll() is None: os.killpg(p.pid, signal.SIGKILL)  # the launcher and its worker process
    p.communicate()
    assert hit and not (tmp_path/'killed'/'final').exists()
    q = ddp(tmp_path, 'killed', src)
    o, e = q.communicate(timeout=600)
    assert q.returncode == 0 and 'Resumed from' in o, e[-3000:]
    a, b = load_file(tmp_path/'reference'/'final'/WEIGHTS), load_file(tmp_path/'killed'/'final'/WEIGHTS)
    assert all(torch.equal(a[k], b[k]) for k in a), 'weights differ from the uninterrupted run'
