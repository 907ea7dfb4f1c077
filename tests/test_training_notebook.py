"""training.ipynb run by papermill as a user (or a scheduled job) runs it: a run folder on a stand-in Google Drive
with everything DESIGN.md promises, W&B offline, an export; and after a disconnect (the kernel killed mid-run), the
same notebook run again resumes the run: same step counter, same W&B run id."""
import json, os, subprocess, sys, time
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parent.parent
NB = ROOT/'training.ipynb'
TINY = {'data.corpus_size': 80, 'data.seq_len': 32, 'train.micro_batch_size': 4, 'train.eval_every': 6,
        'train.eval_batches': 2, 'train.log_every': 2, 'checkpoint.every_steps': 4}

def _env(tmp_path) -> dict:
    drive = tmp_path/'drive'; drive.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ('WANDB_API_KEY', 'HF_TOKEN')}
    # one intra-op thread: tiny models run faster and steadier on a busy 2-core machine
    return {**env, 'NBTRAIN_DRIVE': str(drive), 'OMP_NUM_THREADS': '1', 'WANDB_SILENT': 'true'}

def _params(**kw) -> dict:
    return {'train_now': True, 'use_wandb': True, 'max_steps': 12, 'overrides': TINY, **kw}

def run_notebook(tmp_path, monkeypatch, **params):
    pm = pytest.importorskip('papermill')
    for k, v in _env(tmp_path).items(): monkeypatch.setenv(k, v)
    monkeypatch.delenv('WANDB_API_KEY', raising=False)
    out = tmp_path/f'out-{len(list(tmp_path.glob("out-*")))}.ipynb'
    pm.execute_notebook(str(NB), str(out), parameters=_params(**params), cwd=str(tmp_path), kernel_name='python3',
                        progress_bar=False, execution_timeout=300)
    return json.loads(out.read_text())

def outputs_text(nb:dict) -> str:
    parts = []
    for c in nb['cells']:
        for o in c.get('outputs', []):
            for t in (o.get('text'), *o.get('data', {}).values()):
                if t: parts.append(t if isinstance(t, str) else ''.join(t) if isinstance(t, list) else '')
    return '\n'.join(parts)

def wandb_ids(run_dir:Path) -> list[str]:
    return sorted(p.name.rsplit('-', 1)[-1] for p in (run_dir/'wandb').glob('offline-run-*'))

def test_notebook_is_clean_and_parametrised():
    nb = json.loads(NB.read_text())
    assert not any(c.get('outputs') or c.get('execution_count') for c in nb['cells'] if c['cell_type'] == 'code')
    tagged = [c for c in nb['cells'] if 'parameters' in c['metadata'].get('tags', [])]
    assert len(tagged) == 1
    src = ''.join(tagged[0]['source'])
    for name in ('run_name', 'preset', 'use_drive', 'use_wandb', 'overrides', 'train_now'): assert f'\n{name} = ' in '\n' + src
    pip = [''.join(c['source']) for c in nb['cells'] if c['cell_type'] == 'code' and "'pip'" in ''.join(c['source'])]
    assert len(pip) == 1 and "pip_install(f'nbtrain[train]>={nbtrain_version}')" in pip[0]
    assert not any(w in pip[0] for w in ('torch', 'numpy', '--upgrade', '-U'))  # never replaces Colab's torch or numpy
    # running the cell in a fresh environment, from an index and from the release tag: tests/test_install_cells.py

@pytest.mark.slow
def test_trains_on_drive_with_the_run_folder_contract(tmp_path, monkeypatch):
    nb = run_notebook(tmp_path, monkeypatch, export_formats=['torchscript'], generate_prompt='Once upon a time', generate_tokens=12)
    run = tmp_path/'drive'/'nbtrain'/'runs'/'my-run'
    for name in ('config.yaml', 'metrics.jsonl', 'env.json', 'dashboard.png', 'final/model.safetensors', 'final/config.json',
                 'tokenizer', 'export/model.pt', 'export/metadata.json', 'samples.jsonl'):
        assert (run/name).exists(), name
    assert sorted(p.name for p in (run/'checkpoints').glob('*/manifest.json')) and \
           (run/'checkpoints'/'step-000000012'/'manifest.json').exists()
    rows = [json.loads(l) for l in (run/'metrics.jsonl').read_text().splitlines()]
    evals = [r for r in rows if 'val_loss' in r]
    assert [r['step'] for r in evals] == [0, 6, 12] and evals[-1]['val_loss'] < evals[0]['val_loss']
    assert len(wandb_ids(run)) == 1
    text = outputs_text(nb)
    assert 'No GPU' in text and 'Runs folder' in text  # the device, in plain words, and where runs go
    assert 'Press Train' not in text
    samples = [json.loads(l) for l in (run/'samples.jsonl').read_text().splitlines()]
    assert sorted({r['step'] for r in samples}) == [0, 6, 12] and len(samples) == 9  # three prompts at every evaluation
    assert 'samples at step 12' in text and 'samples at step 0' in text  # the results show the first and the last
    assert '\x1b[1mOnce upon a time\x1b[0m' in text  # the generation cell: the prompt, then the model's text

def _newest_manifest_step(run:Path) -> int:
    steps = []
    for m in (run/'checkpoints').glob('step-*/manifest.json'):  # complete ones: a write in progress is in a .tmp-* folder
        try: steps.append(json.loads(m.read_text())['step'])
        except (ValueError, KeyError, OSError): pass
    return max(steps, default=0)

@pytest.mark.slow
def test_run_again_after_a_disconnect_resumes(tmp_path, monkeypatch):
    "The kernel is killed mid-training (as when Colab disconnects); the same notebook run again continues the run."
    psutil = pytest.importorskip('psutil')
    params = _params(max_steps=300, overrides={**TINY, 'train.eval_every': 100, 'checkpoint.every_steps': 5})
    script = (f"import papermill as pm, json, sys\n"
              f"pm.execute_notebook({str(NB)!r}, {str(tmp_path/'cut.ipynb')!r}, parameters=json.loads(sys.argv[1]),"
              f" cwd={str(tmp_path)!r}, kernel_name='python3', progress_bar=False)\n")
    p = subprocess.Popen([sys.executable, '-c', script, json.dumps(params)], env=_env(tmp_path),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = tmp_path/'drive'/'nbtrain'/'runs'/'my-run'
    t0 = time.monotonic()
    try:
        while _newest_manifest_step(run) < 10:
            assert p.poll() is None, 'the first run ended before it could be cut off'
            assert time.monotonic() - t0 < 240, 'no checkpoint appeared'
            time.sleep(0.05)
    finally:
        procs = psutil.Process(p.pid).children(recursive=True) + [psutil.Process(p.pid)]
        for q in procs:  # the kernel (its own session) and papermill, at once: a disconnect, not a clean stop
            try: q.kill()
            except psutil.NoSuchProcess: pass
        p.wait(30)
    cut_at = _newest_manifest_step(run)
    assert 10 <= cut_at < 300 and not (run/'final').exists(), cut_at
    first_id = wandb_ids(run)
    assert len(first_id) == 1

    nb = run_notebook(tmp_path, monkeypatch, max_steps=300, overrides=params['overrides'])  # the same notebook, run again
    text = outputs_text(nb)
    assert "Run 'my-run' is in the runs folder (resumable from step" in text
    assert 'Resumed from' in text and f'at step {cut_at}' in text
    steps = [json.loads(l)['step'] for l in (run/'metrics.jsonl').read_text().splitlines() if 'loss' in json.loads(l)]
    assert steps == sorted(set(steps)) and steps[-1] == 300  # one counter, each step once, no restart from 0
    assert steps[0] < cut_at  # the rows of the first session are kept
    ids = wandb_ids(run)
    assert set(ids) == set(first_id), ids  # the W&B run goes on under the same id

@pytest.mark.slow
def test_fine_tunes_a_hub_model_with_lora_from_the_form(tmp_path, monkeypatch):
    "model='hf:org/name' (a stand-in Hub on 127.0.0.1) and lora=True: the form trains adapters; final/adapter is peft's format."
    pytest.importorskip('peft')
    from huggingface_hub import HfApi
    from hubserver import HubServer
    from test_finetune_template import tiny_gpt2_with_tokenizer
    tiny_gpt2_with_tokenizer(tmp_path/'upload')
    token = 'hf_training_token_0123456789'
    with HubServer(tokens={token: 'alice'}) as hub:
        api = HfApi(endpoint=hub.url, token=token)
        api.create_repo('alice/tiny-gpt2')
        api.upload_folder(repo_id='alice/tiny-gpt2', folder_path=str(tmp_path/'upload'))
        monkeypatch.setenv('HF_ENDPOINT', hub.url)
        monkeypatch.setenv('HF_HUB_CACHE', str(tmp_path/'hf-cache'))
        monkeypatch.setenv('HF_HUB_DISABLE_TELEMETRY', '1')
        monkeypatch.delenv('HF_HUB_OFFLINE', raising=False)
        nb = run_notebook(tmp_path, monkeypatch, model='hf:alice/tiny-gpt2', lora=True, use_wandb=False, max_steps=4,
                          overrides={**TINY, 'train.eval_every': 4, 'checkpoint.every_steps': 2, 'data.seq_len': 64})
    run = tmp_path/'drive'/'nbtrain'/'runs'/'my-run'
    assert (run/'final'/'adapter'/'adapter_config.json').is_file() and (run/'final'/'adapter'/'adapter_model.safetensors').is_file()
    info = json.loads((run/'model.json').read_text())
    assert info['hub_id'] == 'alice/tiny-gpt2' and info['lora']
    text = outputs_text(nb)
    assert "model.name='hf', model.path='alice/tiny-gpt2'" in text and "'enabled': True" in text
    assert 'LoRA on (your choice): tiny-gpt2 has' in text
