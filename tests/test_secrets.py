"""No secret in any artifact: tokens given in the environment, in a config value and on the command line reach none of
the files a run leaves (run folder, W&B offline run and its caches, TensorBoard events, data cache, exports, the Hub
card), nor what the command prints, nor an error message."""
import json, os, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parent.parent
ENV_SECRETS = {'HF_TOKEN': 'hf_EnvSecret0123456789abcd', 'WANDB_API_KEY': 'wandbkey0123456789abcdef0123456789abcdef',
               'MY_SERVICE_TOKEN': 'svc-EnvToken-9876543210'}
CLI_TOKEN = 'cli-Tok-5d41402abc4b2a76b9719d91'   # only ever on the command line, in a config value
FILE_TOKEN = 'file-Tok-7215ee9c7d9dc229d2921a40'  # only in the config file named by --config
ALL = [*ENV_SECRETS.values(), CLI_TOKEN, FILE_TOKEN]

MODEL_PY = '''
import torch
from torch import nn
class TinyLM(nn.Module):
    "A language model that takes an API token, as a model that calls a service might."
    def __init__(self, vocab_size, d_model=16, max_seq_len=64, api_token=None, hub_token=None):
        super().__init__()
        self.emb, self.pos, self.head = nn.Embedding(vocab_size, d_model), nn.Embedding(max_seq_len, d_model), nn.Linear(d_model, vocab_size)
    def forward(self, x):
        return self.head(self.emb(x) + self.pos(torch.arange(x.shape[1], device=x.device)))
'''

def found_in(folders) -> list[str]:
    "'file: secret' for every file under `folders` whose bytes contain one of the secrets."
    hits = []
    for d in folders:
        for p in Path(d).rglob('*'):
            if p.is_file():
                data = p.read_bytes()
                hits += [f'{p}: {s}' for s in ALL if s.encode() in data]
    return hits

def cli(*args, env, cwd, timeout=300):
    return subprocess.run([sys.executable, '-m', 'nbtrain.cli', *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)

@pytest.fixture
def secret_env(tmp_path):
    home = tmp_path/'home'
    env = {**os.environ, **ENV_SECRETS, 'PYTHONUNBUFFERED': '1', 'OMP_NUM_THREADS': '1', 'WANDB_MODE': 'offline',
           'WANDB_SILENT': 'true', 'NBTRAIN_CACHE_DIR': str(home/'nbtrain-cache'),
           **{k: str(home/k.lower()) for k in ('WANDB_DATA_DIR', 'WANDB_CACHE_DIR', 'WANDB_CONFIG_DIR')}}
    env.pop('WANDB_DIR', None)
    return env

@pytest.mark.slow
def test_no_secret_in_any_artifact(tmp_path, secret_env):
    model = tmp_path/'model'; model.mkdir()
    (model/'model.py').write_text(MODEL_PY)
    (model/'config.json').write_text(json.dumps(dict(vocab_size=64, d_model=16, max_seq_len=64)))
    (tmp_path/'run.yaml').write_text(f'tracking:\n  group: grp-{ENV_SECRETS["MY_SERVICE_TOKEN"]}\n'
                                     f'data:\n  cache_dir: null\n# a token pasted into a comment: {FILE_TOKEN}\n')
    out = tmp_path/'runs'
    r = cli('train', '--config', str(tmp_path/'run.yaml'), '--model.name', 'file', '--model.path', str(model), '--model.trust_code', 'true',
            '--model.kwargs', json.dumps({'api_token': CLI_TOKEN, 'hub_token': ENV_SECRETS['HF_TOKEN']}),
            '--tracking.backends', '[jsonl,csv,wandb,tensorboard]', '--tracking.tags', f'[smoke, t-{CLI_TOKEN}]',
            '--train.max_steps', '4', '--train.eval_every', '2', '--train.eval_batches', '1', '--train.log_every', '2',
            '--data.corpus_size', '30', '--train.micro_batch_size', '4', '--data.seq_len', '32', '--train.progress_bar', 'false',
            '--output_dir', str(out), env=secret_env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    run = next(p for p in out.iterdir() if p.is_dir())
    assert (run/'wandb').is_dir() and list(run.rglob('run-*.wandb')) and list((run/'tensorboard').glob('events.out.tfevents.*'))
    assert list(Path(secret_env['NBTRAIN_CACHE_DIR']).rglob('*')), 'the data cache was not written where expected'
    assert 'memory' in r.stdout.split('validation loss at start')[0]  # the estimate is printed before training starts

    # the tracker did record the command line and the config, with the tokens replaced
    from nbtrain.tracking import read_offline_run
    wb = read_offline_run(run/'wandb')
    assert wb['config']['model']['kwargs'] == {'api_token': '***', 'hub_token': '***'}
    if wb['args']: assert '--model.kwargs' in wb['args'] and any('***' in a for a in wb['args'])

    # exports and the Hub card, made from the run folder in this process (the environment's tokens set here too)
    from nbtrain.export import export_run
    from nbtrain.hub import stage_repo
    with pytest.MonkeyPatch.context() as mp:
        for k, v in ENV_SECRETS.items(): mp.setenv(k, v)
        export_run(run, ['safetensors'], out_dir=tmp_path/'export', trust_code=True, log=lambda *a, **k: None)
        card = stage_repo(run, 'me/tiny', folder=tmp_path/'hub')
    assert (card/'README.md').is_file() and list((tmp_path/'export').rglob('*.safetensors'))

    hits = found_in([tmp_path/'runs', tmp_path/'home', tmp_path/'export', tmp_path/'hub'])
    assert not hits, 'secrets written to:\n' + '\n'.join(hits)
    for s in ALL: assert s not in r.stdout and s not in r.stderr, f'{s} printed by nbtrain train'


def test_no_secret_in_printed_config_or_errors(tmp_path, secret_env):
    token_url = f'https://user:{CLI_TOKEN}@data.example.com/corpus.txt?token={FILE_TOKEN}'
    r = cli('config', '--data.source', token_url, '--model.kwargs', json.dumps({'api_token': CLI_TOKEN}),
            '--tracking.group', ENV_SECRETS['MY_SERVICE_TOKEN'], env=secret_env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert 'https://user:***@data.example.com/corpus.txt?token=***' in r.stdout and "api_token: '***'" in r.stdout
    # an error that quotes a value: the value a token was given as elsewhere is replaced there too
    r = cli('train', '--model.kwargs', json.dumps({'api_token': CLI_TOKEN}), '--train.seed', CLI_TOKEN,
            '--output_dir', str(tmp_path/'runs'), env=secret_env, cwd=tmp_path)
    assert r.returncode == 2 and "train.seed='***'" in r.stderr, r.stderr
    for s in ALL: assert s not in r.stdout + r.stderr
    assert not (tmp_path/'runs').exists()




@pytest.mark.slow
def test_no_secret_in_the_training_notebooks_saved_outputs(tmp_path, monkeypatch):
    """training.ipynb run by papermill with a token in the environment, also pasted into a config value: it is in neither
    the saved notebook's outputs nor the run on Drive. (papermill itself records the parameters it was given, in the
    injected cell and in the notebook's metadata: a token passed as a parameter is the caller's to keep out.)"""
    from test_training_notebook import run_notebook, outputs_text, TINY
    token = ENV_SECRETS['MY_SERVICE_TOKEN']
    monkeypatch.setenv('MY_SERVICE_TOKEN', token)
    nb = run_notebook(tmp_path, monkeypatch, max_steps=4, overrides={**TINY, 'tracking.group': f'grp-{token}'})
    outputs = outputs_text(nb)
    assert 'validation loss' in outputs.lower() or 'val_loss' in outputs, outputs[-2000:]  # it trained, and printed
    assert token not in outputs and token not in json.dumps([c.get('outputs', []) for c in nb['cells']])
    hits = found_in([tmp_path/'drive'])
    assert not hits, 'secrets written to:\n' + '\n'.join(hits)
    assert list((tmp_path/'drive').rglob('run-*.wandb'))  # tracked by W&B, offline
