"""Pretrained models from the Hub by id, through the real `huggingface_hub` client against the stand-in Hub on
127.0.0.1 (`tests/hubserver.py`): downloaded once and then read from the cache, a revision pinned and recorded, a
resumed run kept on its commit after the repository moved on, a private repository refused without a token with a
line that says what to do, the token never written, and the trained weights starting from the pretrained ones.
"""
import json, os, subprocess, sys
from pathlib import Path
import pytest
import torch
from hubserver import HubServer

TOKEN = 'hf_pretrained_token_0123456789'
TINY = ['--data.corpus_size', '60', '--data.seq_len', '32', '--train.max_steps', '2', '--train.eval_every', '2',
        '--train.micro_batch_size', '4', '--train.progress_bar', 'false', '--checkpoint.every_steps', '1']

pytestmark = pytest.mark.usefixtures('one_thread')


def tiny_gpt2(seed):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=128, n_positions=64,
                                      bos_token_id=0, eos_token_id=0))


def upload(hub, repo, model, tmp_path, private=False):
    from huggingface_hub import HfApi
    api = HfApi(endpoint=hub.url, token=TOKEN)
    api.create_repo(repo, private=private, exist_ok=True)
    d = tmp_path/f"upload-{len(list(tmp_path.glob('upload-*')))}"
    model.save_pretrained(d)
    return api.upload_folder(repo_id=repo, folder_path=str(d)).oid


@pytest.fixture
def hub(tmp_path):
    with HubServer(tokens={TOKEN: 'alice'}) as h: yield h


def start(tmp_path, hub, *args, token=None, offline=False, cache='cache'):
    "`nbtrain train` on a Hub model, started in the background; `done` waits for it."
    env = {k: v for k, v in os.environ.items() if k not in ('HF_TOKEN', 'HUGGING_FACE_HUB_TOKEN')}
    env.update(HF_ENDPOINT=hub.url, OMP_NUM_THREADS='1', HF_HUB_DISABLE_TELEMETRY='1')
    if token: env['HF_TOKEN'] = token
    if offline: env['HF_HUB_OFFLINE'] = '1'
    return subprocess.Popen([sys.executable, '-m', 'nbtrain.cli', 'train', '--output_dir', str(tmp_path/'runs'),
                             '--model.name', 'hf', '--model.cache_dir', str(tmp_path/cache), *TINY, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env)

def done(*ps):
    "Wait for runs `start` started (several at once: on a 2-core machine one's imports overlap another's); their results."
    try:
        outs = [p.communicate(timeout=300) for p in ps]
        return [subprocess.CompletedProcess(p.args, p.returncode, *o) for p, o in zip(ps, outs)]
    finally:
        for p in ps:
            if p.poll() is None: p.kill(); p.wait()

def nbtrain(tmp_path, hub, *args, **kw): return done(start(tmp_path, hub, *args, **kw))[0]


def downloads(hub) -> int: return sum(r.kind == 'resolve' and r.method == 'GET' for r in hub.state.requests)


def test_a_hub_model_by_id_downloads_once_starts_pretrained_and_keeps_its_commit(hub, tmp_path):
    first = upload(hub, 'alice/tiny-gpt2', tiny_gpt2(0), tmp_path)
    p = nbtrain(tmp_path, hub, '--model.path', 'alice/tiny-gpt2', '--name', 'ft', '--train.max_steps', '1')
    assert p.returncode == 0, p.stderr[-3000:]
    info = json.loads((tmp_path/'runs'/'ft'/'model.json').read_text())
    assert (info['hub_id'], info['revision'], info['pretrained']) == ('alice/tiny-gpt2', first, True)
    import yaml
    assert yaml.safe_load((tmp_path/'runs'/'ft'/'config.yaml').read_text())['model']['revision'] == first
    n = downloads(hub)
    assert n >= 2  # config and weights

    second = upload(hub, 'alice/tiny-gpt2', tiny_gpt2(1), tmp_path)  # the repository moves on
    assert second != first
    p, pinned = done(start(tmp_path, hub, '--model.path', 'alice/tiny-gpt2', '--name', 'ft'),  # the same run, on to 2 steps
                     # and at the same time, offline: a pinned commit in the cache is enough
                     start(tmp_path, hub, '--model.path', 'alice/tiny-gpt2', '--model.revision', first, '--name', 'pinned', offline=True))
    assert p.returncode == 0, p.stderr[-3000:]
    assert f'model.revision: {first}, the commit this run started from' in p.stdout
    assert downloads(hub) == n  # nothing downloaded again: the commit is in the cache (and offline nothing is asked)
    assert pinned.returncode == 0, pinned.stderr[-3000:]

    from safetensors.torch import load_file
    base = tiny_gpt2(0).state_dict()
    trained = load_file(tmp_path/'runs'/'pinned'/'final'/'model.safetensors')
    moved = (trained['transformer.wpe.weight'] - base['transformer.wpe.weight']).abs().max().item()
    apart = (tiny_gpt2(1).state_dict()['transformer.wpe.weight'] - base['transformer.wpe.weight']).abs().max().item()
    assert moved < 0.02 < apart, (moved, apart)  # two AdamW steps from the pretrained weights, not a fresh initialisation


def test_private_unknown_and_offline_repositories_say_what_to_do(hub, tmp_path):
    upload(hub, 'alice/secret-gpt2', tiny_gpt2(0), tmp_path, private=True)
    # five runs in two rounds of runs at once. The first without a token has a cache of its own, empty (the one with the
    # token fills the other); the typo and the unknown revision come after the download, with the model in the cache.
    a, b, d = done(start(tmp_path, hub, '--model.path', 'alice/secret-gpt2', '--name', 'a', cache='cache-a'),
                   start(tmp_path, hub, '--model.path', 'alice/secret-gpt2', '--name', 'b', '--train.max_steps', '1', token=TOKEN),
                   start(tmp_path, hub, '--model.path', 'alice/never-seen', '--name', 'd', offline=True))
    c, e = done(start(tmp_path, hub, '--model.path', 'alice/secret-gtp2', '--name', 'c', token=TOKEN),
                start(tmp_path, hub, '--model.path', 'alice/secret-gpt2', '--model.revision', 'v9', '--name', 'e', token=TOKEN))
    p = a
    assert p.returncode == 2 and 'Traceback' not in p.stderr
    assert "No model 'alice/secret-gpt2' on the Hub, or it is private (then set the HF_TOKEN secret" in p.stderr, p.stderr[-2000:]
    p = b
    assert p.returncode == 0, p.stderr[-3000:]
    leaked = [str(f) for f in tmp_path.rglob('*') if f.is_file() and TOKEN.encode() in f.read_bytes()]
    assert not leaked and TOKEN not in p.stdout + p.stderr, leaked

    p = c
    assert p.returncode == 2 and "Did you mean 'alice/secret-gpt2'?" in p.stderr, p.stderr[-2000:]
    p = d
    assert p.returncode == 2 and 'Cannot download alice/never-seen: no network (HF_HUB_OFFLINE is set)' in p.stderr, p.stderr[-2000:]
    p = e
    assert p.returncode == 2 and "has no revision 'v9'" in p.stderr, p.stderr[-2000:]
