"""The ready notebooks of colab_templates/ run end to end by papermill, as a person runs them in Colab, with small
settings: each leaves the run folder that DESIGN.md promises ("The run folder is the contract") and does its task's
demo. Also: a run on a stand-in Google Drive, running a notebook again continues its run, the users' own data paths
(a Hugging Face checkpoint folder, a JSONL file, an image folder on Drive), and the notebooks are stored clean."""
import json
from pathlib import Path
import pytest
import yaml
from nbtrain.checkpoint import verify_checkpoint

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = ROOT/'colab_templates'
NOTEBOOKS = ('language_model', 'text_classification', 'image_classification', 'finetune_pretrained', 'ner')
FAKE_TOKEN = 'hf_notarealtoken0123456789'  # setup_notebook finds it; it must not reach a run folder or the notebook
PNG = b'\x89PNG\r\n\x1a\n'
TINY = dict(preset='tiny-cpu', size='tiny', use_drive=False, use_wandb=False)
LM = dict(TINY, max_steps=30, micro_batch_size=8, seq_len=64, lr=3e-3, eval_every=15, max_new_tokens=60,
          overrides={'data.corpus_size': 200, 'train.eval_batches': 4})
TEXT = dict(TINY, max_steps=80, micro_batch_size=16, seq_len=64, lr=3e-3, eval_every=40)
IMAGE = dict(TINY, max_steps=100, micro_batch_size=32, lr=3e-3, eval_every=50)


def run_notebook(name:str, tmp_path:Path, monkeypatch, **params):
    "Execute `colab_templates/<name>.ipynb` in `tmp_path` with `params`; returns the executed notebook."
    pm = pytest.importorskip('papermill')
    monkeypatch.setenv('OMP_NUM_THREADS', '1')  # tiny models: one intra-op thread is faster and steady on a busy machine
    monkeypatch.setenv('NBTRAIN_CACHE_DIR', str(tmp_path/'cache'))
    monkeypatch.setenv('HF_TOKEN', FAKE_TOKEN)
    for k in ('HF_HUB_OFFLINE', 'HF_DATASETS_OFFLINE', 'TRANSFORMERS_OFFLINE'): monkeypatch.setenv(k, '1')
    for k in ('NBTRAIN_FAKE_COLAB', 'COLAB_RELEASE_TAG'): monkeypatch.delenv(k, raising=False)
    out = tmp_path/f"{name}-{params.get('run_name', 'run')}.out.ipynb"
    nb = pm.execute_notebook(str(TEMPLATES/f'{name}.ipynb'), str(out), parameters=params, cwd=str(tmp_path),
                             kernel_name='python3', progress_bar=False, execution_timeout=300)
    assert FAKE_TOKEN not in out.read_text(), "a secret's value was shown in the notebook"
    return nb


def cell(nb, starts:str):
    "The code cell whose source starts with `starts`."
    return next(c for c in nb.cells if c.cell_type == 'code' and c.source.startswith(starts))

def printed(nb, starts:str) -> str:
    "What that cell printed."
    return ''.join(o.get('text', '') for o in cell(nb, starts).outputs if o.output_type == 'stream' and o.name == 'stdout')

def shown(nb, starts:str) -> str:
    "What that cell displayed as Markdown."
    return ''.join(o.get('data', {}).get('text/markdown', '') for o in cell(nb, starts).outputs)


def check_run_folder(run:Path, cwd:Path, tokenizer:bool=True) -> list[dict]:
    "The run folder holds what DESIGN.md promises (`cwd`: where the notebook ran); returns the rows of metrics.jsonl."
    assert run.is_dir(), f"no run folder at {run}"
    cfg = yaml.safe_load((run/'config.yaml').read_text())
    assert cfg['name'] == run.name and (cwd/cfg['output_dir']).resolve() == run.parent.resolve(), cfg['output_dir']
    rows = [json.loads(l) for l in (run/'metrics.jsonl').read_text().splitlines() if l.strip()]
    assert any('loss' in r for r in rows) and any('val_loss' in r for r in rows), rows
    steps = [r['step'] for r in rows if 'loss' in r]
    assert steps == sorted(set(steps)), f"training rows repeat or go back: {steps}"
    ckpts = sorted((run/'checkpoints').glob('step-*'))
    assert ckpts and verify_checkpoint(ckpts[-1]) is None, [verify_checkpoint(c) for c in ckpts]
    assert (run/'final'/'model.safetensors').stat().st_size > 1000
    final = json.loads((run/'final'/'nbtrain.json').read_text())
    assert final['task'] == cfg['task']['name'] and final['run_config']['name'] == run.name
    assert (run/'final'/'tokenizer.json').is_file() == tokenizer
    env = json.loads((run/'env.json').read_text())
    assert env['packages']['nbtrain'] and env['torch']['version'] and 'gpus' in env and 'git' in env
    assert (run/'dashboard.png').read_bytes()[:8] == PNG
    for p in run.rglob('*'):
        if p.is_file(): assert FAKE_TOKEN.encode() not in p.read_bytes(), f"a secret was written to {p}"
    return rows


def evals(rows:list[dict]) -> list[dict]: return [r for r in rows if 'val_loss' in r]


# --- the default data of each notebook, tiny settings ---------------------------------------------------------------

@pytest.mark.slow
def test_language_model(tmp_path, monkeypatch):
    nb = run_notebook('language_model', tmp_path, monkeypatch, run_name='lm', **LM)
    assert '**HF_TOKEN**: found in environment' in shown(nb, 'env = setup_notebook')
    rows = check_run_folder(tmp_path/'runs'/'lm', tmp_path)
    ev = evals(rows)
    assert [r['step'] for r in ev] == [0, 15, 30] and 'val_ppl' in ev[-1]
    assert ev[-1]['val_loss'] < 0.8 * ev[0]['val_loss'], ev
    text = printed(nb, 'text = generate(').strip()
    assert text.startswith('Once upon a time') and len(text) > len('Once upon a time'), text


@pytest.mark.slow
def test_text_classification(tmp_path, monkeypatch):
    nb = run_notebook('text_classification', tmp_path, monkeypatch, run_name='reviews', **TEXT)
    ev = evals(check_run_folder(tmp_path/'runs'/'reviews', tmp_path))
    assert [r['step'] for r in ev] == [0, 40, 80]
    last = ev[-1]
    assert last['val_acc'] > 0.5, last  # three balanced classes: guessing gets a third
    assert 0 < last['val_f1_macro'] <= 1 and len(last['val_confusion']) == 3
    assert sum(map(sum, last['val_confusion'])) == 300  # every evaluation covers the whole validation split
    predictions = printed(nb, 'for text, p in zip(examples').splitlines()
    assert len(predictions) == 3 and all(l.split()[0] in ('negative', 'neutral', 'positive') for l in predictions), predictions


@pytest.mark.slow
def test_image_classification(tmp_path, monkeypatch):
    nb = run_notebook('image_classification', tmp_path, monkeypatch, run_name='digits', **IMAGE)
    ev = evals(check_run_folder(tmp_path/'runs'/'digits', tmp_path, tokenizer=False))
    last = ev[-1]
    assert last['val_acc'] > 0.25, last  # ten classes: guessing gets a tenth
    assert len(last['val_confusion']) == 10 and sum(map(sum, last['val_confusion'])) == 180
    data = json.loads((tmp_path/'runs'/'digits'/'final'/'data.json').read_text())
    assert data['image_size'] == 8 and data['label_names'] == [str(k) for k in range(10)]
    grid = cell(nb, 'data = build_data(')
    assert any('image/png' in o.get('data', {}) for o in grid.outputs), 'the grid of predictions was not drawn'


# --- Drive, running again, the users' own data --------------------------------------------------------------------

@pytest.mark.slow
def test_on_drive_and_running_again_continues_the_run(tmp_path, monkeypatch):
    """The run folder lands on (a stand-in for) Google Drive; the same notebook run again with the same run_name, as after
    a disconnect, continues that run from its checkpoint (here told to go on for more steps)."""
    drive = tmp_path/'MyDrive'
    drive.mkdir()
    monkeypatch.setenv('NBTRAIN_DRIVE', str(drive))
    params = dict(LM, use_drive=True, run_name='on-drive', overrides={**LM['overrides'], 'checkpoint.every_steps': 10})
    nb = run_notebook('language_model', tmp_path, monkeypatch, **dict(params, max_steps=20, eval_every=10))
    run = drive/'nbtrain'/'runs'/'on-drive'
    assert 'new run' in printed(nb, "if data_source == 'upload'")
    assert check_run_folder(run, tmp_path) and not (tmp_path/'runs').exists()
    nb = run_notebook('language_model', tmp_path, monkeypatch, **dict(params, max_steps=40, eval_every=10))
    assert 'on-drive: training continues from its checkpoint at step 20' in printed(nb, "if data_source == 'upload'")
    assert 'at step 20' in printed(nb, 'result = train(cfg)').split('Resumed from')[1]
    ev = evals(check_run_folder(run, tmp_path))
    assert [r['step'] for r in ev] == [0, 10, 20, 30, 40]
    assert ev[-1]['val_loss'] < ev[2]['val_loss'] < ev[0]['val_loss']


@pytest.mark.slow
def test_fine_tune_a_hugging_face_checkpoint_folder(tmp_path, monkeypatch):
    "model_name='hf' with a save_pretrained folder: its weights and its own tokenizer are used, and it writes text."
    transformers = pytest.importorskip('transformers')
    from nbtrain.embedded import embedded_corpus
    from nbtrain.tokenizer import BPETokenizer
    folder = tmp_path/'my-gpt2'
    bpe = BPETokenizer.train(embedded_corpus(200).split('\n\n'), vocab_size=400)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe.tok, eos_token='<eos>', pad_token='<pad>', unk_token='<unk>')
    tok.save_pretrained(folder)
    cfg = transformers.GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=64, n_layer=2, n_head=2,
                                  eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(folder)
    nb = run_notebook('language_model', tmp_path, monkeypatch, run_name='hf', **dict(LM, model_name='hf', model_path=str(folder)))
    run = tmp_path/'runs'/'hf'
    ev = evals(check_run_folder(run, tmp_path))
    assert ev[-1]['val_loss'] < ev[0]['val_loss']
    model = json.loads((run/'model.json').read_text())
    assert model['kind'] == 'hf' and model['pretrained'] is True and model['source'] == str(folder)
    data = json.loads((run/'data.json').read_text())
    assert data['tokenizer'] == str(folder) and data['tokenizer_type'] == 'hf'
    text = printed(nb, 'text = generate(').strip()
    assert text.startswith('Once upon a time') and len(text) > len('Once upon a time'), text


@pytest.mark.slow
def test_text_classification_on_a_jsonl_file(tmp_path, monkeypatch):
    "The user's own file: text in a 'review' column, labels as names."
    src = ROOT/'tests'/'fixtures'/'data'/'reviews.jsonl'
    nb = run_notebook('text_classification', tmp_path, monkeypatch, run_name='mine',
                      **dict(TEXT, data_source=str(src), max_steps=10, eval_every=5, overrides={'data.val_fraction': 0.2}))
    run = tmp_path/'runs'/'mine'
    check_run_folder(run, tmp_path)
    data = json.loads((run/'data.json').read_text())
    assert data['text_column'] == 'review' and data['label_names'] == ['negative', 'neutral', 'positive']
    assert data['n_train'] + data['n_val'] == 60 and data['n_val'] == 12
    assert len(printed(nb, 'for text, p in zip(examples').splitlines()) == 3


@pytest.mark.slow
def test_image_folder_on_drive(tmp_path, monkeypatch):
    "An image folder (one subfolder per class) given as drive:PATH, resized by image_size; my_images are classified."
    from nbtrain.embedded import digits_images, save_image_folder
    drive = tmp_path/'MyDrive'
    x, y = digits_images()
    save_image_folder(drive/'shapes', x[:120], y[:120] % 3, names=['a', 'b', 'c'], size=12, mode='RGB')
    mine = sorted((drive/'shapes'/'b').iterdir())[:2]
    monkeypatch.setenv('NBTRAIN_DRIVE', str(drive))
    nb = run_notebook('image_classification', tmp_path, monkeypatch, run_name='shapes',
                      **dict(IMAGE, data_source='drive:shapes', image_size=16, max_steps=10, eval_every=5,
                             my_images=[str(p) for p in mine]))
    run = tmp_path/'runs'/'shapes'  # use_drive=False: the data is on Drive, the runs are local
    check_run_folder(run, tmp_path, tokenizer=False)
    data = json.loads((run/'final'/'data.json').read_text())
    assert (data['image_size'], data['num_channels'], data['label_names']) == (16, 3, ['a', 'b', 'c'])
    lines = printed(nb, 'transform = ImageTransform(').splitlines()
    assert len(lines) == 2 and all(l.split()[0] in ('a', 'b', 'c') and l.endswith(p.name) for l, p in zip(lines, mine)), lines


# --- stored clean ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', NOTEBOOKS)
def test_notebook_is_clean_and_parametrised(name):
    path = TEMPLATES/f'{name}.ipynb'
    nb = json.loads(path.read_text())
    code = [c for c in nb['cells'] if c['cell_type'] == 'code']
    assert not any(c.get('outputs') or c.get('execution_count') for c in code), f"{path.name} has outputs: nbdev-clean --fname {path}"
    tagged = [c for c in nb['cells'] if 'parameters' in c['metadata'].get('tags', [])]
    assert len(tagged) == 1, f"{path.name} needs exactly one cell tagged 'parameters' for papermill"
    params = ''.join(tagged[0]['source'])
    for v in ('run_name', 'preset = None', 'max_steps', 'micro_batch_size', 'lr', 'use_drive = True', 'use_wandb = False', 'overrides = {}'):
        assert v in params, f"{path.name}: the parameters cell has no {v!r}"
    src = ''.join(''.join(c['source']) for c in nb['cells'])
    badge = f'https://colab.research.google.com/github/nbtrain/nbtrain/blob/main/colab_templates/{name}.ipynb'
    assert badge in src and 'setup_notebook(drive=use_drive)' in src and "'nbtrain[train]'" in src
    assert "find_spec('nbtrain') is None" in src, "the setup cell must install nbtrain only where it is missing"
    assert not any(w in src for w in ('--upgrade', ' -U ', 'install torch', 'install numpy')), "never replace Colab's torch or numpy"
