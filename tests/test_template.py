"""template.ipynb run end to end by papermill, as a user (or a scheduled job) runs it: reference model and gist export."""
import json
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT/'template.ipynb'
SMALL = dict(batch_size=2, seq_len=32, overfit_steps=60, speed_seconds=0.2)

def run_template(tmp_path, monkeypatch, **params) -> tuple[dict, dict]:
    "Execute the template in `tmp_path` with `params`; return the saved report JSON and model_choice.json."
    pm = pytest.importorskip('papermill')
    monkeypatch.setenv('OMP_NUM_THREADS', '1')  # tiny models: one intra-op thread is faster and steady on a busy machine
    pm.execute_notebook(str(TEMPLATE), str(tmp_path/'out.ipynb'), parameters={**SMALL, **params}, cwd=str(tmp_path),
                        kernel_name='python3', progress_bar=False, execution_timeout=300)
    report = json.loads((tmp_path/'model_report'/'report.json').read_text())
    return report, json.loads((tmp_path/'model_choice.json').read_text())

def test_template_is_clean_and_parametrised():
    nb = json.loads(TEMPLATE.read_text())
    assert not any(c.get('outputs') or c.get('execution_count') for c in nb['cells'] if c['cell_type'] == 'code')
    tagged = [c for c in nb['cells'] if 'parameters' in c['metadata'].get('tags', [])]
    assert len(tagged) == 1, ("template.ipynb needs one cell tagged 'parameters' for papermill; nbdev-clean keeps cell tags "
                              "only with allowed_cell_metadata_keys = ['tags'] in [tool.nbdev]")
    src = ''.join(tagged[0]['source'])
    assert 'trust_code = False  #@param {type:"boolean"}' in src and "source = 'auto'" in src  # a checkbox, off
    assert "\ncolab_url = ''" in src and "\ngist = ''  #@param" in src

@pytest.mark.slow
def test_reference_gpt(tmp_path, monkeypatch):
    report, choice = run_template(tmp_path, monkeypatch, source='reference', reference='gpt', size='tiny')
    assert report['ok'] and report['counts'] == {'pass': 12}, report['counts']
    assert report['model']['model'] == 'GPT' and report['model']['task'] == 'causal_lm'
    assert {c['name'] for c in report['checks']} >= {'shapes', 'gradient_flow', 'overfit', 'attention', 'attribution'}
    for c in report['checks']:
        for f in c['figures']: assert (tmp_path/'model_report'/f).is_file()
    assert choice['config'] == {'model': {'name': 'gpt', 'size': 'tiny', 'kwargs': {}, 'max_seq_len': 256},
                                'task': {'name': 'causal_lm'}}
    assert choice['limits'] == {'max_seq_len': 256, 'vocab_size': report['model']['vocab_size']}
    assert choice['status'] == 'pass' and choice['source']['class'] == 'GPT'
    from nbtrain.config import load_config  # what training.ipynb will do with the choice
    cfg = load_config(overrides=choice['config'])
    assert (cfg.model.name, cfg.model.size, cfg.task.name) == ('gpt', 'tiny', 'causal_lm')

@pytest.mark.slow
def test_gist_export_folder(tmp_path, monkeypatch):
    folder = ROOT/'tests'/'fixtures'/'gist_gpt'
    report, choice = run_template(tmp_path, monkeypatch, source='files', model_dir=str(folder), trust_code=True)
    assert report['ok'], [(c['name'], c['status'], c['explanation']) for c in report['checks'] if c['status'] != 'pass']
    assert report['model']['model'] == 'TransformerModel' and report['model']['task'] == 'causal_lm'
    assert report['model']['source']['kind'] == 'file' and report['model']['max_len'] == 64
    by = {c['name']: c for c in report['checks']}
    assert by['attention']['numbers']['sources'] == ['softmax'] and by['attention']['numbers']['heads'] == 8
    assert by['causality']['status'] == 'pass'
    assert choice['config']['model'] == {'name': 'file', 'path': str(folder), 'trust_code': True, 'kwargs': {}, 'max_seq_len': 64}
    assert choice['limits']['max_seq_len'] == 64 and choice['source']['gist'] is None
    from nbtrain.config import load_config
    assert load_config(overrides=choice['config']).model.trust_code is True

@pytest.mark.slow
def test_untrusted_code_is_refused(tmp_path, monkeypatch):
    pm = pytest.importorskip('papermill')
    with pytest.raises(pm.PapermillExecutionError, match=r'tick trust_code \(trust_code=True\)'):
        run_template(tmp_path, monkeypatch, source='files', model_dir=str(ROOT/'tests'/'fixtures'/'gist_gpt'))
    assert not (tmp_path/'model_choice.json').exists()

@pytest.mark.slow
def test_hub_model(tmp_path, monkeypatch):
    "source='hf:org/name': the model is downloaded from (a stand-in for) the Hub and checked; the choice pins its commit."
    transformers = pytest.importorskip('transformers')
    from huggingface_hub import HfApi
    from hubserver import HubServer
    token = 'hf_template_token_0123456789'
    with HubServer(tokens={token: 'alice'}) as hub:
        api = HfApi(endpoint=hub.url, token=token)
        api.create_repo('alice/tiny-gpt2')
        transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=128, n_positions=64)
                                     ).save_pretrained(tmp_path/'upload')
        commit = api.upload_folder(repo_id='alice/tiny-gpt2', folder_path=str(tmp_path/'upload')).oid
        for k in ('HF_TOKEN', 'HUGGING_FACE_HUB_TOKEN', 'HF_HUB_OFFLINE'): monkeypatch.delenv(k, raising=False)
        monkeypatch.setenv('HF_ENDPOINT', hub.url)
        monkeypatch.setenv('HF_HUB_CACHE', str(tmp_path/'hf-cache'))
        monkeypatch.setenv('HF_HUB_DISABLE_TELEMETRY', '1')
        report, choice = run_template(tmp_path, monkeypatch, source='hf:alice/tiny-gpt2')
        assert any(r.kind == 'resolve' and r.method == 'GET' and 'model.safetensors' in r.path for r in hub.state.requests)
    assert report['model']['model'] == 'GPT2LMHeadModel' and report['model']['task'] == 'causal_lm'
    assert report['model']['source']['hub_id'] == 'alice/tiny-gpt2' and report['model']['source']['pretrained'] is True
    assert {c['name'] for c in report['checks']} >= {'shapes', 'gradient_flow', 'overfit', 'attention'}
    assert not [c['name'] for c in report['checks'] if c['status'] == 'error'], report['checks']
    assert choice['config']['model'] == {'name': 'hf', 'path': 'alice/tiny-gpt2', 'kwargs': {}, 'revision': commit, 'max_seq_len': 64}
    from nbtrain.config import load_config
    cfg = load_config(overrides=choice['config'])
    assert (cfg.model.name, cfg.model.path, cfg.model.revision) == ('hf', 'alice/tiny-gpt2', commit)
    with pytest.raises(pytest.importorskip('papermill').PapermillExecutionError, match='is not a Hub model id'):
        run_template(tmp_path, monkeypatch, source='hf', hf_model='hf:alice/tiny gpt2')
