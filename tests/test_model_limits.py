"""A model's own limits and outputs, end to end: a file model's maximum length picks (or refuses) `data.seq_len`
before anything runs, `model.max_seq_len` reaches its constructor, a model whose limit nothing states fails at its
first batch with a message instead of a PyTorch traceback, auxiliary losses are trained and logged, and `final/`
of every kind of model opens again as the trained model.

Models are tiny and runs are a few steps on one thread.
"""
import json, subprocess, sys, textwrap
from pathlib import Path
import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
TINY = {'data.corpus_size': 60, 'train.max_steps': 4, 'train.eval_every': 2, 'train.micro_batch_size': 4,
        'train.log_every': 1, 'train.progress_bar': False, 'checkpoint.every_steps': None, 'optim.lr': 3e-3}

pytestmark = pytest.mark.usefixtures('one_thread')  # tests/conftest.py

EXPORT = '''
import torch
from torch import nn

class Block(nn.Module):
    def __init__(self, d, n_heads):
        super().__init__()
        self.ln, self.attn = nn.LayerNorm(d), nn.MultiheadAttention(d, n_heads, batch_first=True)
    def forward(self, x):
        T = x.shape[1]
        mask = torch.triu(torch.ones(T, T, dtype=torch.bool, device=x.device), 1)
        h = self.ln(x)
        return x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]

class TransformerModel(nn.Module):
    def __init__(self, vocab_size, d_model, n_heads, n_layers, max_seq_len):
        super().__init__()
        self.max_seq_len = max_seq_len
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(max_seq_len, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads) for _ in range(n_layers))
        self.head = nn.Linear(d_model, vocab_size)
    def forward(self, input_ids):
        x = self.tok(input_ids) + self.pos(torch.arange(input_ids.shape[1], device=input_ids.device))
        for b in self.blocks: x = b(x)
        return self.head(x)
'''

HIDDEN = '''
import torch
from torch import nn

class Hidden(nn.Module):
    "Its length is nowhere to be read: a table named like nothing positional."
    def __init__(self):
        super().__init__()
        self.tok, self.table, self.head = nn.Embedding(128, 16), nn.Parameter(torch.zeros(20, 16)), nn.Linear(16, 128)
    def forward(self, input_ids):
        return self.head(self.tok(input_ids) + self.table[:input_ids.shape[1]])
'''

AUX = EXPORT + '''
class MoE(TransformerModel):
    "Returns (logits, load-balancing loss), as a mixture-of-experts export does."
    def __init__(self, vocab_size, d_model, n_heads, n_layers, max_seq_len):
        super().__init__(vocab_size, d_model, n_heads, n_layers, max_seq_len)
        self.router = nn.Linear(d_model, 4)
    def forward(self, input_ids):
        x = self.tok(input_ids) + self.pos(torch.arange(input_ids.shape[1], device=input_ids.device))
        p = self.router(x).softmax(-1).mean((0, 1))
        return self.head(x), (p * p).sum() * 4
'''

def export(tmp_path, name, src, config) -> Path:
    d = tmp_path/name
    d.mkdir()
    (d/'model.py').write_text(textwrap.dedent(src))
    (d/'config.json').write_text(json.dumps(config))
    return d

FLAT = {'model_name': 'TransformerModel', 'vocab_size': 128, 'd_model': 16, 'n_heads': 2, 'n_layers': 1, 'max_seq_len': 32}

def run_cfg(tmp_path, name, folder, **over):
    from nbtrain.config import load_config
    return load_config(overrides={**TINY, 'output_dir': str(tmp_path/'runs'), 'name': name, 'model.name': 'file',
                                  'model.path': str(folder), 'model.trust_code': True, **over})

def test_unset_seq_len_is_the_models_maximum_and_a_longer_one_is_refused_before_anything_runs(tmp_path, capsys):
    from nbtrain.trainer import Trainer
    from nbtrain.errors import ConfigError
    folder = export(tmp_path, 'flat', EXPORT, FLAT)
    res = Trainer(run_cfg(tmp_path, 'auto', folder)).fit()
    assert "data.seq_len: 32, the model's maximum length" in capsys.readouterr().out
    import yaml
    assert yaml.safe_load((res.run_dir/'config.yaml').read_text())['data']['seq_len'] == 32
    assert res.step == 4 and res.last_eval['val_loss'] < res.first_eval['val_loss']

    with pytest.raises(ConfigError, match=r"data.seq_len=128 is longer than the model's maximum length 32 .*set data.seq_len to 32"):
        Trainer(run_cfg(tmp_path, 'too-long', folder, **{'data.seq_len': 128}))
    assert not (tmp_path/'runs'/'too-long').exists()  # refused before anything was written

def test_max_seq_len_reaches_the_constructor(tmp_path):
    from nbtrain.trainer import Trainer
    folder = export(tmp_path, 'flat', EXPORT, FLAT)
    tr = Trainer(run_cfg(tmp_path, 'short', folder, **{'model.max_seq_len': 16}))
    assert tr.raw_model.pos.num_embeddings == 16 and tr.cfg.data.seq_len == 16
    assert tr.model_info['limits']['max_seq_len'] == 16

def test_a_model_with_no_stated_limit_fails_at_its_first_batch_with_a_message(tmp_path):
    folder = export(tmp_path, 'hidden', HIDDEN, {})
    args = ['train', '--output_dir', str(tmp_path/'runs'), '--name', 'hidden', '--model.name', 'file', '--model.path', str(folder),
            '--model.trust_code', 'true', '--data.corpus_size', '60', '--train.max_steps', '2', '--train.micro_batch_size', '4']
    p = subprocess.run([sys.executable, '-m', 'nbtrain.cli', *args], capture_output=True, text=True, cwd=tmp_path,
                       env={'OMP_NUM_THREADS': '1', 'PATH': '/usr/bin:/bin'})
    assert p.returncode == 2, p.stderr[-2000:]
    assert 'Traceback' not in p.stderr
    msg = p.stderr
    assert "The model failed on the run's first batch (input_ids [4, 128]" in msg and 'model.py:' in msg and 'set data.seq_len' in msg, msg

def test_auxiliary_losses_are_trained_logged_and_said_once(tmp_path, capsys):
    from nbtrain.trainer import Trainer
    from nbtrain.callbacks import read_metrics
    folder = export(tmp_path, 'moe', AUX, {**FLAT, 'model_name': 'MoE'})
    res = Trainer(run_cfg(tmp_path, 'aux', folder)).fit()
    out = capsys.readouterr().out
    assert out.count('The model returns auxiliary losses (aux_loss): added to the task loss with weight 1') == 1
    rows = [r for r in read_metrics(res.run_dir) if 'loss' in r]
    assert len(rows) == 4 and all(1.0 <= r['aux_loss'] <= 4.0 for r in rows)  # a load-balancing loss: 1 when balanced, 4 at worst
    off = Trainer(run_cfg(tmp_path, 'aux-off', folder, **{'task.aux_loss_weight': 0})).fit()
    assert not any('aux_loss' in r for r in read_metrics(off.run_dir))
    from safetensors.torch import load_file
    a, b = load_file(res.run_dir/'final'/'model.safetensors'), load_file(off.run_dir/'final'/'model.safetensors')
    assert not torch.equal(a['router.weight'], b['router.weight'])  # only the auxiliary loss trains the router
    from nbtrain.export import export_run  # exports say what they do with them
    rep = export_run(res.run_dir, ['safetensors'], trust_code=True, log=None)
    assert any('auxiliary losses (aux_loss)' in n and 'logits only' in n for n in rep.notes), rep.notes

@pytest.mark.parametrize('kind', ['file', 'reference', 'hf'])
def test_final_opens_as_the_trained_model(tmp_path, kind):
    from nbtrain.trainer import Trainer
    from nbtrain.config import load_config
    from nbtrain.loading import load_model, resolve_model
    from nbtrain.validate import run_checks
    over = {**TINY, 'output_dir': str(tmp_path/'runs'), 'name': kind}
    if kind == 'file': over.update({'model.name': 'file', 'model.path': str(export(tmp_path, 'flat', EXPORT, FLAT)), 'model.trust_code': True})
    elif kind == 'reference': over.update({'model.n_layer': 1, 'model.d_model': 32, 'model.n_head': 2, 'data.seq_len': 32})
    else: over.update({'model.name': 'hf', 'model.path': 'gpt2', 'model.n_layer': 1, 'model.d_model': 32, 'model.n_head': 2, 'data.seq_len': 32})
    tr = Trainer(load_config(overrides=over))
    res = tr.fit()
    trained = tr.raw_model.eval()
    x = torch.randint(0, 40, (2, 16))
    from nbtrain.models import call_model
    want = call_model(trained, {'input_ids': x}, 'input_ids').logits
    for source in (res.run_dir/'final', res.run_dir):
        lm = resolve_model(source, trust_code=True)
        assert lm.info['final'] == str(res.run_dir/'final')
        got = call_model(lm.module, {'input_ids': x}, 'input_ids').logits
        assert torch.equal(got, want), f'{kind}: {source} is not the trained model'
    nb = json.loads((res.run_dir/'final'/'nbtrain.json').read_text())
    assert nb['task'] == 'causal_lm' and nb['run_config']['name'] == kind
    own = json.loads((res.run_dir/'final'/'config.json').read_text())
    if kind == 'file': assert own == FLAT  # the export's own config.json again
    if kind == 'hf': assert own['model_type'] == 'gpt2' and own['n_layer'] == 1
    report = run_checks(res.run_dir/'final', tiers=(1,), checks=['shapes', 'output_stability'], trust_code=True, batch_size=2, seq_len=16)
    assert report.status in ('pass', 'warn'), [(r.name, r.status, r.explanation) for r in report]
