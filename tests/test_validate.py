"""Model checks on planted faults (tests/fixtures/faulty), on sound models of every kind, and the report they make."""
import json, os, subprocess, sys, textwrap, warnings
from pathlib import Path
import pytest
import torch
from torch import nn
from nbtrain.models import GPT, EncoderClassifier, ViT
from nbtrain.validate import CHECKS, Report, run_checks

ROOT = Path(__file__).resolve().parent.parent
FAULTY = ROOT/'tests'/'fixtures'/'faulty'
QUICK = dict(speed_seconds=0.1, memory_batch_sizes=(1, 2), overfit_steps=60)

pytestmark = pytest.mark.usefixtures('one_thread')  # tests/conftest.py: tiny models, one intra-op thread

def checks_of(report: Report, status: str) -> set[str]:
    return {r.name for r in report if r.status == status}

@pytest.fixture(scope='module')
def faulty():
    "Both tiers on every faulty export, once for the module."
    return {d.name: run_checks(d, trust_code=True, **QUICK) for d in sorted(FAULTY.iterdir()) if d.is_dir()}

def test_no_check_crashes_on_a_faulty_model(faulty):
    for name, report in faulty.items():
        assert not checks_of(report, 'error'), (name, [str(r) for r in report if r.status == 'error'])
        assert report.info['task'] == 'causal_lm', name

def test_dead_block(faulty):
    r = faulty['dead_block']['gradient_flow']
    assert r.status == 'fail' and 'dead (zero gradient)' in r.explanation
    assert {n.split('.')[2] for n in r.numbers['dead']} == {'ln2', 'mlp'}  # blocks.i.mlp.*, blocks.i.ln2.*: what feeds the x0 branch
    assert 'multiplied by 0' in r.fix

def test_unused_layer(faulty):
    r = faulty['unused_layer']['gradient_flow']
    assert r.status == 'fail' and 'unused (no gradient)' in r.explanation
    assert r.numbers['unused'] and all(n.startswith('blocks.1.') for n in r.numbers['unused'])
    assert len(r.numbers['unused']) == 12  # two LayerNorms, qkv, out and two MLP layers, weight and bias each

def test_nan_output(faulty):
    r = faulty['nan_output']['output_stability']
    assert r.status == 'fail' and 'NaN/Inf in the logits' in r.explanation
    assert r.numbers['first_nonfinite_module'] == 'blocks.0.attn'  # the module whose own code divides by the temperature
    assert faulty['nan_output']['gradient_flow'].status == 'fail'

def test_ignores_input(faulty):
    rep = faulty['ignores_input']
    r = rep['output_stability']
    assert r.status == 'fail' and 'collapsed output' in r.explanation
    assert rep['attribution'].status == 'fail' and 'zero saliency' in rep['attribution'].explanation
    assert rep['gradient_flow'].numbers['unused'] == ['tok_emb.weight']
    assert rep['overfit'].status == 'fail'

def test_fails_at_length_1(faulty):
    r = faulty['fails_len1']['shapes']
    assert r.status == 'fail'
    assert r.numbers['failing'] == ['B=1,T=1', 'B=2,T=1', 'B=4,T=1']
    assert 'model.py:' in r.explanation and 'length 1 breaks' in r.fix  # names the user's line and the likely cause
    assert faulty['fails_len1'].counts.get('fail') == 1

def test_peeks_future(faulty):
    rep = faulty['peeks_future']
    assert checks_of(rep, 'fail') == {'causality', 'attention', 'attribution'}
    assert 'sees the future' in rep['causality'].explanation and "task='masked_lm'" in rep['causality'].fix
    assert 'missing causal mask' in rep.info['task_reason']

def test_eval_dropout(faulty):
    rep = faulty['eval_dropout']
    assert checks_of(rep, 'fail') == {'determinism'}  # causality compares seeded calls, so it is not fooled
    assert 'F.dropout' in rep['determinism'].fix

def test_batch_mixing(faulty):
    r = faulty['batch_mixing']['determinism']
    assert r.status == 'fail' and 'rest of its batch' in r.explanation
    assert faulty['batch_mixing']['attention'].numbers['sources'] == ['nn.MultiheadAttention']

@pytest.mark.parametrize('make', [
    lambda: GPT(size='tiny'),
    lambda: EncoderClassifier(size='tiny', num_labels=3, max_seq_len=64),
    lambda: EncoderClassifier(size='tiny', num_labels=5, per_token=True, max_seq_len=64),
    lambda: ViT(size='tiny', image_size=16, patch_size=4, in_channels=1),
], ids=['gpt', 'encoder', 'token_encoder', 'vit'])
def test_reference_models_pass(make):
    report = run_checks(make(), **QUICK)
    assert report.ok and checks_of(report, 'pass') | checks_of(report, 'skipped') == set(CHECKS), report

HF = {
    'gpt2': dict(source='hf:gpt2', n_layer=2, n_embd=64, n_head=2, vocab_size=100, n_positions=64),
    'llama': dict(source='hf:llama', num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, vocab_size=100, max_position_embeddings=64),
    'bert': dict(source='hf:bert', task='sequence_classification', num_hidden_layers=2, hidden_size=64, num_attention_heads=2,
                 intermediate_size=128, vocab_size=100, max_position_embeddings=64),
    'vit': dict(source='hf:vit', task='image_classification', num_hidden_layers=2, hidden_size=64, num_attention_heads=2,
                intermediate_size=128, image_size=32, patch_size=8, num_labels=5),
    't5': dict(source='hf:t5', task='seq2seq', num_layers=2, num_decoder_layers=2, d_model=64, d_kv=16, num_heads=2, d_ff=128, vocab_size=100),
}
HF_TASKS = {'gpt2': 'causal_lm', 'llama': 'causal_lm', 'bert': 'sequence_classification', 'vit': 'image_classification', 't5': 'seq2seq'}

@pytest.mark.slow
@pytest.mark.parametrize('name', list(HF))
def test_hugging_face_models(name):
    pytest.importorskip('transformers')
    from nbtrain.loading import load_model
    kw = dict(HF[name])
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        model = load_model(kw.pop('source'), **kw)
    report = run_checks(model, **QUICK)
    assert report.info['task'] == HF_TASKS[name]  # inferred from the class
    assert not checks_of(report, 'error') and not checks_of(report, 'fail'), report
    assert report['attention'].status == 'pass' and report['attention'].numbers['sources'] == ['sdpa']

class TrainOnlyBug(GPT):
    "Works in eval mode, crashes in train mode: the checks that train must error, the others still run."
    def forward(self, input_ids, attention_mask=None):
        if self.training: raise RuntimeError('dropout schedule not set')
        return super().forward(input_ids, attention_mask)

def test_a_crashing_check_does_not_stop_the_report():
    report = run_checks(TrainOnlyBug(size='tiny'), **QUICK)
    assert checks_of(report, 'error') == {'gradient_flow', 'memory', 'overfit'}
    err = report['overfit']
    assert 'dropout schedule not set' in err.explanation and 'Traceback' in err.error
    assert {'shapes', 'causality', 'output_stability', 'determinism', 'attention'} <= checks_of(report, 'pass')
    assert not report.ok and report.status == 'error'

def test_model_and_random_state_left_as_they_were():
    model = GPT(size='tiny', dropout=0.1)
    model.trunk.blocks[0].eval()  # a mixed mode, to see it kept
    modes = [m.training for m in model.modules()]
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    run_checks(model, **QUICK)
    assert torch.equal(torch.get_rng_state(), rng)
    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())

def test_own_inputs_and_selected_checks():
    ids = torch.randint(0, 256, (3, 20))
    report = run_checks(GPT(size='tiny'), checks=['determinism', 'overfit'], inputs=ids, **QUICK)
    assert report.names == ['determinism', 'overfit'] and report.ok
    assert (report.info['batch_size'], report.info['seq_len'], report.info['own_inputs']) == (3, 20, True)

def test_bad_arguments_are_errors_not_reports():
    with pytest.raises(ValueError, match="Did you mean 'overfit'"): run_checks(GPT(size='tiny'), checks=['overfitt'])
    with pytest.raises(ValueError, match="Did you mean 'speed_seconds'"): run_checks(GPT(size='tiny'), speed_second=1)

def test_report_files(tmp_path):
    report = run_checks(FAULTY/'peeks_future', trust_code=True, tiers=(2,), **QUICK)
    folder = report.save(tmp_path/'out')
    data = json.loads((folder/'report.json').read_text())
    assert data['status'] == 'fail' and not data['ok'] and data['counts'] == {'fail': 2, 'pass': 1}
    assert data['model']['source']['kind'] == 'file' and len(data['model']['source']['sha256']) == 64
    by = {c['name']: c for c in data['checks']}
    assert by['attention']['figures'] == ['attention__attention_maps.png', 'attention__attention_entropy.png']
    for c in data['checks']:
        for f in c['figures']: assert (folder/f).stat().st_size > 1000
    md = (folder/'report.md').read_text()
    assert '| attention | 2 | **fail** |' in md and '![attention attention_maps](attention__attention_maps.png)' in md
    html = report._repr_html_()
    assert html.count('<tr>') == 4 and 'data:image/png;base64,' in html
    assert 'suggested fix' in html  # failures: their fixes get a column (an all-pass report has none)
    passing = Report([r for r in report.results if r.status == 'pass'], report.info)
    assert 'suggested fix' not in passing._repr_html_() and passing._repr_html_().count('<tr>') == 2
    frame = report.to_frame()
    assert list(frame['status']) == ['fail', 'pass', 'fail']

def test_imports_with_colab_packages_only():
    "nbtrain.validate needs none of nbtrain's other dependencies (installed with --no-deps on Colab)."
    code = textwrap.dedent("""
        import sys, importlib.abc
        BLOCKED = {'fastcore', 'lightning_fabric', 'lightning_utilities', 'safetensors', 'tqdm', 'transformers', 'yaml'}
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] in BLOCKED: raise ImportError(f'{name} is not installed here')
        sys.meta_path.insert(0, Block())
        from nbtrain.validate import run_checks
        from nbtrain.models import GPT
        r = run_checks(GPT(size='tiny'), checks=['shapes', 'gradient_flow'])
        assert r.ok, r
        print('imported', sorted(m for m in sys.modules if m.split('.')[0] in BLOCKED))
    """)
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert out.returncode == 0, out.stderr[-2000:]
    assert 'imported []' in out.stdout

@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
def test_on_gpu_memory_is_measured():
    model = GPT(size='tiny')
    report = run_checks(model, **QUICK)
    assert report.ok and report.info['device'].startswith('cuda')
    assert report['memory'].numbers['method'].startswith('measured')
    assert next(model.parameters()).device.type == 'cpu'  # moved back
