"""The Transformer Builder templates' functions on nbtrain's engine: the tier 1 and tier 2 checks run from the template's
own cells, documented results, training in place, the given validation split, the deprecation warning with the new
call, clear errors, a search under the legacy names, and a benchmark that never downloads its baseline.

Models are tiny (a 2-layer GPT with d_model 32) and torch runs on one thread: on a shared 2-core machine, several
intra-op threads slow such small models down many times over.
"""
import json, math, subprocess, sys
from pathlib import Path
import pytest
import torch
from torch import nn
from nbtrain.callbacks import read_metrics
from nbtrain.legacy import (LegacyArgumentError, synthetic_tokens, test_benchmark_comparison, test_fine_tuning,
                            test_hyperparameter_search)

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 12
SUMMARY_COLUMNS = ['epoch', 'train/loss', 'train/perplexity', 'val/loss', 'val/perplexity', 'val/accuracy', 'learning_rate',
                   'gradient_norm', 'epoch_duration']

pytestmark = pytest.mark.usefixtures('one_thread')  # tests/conftest.py

def gpt(seed=0, n_layer=2):
    from nbtrain.models import GPT
    torch.manual_seed(seed)
    return GPT(size='tiny', vocab_size=VOCAB, max_seq_len=32, n_layer=n_layer, d_model=32, n_head=2)

def repetitive(n=50, length=32):
    "Sequences any model learns in a few steps: 0..5 repeated, shifted by one on every other sequence."
    return [torch.arange(length) % 6 + (i % 2) for i in range(n)]

def run_info(run_dir) -> dict: return json.loads((Path(run_dir)/'data.json').read_text())

def fine_tune(model, tmp_path, **kw):
    kw = {'n_epochs': 3, 'learning_rate': 3e-3, 'batch_size': 4, 'output_dir': tmp_path/'runs', **kw}
    with pytest.warns(DeprecationWarning) as rec:
        res = test_fine_tuning(model, {'vocab_size': VOCAB}, **kw)
    return res, [str(w.message) for w in rec if issubclass(w.category, DeprecationWarning)]


def test_fine_tuning_returns_the_template_results_and_trains_the_model_in_place(tmp_path):
    import pandas as pd
    model, data = gpt(), repetitive()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    res, msgs = fine_tune(model, tmp_path, train_data=data[:40], val_data=data[40:])

    assert set(res) == {'loss_history', 'grad_norm_history', 'final_loss', 'initial_loss', 'training_time_seconds',
                        'samples_per_second', 'metrics_summary', 'best_epoch', 'amp_enabled', 'final_loss_scale', 'run_dir'}
    assert res['amp_enabled'] is False and res['final_loss_scale'] is None  # use_amp=False, the template's default
    steps = 3 * (40 // 4)  # one entry per optimizer step
    assert len(res['loss_history']) == len(res['grad_norm_history']) == steps
    assert all(isinstance(v, float) for v in res['loss_history'] + res['grad_norm_history'])
    logged = [r for r in read_metrics(res['run_dir']) if 'loss' in r]
    assert [r['step'] for r in logged] == list(range(1, steps + 1))
    assert res['initial_loss'] == res['loss_history'][0] and res['final_loss'] == res['loss_history'][-1]
    df = res['metrics_summary']
    assert isinstance(df, pd.DataFrame) and list(df.columns) == SUMMARY_COLUMNS and df['epoch'].tolist() == [0, 1, 2]
    assert df['train/loss'].is_monotonic_decreasing and df['val/loss'].is_monotonic_decreasing
    assert isinstance(res['best_epoch'], int) and res['best_epoch'] in range(3)
    assert res['best_epoch'] == int(df.loc[df['val/loss'].idxmin(), 'epoch'])
    assert res['training_time_seconds'] > 0 and res['samples_per_second'] > 0

    # trained in place: the caller's own parameters changed and the loss went down
    assert res['final_loss'] < res['initial_loss'] - 0.5, (res['initial_loss'], res['final_loss'])
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    from nbtrain.legacy import perplexity
    model.eval()
    assert perplexity(model, data[40:]) < 0.5 * VOCAB  # an untrained model is near the vocabulary size

    assert len(msgs) == 1 and 'test_fine_tuning is deprecated' in msgs[0]
    assert ("nbtrain.trainer.train(model=model, data={'train': {'input_ids': train_data}, 'validation': {'input_ids': val_data}}"
            in msgs[0])
    assert "'train.max_epochs': 3, 'optim.lr': 0.003, 'optim.weight_decay': 0.01, 'train.micro_batch_size': 4" in msgs[0]
    run = Path(res['run_dir'])
    assert run.parent == tmp_path/'runs' and run.name.startswith('fine_tuning-')
    assert (run/'fine_tuning.png').is_file() and (run/'final'/'model.safetensors').is_file()


def equivalent_code(message:str) -> str:
    "The code a deprecation warning shows (its indented lines), ready to run."
    return '\n'.join(l[4:] for l in message.split('The equivalent:\n', 1)[1].splitlines() if l.startswith('    '))

def test_the_call_the_warning_shows_trains_the_same(tmp_path):
    data = repetitive(30)
    res, msgs = fine_tune(gpt(), tmp_path, train_data=data, n_epochs=2)
    code = equivalent_code(msgs[0]).replace('nbtrain.trainer.train(', 'fit = nbtrain.trainer.train(')
    ns = {'model': gpt(), 'train_data': data}  # the same initial weights
    exec(code, ns)
    again = [r['loss'] for r in read_metrics(ns['fit'].run_dir) if 'loss' in r]
    assert again == pytest.approx(res['loss_history'], rel=1e-6)
    assert Path(ns['fit'].run_dir).parent == tmp_path/'runs' and Path(ns['fit'].run_dir) != Path(res['run_dir'])


def test_given_val_data_is_the_validation_split_as_is(tmp_path):
    data = repetitive(40)
    other = [torch.arange(20) % 4 + 8, torch.full((24,), 11), torch.arange(32) % 12]  # unlike the training data
    model = gpt()
    res, _ = fine_tune(model, tmp_path, train_data=data, val_data=other, n_epochs=2)
    info = run_info(res['run_dir'])
    assert (info['n_train'], info['n_val']) == (40, 3)  # nothing re-split
    from nbtrain.legacy import perplexity
    model.eval()  # the last evaluation saw the final weights: its loss is the trained model's loss on val_data
    assert res['metrics_summary']['val/loss'].iloc[-1] == pytest.approx(math.log(perplexity(model, other)), rel=1e-4)


def test_without_data_the_template_defaults_are_used(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default output_dir is runs/legacy in the working directory
    with pytest.warns(DeprecationWarning, match=r"synthetic_tokens\(50, vocab_size=12, length=32, seed=7\)") as rec:
        res = test_fine_tuning(gpt(), {'vocab_size': VOCAB}, n_epochs=1, random_seed=7, gradient_accumulation_steps=2)
    info = run_info(res['run_dir'])
    assert (info['n_train'], info['n_val']) == (40, 10)  # 50 random sequences, the last 20% held out
    assert len(res['loss_history']) == 40 // (4 * 2)   # batch 4, 2 micro-batches per optimizer step
    assert Path(res['run_dir']).resolve().parent == (tmp_path/'runs'/'legacy').resolve()
    msg = next(str(w.message) for w in rec if issubclass(w.category, DeprecationWarning))
    assert "train_data[:40]}, 'validation': {'input_ids': train_data[40:]}" in msg and "'train.grad_accum': 2" in msg
    assert torch.equal(synthetic_tokens(50, VOCAB, 32, 7)[0], synthetic_tokens(50, VOCAB, 32, 7)[0])


class DictOut(nn.Module):
    "A model whose forward takes only input_ids and returns a dict with logits, as some template models did."
    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(VOCAB, 16), nn.Linear(16, VOCAB)
    def forward(self, input_ids): return {'logits': self.head(self.emb(input_ids))}

def test_models_returning_dicts_and_hugging_face_outputs_train(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=32, bos_token_id=0, eos_token_id=0))
    for model in (DictOut(), hf):
        res, _ = fine_tune(model, tmp_path, train_data=repetitive(20), n_epochs=2, learning_rate=1e-2)
        assert res['final_loss'] < res['initial_loss'], type(model)


def test_use_wandb_logs_an_offline_run_without_a_key(tmp_path, monkeypatch):
    for k in ('WANDB_DATA_DIR', 'WANDB_CACHE_DIR', 'WANDB_CONFIG_DIR'): monkeypatch.setenv(k, str(tmp_path/'wandb-home'/k.lower()))
    for k in ('WANDB_API_KEY', 'WANDB_MODE', 'WANDB_DIR'): monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv('WANDB_SILENT', 'true')
    res, msgs = fine_tune(gpt(), tmp_path, train_data=repetitive(16), n_epochs=1, use_wandb=True)
    assert "'tracking.backends': ['jsonl', 'csv', 'wandb']" in msgs[0]
    assert list((Path(res['run_dir'])/'wandb').glob('offline-run-*')), 'no offline W&B run was written'


@pytest.mark.parametrize('kw, message', [
    (dict(n_epochs=0), 'n_epochs=0 is not valid: give a whole number >= 1'),
    (dict(n_epochs=2.5), 'n_epochs=2.5 is not valid'),
    (dict(batch_size=-1), 'batch_size=-1 is not valid: give a whole number >= 1'),
    (dict(learning_rate=0), 'learning_rate=0 is not valid: give a finite number > 0.0'),
    (dict(weight_decay=-0.1), 'weight_decay=-0.1 is not valid'),
    (dict(gradient_accumulation_steps=0), 'gradient_accumulation_steps=0 is not valid'),
    (dict(gradient_clip_norm='1.0'), "gradient_clip_norm='1.0' is not valid"),
    (dict(random_seed=-1), 'random_seed=-1 is not valid: give a whole number >= 0'),
    (dict(use_amp='yes'), "use_amp='yes' is not valid: give True or False"),
    (dict(train_data='a text to train on'), 'train_data is a builtins.str: give a list of 1-D LongTensors'),
    (dict(train_data={'input_ids': []}), 'train_data is a builtins.dict'),
    (dict(train_data=[[1, 2, 3]]), 'train_data[0] is a list'),
    (dict(train_data=[torch.rand(32)]), 'train_data[0] is a torch.float32 tensor of shape (32,)'),
    (dict(train_data=[torch.tensor([1, 2, 99])] * 10), 'train_data[0] holds token id 99, outside the vocabulary [0, 12)'),
    (dict(train_data=repetitive(10), val_data=torch.zeros(3)), 'val_data is a tensor of shape (3,)'),
    (dict(train_data=repetitive(1)), 'train_data has 1 sequence(s), too few to split into the first 80% for training'),
    (dict(train_data=repetitive(10), batch_size=16), 'batch_size=16 x gradient_accumulation_steps=1 needs 16 training sequences'),
])
def test_bad_arguments_are_refused_before_anything_runs(tmp_path, kw, message):
    with pytest.raises(LegacyArgumentError, match=None) as e:
        test_fine_tuning(gpt(), {'vocab_size': VOCAB}, **{'output_dir': tmp_path/'runs', **kw})
    assert message in str(e.value), str(e.value)
    assert not (tmp_path/'runs').exists()  # nothing written

def test_bad_model_and_config_are_refused(tmp_path):
    with pytest.raises(LegacyArgumentError, match="model is a builtins.str: give a torch nn.Module"):
        test_fine_tuning('gpt2', {'vocab_size': VOCAB}, output_dir=tmp_path)
    with pytest.raises(LegacyArgumentError, match="config has no vocab_size and the model has no nn.Embedding"):
        test_fine_tuning(nn.Linear(4, 4), None, output_dir=tmp_path)
    with pytest.raises(LegacyArgumentError, match="has 40 tokens but config says the model takes at most 32"):
        test_fine_tuning(gpt(), {'vocab_size': VOCAB, 'max_seq_len': 32}, [torch.arange(40) % 6] * 10, output_dir=tmp_path)
    with pytest.raises(ValueError):  # still a ValueError (and a TypeError) for code that caught those
        test_fine_tuning(gpt(), {'vocab_size': VOCAB}, n_epochs=0, output_dir=tmp_path)


def test_hyperparameter_search_reports_the_legacy_names_and_the_best_trial(tmp_path):
    factory = lambda: gpt(n_layer=1)
    with pytest.warns(DeprecationWarning) as rec:
        res = test_hyperparameter_search(factory, {'vocab_size': VOCAB}, train_data=repetitive(30), n_trials=2,
                                         search_space={'lr': (1e-3, 1e-2), 'batch_size': [4, 8], 'warmup': (0, 3)},
                                         random_seed=3, output_dir=tmp_path)
    assert {'best_params', 'best_value', 'n_trials', 'all_trials'} <= set(res)
    assert set(res['best_params']) == {'learning_rate', 'batch_size', 'warmup_steps', 'weight_decay'}
    assert res['n_trials'] == len(res['all_trials']) == 2
    assert all(set(t) == {'number', 'value', 'params'} and set(t['params']) == set(res['best_params']) for t in res['all_trials'])
    assert res['best_value'] == min(t['value'] for t in res['all_trials'])
    p = res['best_params']
    assert 1e-3 <= p['learning_rate'] <= 1e-2 and p['batch_size'] in (4, 8) and 0 <= p['warmup_steps'] <= 3
    assert 1e-6 <= p['weight_decay'] <= 1e-2  # the template's default range for what search_space leaves out
    msg = next(str(w.message) for w in rec if issubclass(w.category, DeprecationWarning))
    assert 'nbtrain.hpo.search(' in msg and 'model_factory=model_factory' in msg and "'seed': 3" in msg
    ns = {'model_factory': factory, 'train_data': repetitive(30)}
    exec(equivalent_code(msg), ns)  # the call the warning shows: the same trials, the same best value
    assert ns['res'].best_value == pytest.approx(res['best_value'], rel=1e-6)
    assert ns['res'].best_params['optim.lr'] == pytest.approx(p['learning_rate'])
    # a real nbtrain study: the SQLite storage, one run per trial, each trial 2 epochs of the training split (24 sequences)
    study = res['study_dir']
    assert study.parent == tmp_path and (study/'study.db').is_file()
    for t in res['all_trials']:
        run = study/'trials'/f"trial-{t['number']:03d}"
        steps = [r for r in read_metrics(run) if 'loss' in r]
        assert steps[-1]['step'] == 2 * (24 // t['params']['batch_size'])
        assert run_info(run)['n_val'] == 6

def test_hyperparameter_search_refuses_bad_arguments(tmp_path):
    factory = lambda: gpt(n_layer=1)
    cases = [(dict(model_factory=gpt()), 'model_factory is a GPT model, not a function that makes one'),
             (dict(n_trials=0), 'n_trials=0 is not valid'),
             (dict(search_space={'learning_rate': (0, 1e-3)}), "search_space['learning_rate']=(0, 0.001) is not valid"),
             (dict(search_space={'bs': [2]}), "search_space['bs']: unknown key"),
             (dict(search_space=[1e-3]), 'search_space=[0.001] is not valid: give a dict'),
             (dict(train_data='tokens'), 'train_data is a builtins.str')]
    for kw, message in cases:
        kw = {'model_factory': factory, 'config': {'vocab_size': VOCAB}, 'output_dir': tmp_path, **kw}
        with pytest.raises(LegacyArgumentError) as e: test_hyperparameter_search(**kw)
        assert message in str(e.value), str(e.value)
    assert not any(tmp_path.iterdir())


def test_benchmark_compares_with_a_local_baseline_and_clamps_its_vocabulary(tmp_path):
    from transformers import GPT2Config
    GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=5, n_positions=64, bos_token_id=0, eos_token_id=0).save_pretrained(tmp_path/'tiny-gpt2')
    model = gpt()
    with pytest.warns(DeprecationWarning, match=r"nbtrain\.validate\.run_checks\(model, checks=\['speed'\]"):
        res = test_benchmark_comparison(model, {'vocab_size': VOCAB}, str(tmp_path/'tiny-gpt2'), test_data=repetitive(6), n_samples=4)
    assert {'parameter_count', 'inference_speed_ms', 'perplexity', 'baseline_model'} <= set(res)
    n = sum(p.numel() for p in model.parameters())
    assert res['parameter_count']['custom'] == n and isinstance(res['parameter_count']['baseline'], int)
    for key, a, b, name in (('parameter_count', 'custom', 'baseline', 'ratio'), ('inference_speed_ms', 'baseline', 'custom', 'speedup'),
                            ('perplexity', 'custom', 'baseline', 'ratio')):
        assert res[key][name] == pytest.approx(res[key][a] / res[key][b]) and res[key][a] > 0
    assert res['baseline_model'] == str(tmp_path/'tiny-gpt2') and res['baseline_pretrained'] is False
    assert any('random weights' in n for n in res['notes']) and any('clamped to 4' in n for n in res['notes'])
    assert model.training  # the mode it came in with

@pytest.fixture
def offline(monkeypatch):
    """The Hugging Face libraries in offline mode, as on a machine without network. Without it, transformers' look-up of
    an adapter config ignores local_files_only and retries an unreachable huggingface.co for ~25 s before giving up."""
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')

def test_benchmark_refuses_an_unknown_baseline_offline(offline):
    with pytest.raises(LegacyArgumentError, match="baseline_model_name='surely-not-a-model' is not in the local Hugging Face cache"):
        test_benchmark_comparison(gpt(), {'vocab_size': VOCAB}, 'surely-not-a-model', n_samples=2)
    with pytest.raises(LegacyArgumentError, match='test_data holds|test_data\\[0\\] holds token id 50'):
        test_benchmark_comparison(gpt(), {'vocab_size': VOCAB}, test_data=[torch.tensor([1, 50])], n_samples=1)

@pytest.mark.slow
def test_benchmark_default_baseline_is_distilgpt2_built_from_its_config(offline):
    with pytest.warns(DeprecationWarning, match="test_benchmark_comparison is deprecated"):
        res = test_benchmark_comparison(gpt(), {'vocab_size': VOCAB}, n_samples=3)
    assert res['baseline_model'] == 'distilgpt2' and res['parameter_count']['baseline'] == 81_912_576
    if not res['baseline_pretrained']:  # not cached here: random weights, said so
        assert 'random weights' in res['notes'][0] and res['perplexity']['baseline'] > 1000


def test_legacy_imports_without_optuna_pandas_or_transformers():
    code = ("import sys\nfor m in ('optuna', 'pandas', 'transformers'): sys.modules[m] = None\n"
            "import nbtrain.legacy as L\nprint(L.test_fine_tuning.__test__, L.test_benchmark_comparison.__test__)")
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ['False', 'False']  # and pytest does not collect them as tests where they are imported


# ---------------------------------------------------------------------------------------------------------------------
# The tier 1 and tier 2 check functions of the templates' template.ipynb
# ---------------------------------------------------------------------------------------------------------------------
FAULTY = ROOT/'tests'/'fixtures'/'faulty'

# template.ipynb (matt-hans/transformer-builder-colab-templates): the config object of its model cell, verbatim
TEMPLATE_CONFIG = '''
class ModelConfig:
    def __init__(self, **kwargs):
        # Set defaults
        self.vocab_size = 50257
        self.max_seq_len = 512
        self.max_batch_size = 8
        
        # If nodes-based config, extract common params
        if 'nodes' in kwargs:
            for node in kwargs['nodes']:
                node_params = node.get('params', {})
                if 'vocab_size' in node_params:
                    self.vocab_size = node_params['vocab_size']
                if 'max_seq_len' in node_params or 'seq_length' in node_params:
                    self.max_seq_len = node_params.get('max_seq_len') or node_params.get('seq_length', 512)
        
        # Override with flat params if present
        for key, value in kwargs.items():
            if key not in ['nodes', 'version', 'model_name']:
                setattr(self, key, value)

config = ModelConfig(**config_dict)
'''

# its tier 1 cells, verbatim but for the module the functions are imported from (utils.test_functions then)
TEMPLATE_TIER1 = '''
# Import test utilities from the cloned utils package
from nbtrain.legacy import (
    test_shape_robustness,
    test_gradient_flow,
    test_output_stability,
    test_parameter_initialization,
    test_memory_footprint,
    test_inference_speed
)

print("✅ Test functions loaded from utils package")

print("=" * 80)
print("TIER 1: CRITICAL VALIDATION")
print("=" * 80)
print()

# Test 1: Shape Robustness
print("Test 1/6: Shape Validation")
print("-" * 80)
shape_results = test_shape_robustness(model, config)
display(shape_results)
print()

# Test 2: Gradient Flow
print("Test 2/6: Gradient Flow Analysis")
print("-" * 80)
grad_results = test_gradient_flow(model, config)
display(grad_results)
print()

# Test 3: Output Stability
print("Test 3/6: Numerical Stability")
print("-" * 80)
stability_stats = test_output_stability(model, config, n_samples=100)
print()

# Test 4: Parameter Initialization
print("Test 4/6: Parameter Initialization")
print("-" * 80)
param_results = test_parameter_initialization(model)
display(param_results)
print()

# Test 5: Memory Footprint
print("Test 5/6: Memory Footprint Analysis")
print("-" * 80)
memory_results = test_memory_footprint(model, config)
display(memory_results)
print()

# Test 6: Inference Speed
print("Test 6/6: Inference Speed Benchmark")
print("-" * 80)
speed_stats = test_inference_speed(model, config, n_trials=50)
print()

print("=" * 80)
print("✅ TIER 1 VALIDATION COMPLETE")
print("=" * 80)
'''

# its tier 2 cell (the version with attribution), verbatim but for the import
TEMPLATE_TIER2 = '''
# Import Tier 2 test functions
from nbtrain.legacy import (
    test_attention_patterns,
    test_attribution_analysis,
    test_robustness
)

print("=" * 80)
print("TIER 2: ADVANCED ANALYSIS")
print("=" * 80)
print()

# Test 1: Attention Patterns
print("Test 1/3: Attention Pattern Analysis")
print("-" * 80)
try:
    attention_results = test_attention_patterns(model, config)
    if attention_results is not None:
        display(attention_results)
    print("✅ Attention analysis complete")
except Exception as e:
    print(f"⚠️ Attention analysis skipped: {e}")
print()

# Test 2: Attribution Analysis
print("Test 2/3: Input Attribution Analysis")
print("-" * 80)
try:
    attribution_results = test_attribution_analysis(model, config)
    if attribution_results is not None:
        print("\\nTop Contributing Tokens:")
        for token, score in attribution_results.get("top_tokens", []):
            print(f"  {token:20s}: {score:+.4f}")
    print("✅ Attribution analysis complete")
except Exception as e:
    print(f"⚠️ Attribution analysis skipped: {e}")
print()

# Test 3: Robustness Testing
print("Test 3/3: Robustness Under Noise")
print("-" * 80)
try:
    robustness_results = test_robustness(model, config, n_samples=20)
    if robustness_results is not None:
        display(robustness_results)
    print("✅ Robustness analysis complete")
except Exception as e:
    print(f"⚠️ Robustness analysis skipped: {e}")
print()
'''

def template_namespace(export:Path) -> dict:
    "What template.ipynb had before its test cells: the exported model built from config.json, and its ModelConfig."
    ns = {'config_dict': json.loads((export/'config.json').read_text()), 'shown': []}
    ns['display'] = ns['shown'].append
    exec((export/'model.py').read_text(), ns)
    torch.manual_seed(0)
    ns['model'] = ns['TinyLM'](**ns['config_dict'])
    exec(TEMPLATE_CONFIG, ns)
    return ns

def test_template_cells_run_verbatim_and_find_the_dead_block(capsys):
    import pandas as pd
    ns = template_namespace(FAULTY/'dead_block')
    with pytest.warns(DeprecationWarning) as rec:
        exec(TEMPLATE_TIER1, ns)
        exec(TEMPLATE_TIER2, ns)
    out = capsys.readouterr().out
    assert '✅ TIER 1 VALIDATION COMPLETE' in out and 'skipped' not in out, out[-2000:]
    for header in ('OUTPUT STABILITY ANALYSIS', 'INFERENCE SPEED BENCHMARK', 'ATTENTION PATTERN ANALYSIS', 'ROBUSTNESS TESTING',
                   '✅ Attention analysis complete', '✅ Attribution analysis complete', '✅ Robustness analysis complete'):
        assert header in out, header

    shapes, grads, params, memory = ns['shape_results'], ns['grad_results'], ns['param_results'], ns['memory_results']
    assert [type(x) for x in ns['shown']] == [pd.DataFrame] * 4 + [dict, dict]
    assert list(shapes.columns) == ['case', 'input_shape', 'output_shape', 'status']
    assert shapes.loc[0].tolist() == ['Single token', '(1, 1)', '(1, 1, 48)', '✅ PASS']
    assert 'Max length (32)' in shapes['case'].tolist() and 'Max batch (8), length 32' in shapes['case'].tolist()  # config's
    assert list(grads.columns) == ['parameter', 'grad_norm', 'grad_mean', 'grad_std', 'status']
    g = grads.set_index('parameter')
    assert set(g.loc[[p for p in g.index if '.mlp.' in p], 'status']) == {'❌ Near-zero (dead: zero gradient)'}  # the planted bug
    assert set(g.loc[[p for p in g.index if '.attn.' in p], 'status']) == {'✅'} and float(g.loc['head.weight', 'grad_norm']) > 0
    assert grads.attrs['nbtrain']['status'] == 'fail' and 'never learn' in grads.attrs['nbtrain']['explanation']
    assert set(ns['stability_stats']) >= {'mean', 'std', 'min', 'max', 'has_nan', 'has_inf', 'dynamic_range'}
    assert ns['stability_stats']['has_nan'] is False and ns['stability_stats']['std'] > 0
    assert list(params.columns) == ['parameter', 'shape', 'mean', 'std', 'min', 'max', 'status']
    assert params.set_index('parameter').loc['tok_emb.weight', 'shape'] == '(48, 32)'
    assert list(memory.columns)[:4] == ['batch_size', 'memory_mb', 'per_sample_mb', 'status'] and memory['batch_size'].tolist() == [1, 2, 4, 8, 16]
    speed = ns['speed_stats']
    assert set(speed) >= {'mean_ms', 'std_ms', 'median_ms', 'p95_ms', 'p99_ms', 'throughput_samples_per_sec'}
    assert speed['throughput_samples_per_sec'] == pytest.approx(1e3 / speed['mean_ms'])
    att, attr, rob = ns['attention_results'], ns['attribution_results'], ns['robustness_results']
    assert (att['num_layers'], att['input_length'], len(att['attention_entropy'])) == (2, 16, 2)
    assert len(attr['attribution_scores']) == len(attr['input_tokens']) == 16 and attr['target_position'] == 15
    assert 'Top Contributing Tokens:' in out and 'position 15 (id' in out
    assert set(rob) >= {'noise_levels', 'accuracy_under_noise', 'output_stability', 'prediction_flips'}
    assert len(rob['noise_levels']) == len(rob['accuracy_under_noise']) == len(rob['prediction_flips']) == 4

    msgs = [str(w.message) for w in rec if issubclass(w.category, DeprecationWarning)]
    checks = ['shapes', 'gradient_flow', 'output_stability', 'init_stats', 'memory', 'speed', 'attention', 'attribution', 'robustness']
    assert len(msgs) == len(checks)
    for m, c in zip(msgs, checks): assert f"use nbtrain.validate.run_checks(model, checks=['{c}']" in m, m


def test_run_all_tier1_tests_prints_the_template_sections_and_warns_once(capsys):
    from nbtrain.legacy import run_all_tier1_tests
    ns = template_namespace(FAULTY/'dead_block')
    with pytest.warns(DeprecationWarning) as rec:
        res = run_all_tier1_tests(ns['model'], ns['config'])
    lines = capsys.readouterr().out.split('\n')
    names = ['Shape Robustness', 'Gradient Flow', 'Output Stability', 'Parameter Initialization', 'Memory Footprint', 'Inference Speed']
    assert lines[:4] == ['', '=' * 60, 'RUNNING ALL TIER 1 TESTS', '=' * 60]
    assert [l for l in lines if l.startswith(('Running: ', '✅ ', '❌ ')) and not l.startswith('✅ PASS')] == \
           [x for n in names for x in (f"Running: {n}", f"✅ {n} completed")]
    assert [str(w.message) for w in rec if issubclass(w.category, DeprecationWarning)] == \
           ["run_all_tier1_tests is deprecated: use nbtrain.validate.run_checks(model, tiers=[1]) (tier 1 also checks causality, "
            "learning one batch and determinism)"]
    assert list(res) == ['shape_robustness', 'gradient_flow', 'output_stability', 'parameter_initialization', 'memory_footprint',
                         'inference_speed']
    assert res['gradient_flow'].attrs['nbtrain']['status'] == 'fail'


def test_faults_show_in_the_template_results(capsys):
    from nbtrain.legacy import test_output_stability, test_shape_robustness, run_all_tier2_tests
    with pytest.warns(DeprecationWarning):
        len1 = template_namespace(FAULTY/'fails_len1')
        shapes = test_shape_robustness(len1['model'], len1['config'])
        nan = template_namespace(FAULTY/'nan_output')
        stats = test_output_stability(nan['model'], nan['config'])
    assert shapes.loc[0, 'case'] == 'Single token' and shapes.loc[0, 'status'].startswith('❌ ERROR: ')
    assert shapes.loc[0, 'output_shape'] == 'N/A' and shapes.attrs['nbtrain']['status'] == 'fail'
    assert (shapes['status'] == '✅ PASS').sum() >= 4  # longer sequences work
    assert stats['has_nan'] is True and stats['nbtrain']['status'] == 'fail'
    assert 'Status: ❌ NaN/Inf in the logits' in capsys.readouterr().out

    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(VOCAB, 8)
        def forward(self, input_ids): raise RuntimeError('mat1 and mat2 shapes cannot be multiplied')
    with pytest.warns(DeprecationWarning):
        res = run_all_tier2_tests(Broken(), {'vocab_size': VOCAB})
    out = capsys.readouterr().out
    assert "❌ Attention Patterns failed: test_attention_patterns could not run nbtrain's 'attention' check" in out
    assert 'mat1 and mat2 shapes cannot be multiplied' in out and '✅ Attribution Analysis completed' in out  # the template's error dict
    assert 'error' in res['attribution_analysis'] and isinstance(res['robustness'], Exception)


class UnusedAndFrozen(nn.Module):
    "An unused layer and a frozen one."
    def __init__(self):
        super().__init__()
        self.emb, self.head, self.spare, self.frozen = nn.Embedding(VOCAB, 8), nn.Linear(8, VOCAB), nn.Linear(8, 8), nn.Linear(8, 8)
        self.frozen.requires_grad_(False)
    def forward(self, input_ids): return self.head(self.frozen(self.emb(input_ids)))

def test_every_config_form_is_accepted_and_max_seq_len_caps_the_lengths():
    from dataclasses import dataclass
    from types import SimpleNamespace
    from nbtrain.legacy import test_gradient_flow, test_shape_robustness
    @dataclass
    class ModelConfig:
        vocab_size: int = VOCAB
        max_seq_len: int = 16
    model = UnusedAndFrozen()
    with pytest.warns(DeprecationWarning):
        tables = [test_shape_robustness(model, c) for c in ({'vocab_size': VOCAB, 'max_seq_len': 16},
                  SimpleNamespace(vocab_size=VOCAB, max_seq_len=16), ModelConfig())]
        unbounded = test_shape_robustness(model, None)
        grads = test_gradient_flow(model, ModelConfig()).set_index('parameter')
    for t in tables:
        assert t.equals(tables[0]) and t['input_shape'].tolist()[-1] == '(16, 16)'  # length 16 at most, batch 16 by default
    assert '(1, 128)' in unbounded['input_shape'].tolist()  # no maximum known: twice the default length
    assert grads.loc['spare.weight', 'status'] == '❌ No gradient (unused)' and grads.loc['spare.weight', 'grad_norm'] == 'N/A'
    assert grads.loc['frozen.weight', 'status'] == '➖ Frozen (requires_grad=False)'
    assert grads.loc['head.weight', 'status'] == '✅' and float(grads.loc['head.weight', 'grad_norm']) > 0


def test_bad_check_arguments_and_what_no_longer_applies():
    from nbtrain.legacy import (test_attribution_analysis, test_gradient_flow, test_inference_speed, test_output_stability,
                                test_robustness, test_shape_robustness)
    model = gpt()
    for call, message in [
        (lambda: test_shape_robustness('gpt2', None), 'model is a builtins.str: give a torch nn.Module'),
        (lambda: test_shape_robustness(model, {'max_seq_len': 0}), 'config.max_seq_len=0 is not valid: give a whole number >= 1'),
        (lambda: test_gradient_flow(model, {'vocab_size': 'big'}), "config.vocab_size='big' is not valid"),
        (lambda: test_output_stability(model, None, n_samples=0), 'n_samples=0 is not valid'),
        (lambda: test_inference_speed(model, None, n_trials=2.5), 'n_trials=2.5 is not valid'),
        (lambda: test_robustness(model, None, noise_levels=[-1]), 'noise_levels=[-1] is not valid'),
        (lambda: test_attribution_analysis(model, None, target_idx=40), 'target_idx=40 is outside the 16 positions'),
        (lambda: test_attribution_analysis(model, None, input_ids=torch.tensor([1, 99])), 'input_ids[0] holds token id 99')]:
        with pytest.raises(LegacyArgumentError) as e: call()
        assert message in str(e.value), str(e.value)
    with pytest.warns(UserWarning) as rec:
        test_gradient_flow(model, None, adapter=object(), task_spec={'task_type': 'lm'})
        test_shape_robustness(model, None, task_spec='ocr')
    msgs = [str(w.message) for w in rec]
    assert any(m.startswith('test_gradient_flow: adapter=<object object') and 'no longer applies' in m for m in msgs)
    assert any("run_checks(model, checks=['gradient_flow'], task='causal_lm'" in m for m in msgs)  # the task_spec's task
    assert any(m.startswith("test_shape_robustness: task_spec='ocr' no longer applies") for m in msgs)


def test_fine_tuning_takes_the_template_later_arguments(tmp_path):
    import inspect
    sig = inspect.signature(test_fine_tuning).parameters
    assert sig['use_amp'].default is False and list(sig)[14:19] == ['use_lr_schedule', 'log_grad_dist_every', 'log_grad_histogram',
                                                                     'adapter', 'task_spec']
    with pytest.warns(UserWarning) as rec:
        res = test_fine_tuning(gpt(n_layer=1), {'vocab_size': VOCAB}, repetitive(20), None, 2, 1e-3, 0.01, 4, False, False, 1, 1.0,
                               0, False, False, 1, True, object(), {'task_type': 'classification'}, output_dir=tmp_path)
    later = [str(w.message) for w in rec if 'no longer applies' in str(w.message)]
    assert len(later) == 3 and 'log_grad_histogram=True' in later[0] and 'adapter=' in later[1]
    assert "task_spec={'task_type': 'classification'} no longer applies: test_fine_tuning trains next-token prediction" in later[2]
    assert res['metrics_summary']['learning_rate'].tolist() == [1e-3, 1e-3]  # use_lr_schedule=False: constant
    steps = [r['step'] for r in read_metrics(res['run_dir']) if any(k.startswith('grad_norm/') for k in r)]
    assert steps == [4, 8]  # log_grad_dist_every=1: per-layer norms every epoch (4 optimizer steps)
    assert (res['amp_enabled'], res['final_loss_scale']) == (False, None)
    for kw, message in [(dict(log_grad_dist_every=-1), 'log_grad_dist_every=-1 is not valid'),
                        (dict(log_grad_histogram=1), 'log_grad_histogram=1 is not valid: give True or False'),
                        (dict(use_lr_schedule=None), 'use_lr_schedule=None is not valid')]:
        with pytest.raises(LegacyArgumentError, match=message.replace('(', r'\(')):
            test_fine_tuning(gpt(), {'vocab_size': VOCAB}, repetitive(10), output_dir=tmp_path/'refused', **kw)
    assert not (tmp_path/'refused').exists()


def test_hyperparameter_search_takes_deterministic(tmp_path):
    with pytest.raises(LegacyArgumentError, match="deterministic='yes' is not valid: give True or False"):
        test_hyperparameter_search(lambda: gpt(n_layer=1), {'vocab_size': VOCAB}, deterministic='yes', output_dir=tmp_path)
    with pytest.warns(DeprecationWarning) as rec:
        res = test_hyperparameter_search(lambda: gpt(n_layer=1), {'vocab_size': VOCAB}, repetitive(10), n_trials=1,
                                         search_space={'batch_size': [4]}, random_seed=0, deterministic=True, output_dir=tmp_path)
    assert "'train.deterministic': True" in next(str(w.message) for w in rec if issubclass(w.category, DeprecationWarning))
    import yaml
    cfg = yaml.safe_load((res['study_dir']/'trials'/'trial-000'/'config.yaml').read_text())
    assert cfg['train']['deterministic'] is True


def test_attention_patterns_reads_the_text_through_the_tokenizer():
    from nbtrain.legacy import test_attention_patterns
    class Chars:
        "A tokenizer of the kind the template took: encode(text) -> token ids."
        def encode(self, text): return [ord(c) % VOCAB for c in text]
    with pytest.warns(DeprecationWarning, match=r"run_checks\(model, checks=\['attention'\], inputs=input_ids\)"):
        res = test_attention_patterns(gpt(), {'vocab_size': VOCAB}, 'hello world', Chars())
    assert (res['num_layers'], res['input_length'], len(res['attention_entropy'])) == (2, 11, 2)
    with pytest.raises(LegacyArgumentError, match="tokenizer is a str: give a tokenizer whose encode"):
        test_attention_patterns(gpt(), None, tokenizer='gpt2')
