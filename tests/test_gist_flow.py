"""Open in Colab from a gist, end to end and offline: template.ipynb opened with Transformer Builder's link
(`?gist_id=...`) fetches the gist from a stand-in gist API, shows its code, checks the model once `trust_code` is
ticked, and ends with a link to training.ipynb carrying the gist, its revision and the checked limits; training.ipynb
opened with that link trains the same revision without being told a sequence length. Without `trust_code` both stop
with one line and run none of the gist's code."""
import html, json, re
from pathlib import Path
import pytest
from gistserver import GistServer
from nbtrain.gist import url_params

ROOT = Path(__file__).resolve().parent.parent
EXPORTS = ROOT/'tests'/'fixtures'/'tb_exports'
PAGE = 'https://colab.research.google.com/github/nbtrain/nbtrain/blob/main/template.ipynb'
CHECKS = dict(tiers=[1], batch_size=2, seq_len=64, overfit_steps=30, speed_seconds=0.1)
TRAIN = {'train_now': True, 'use_drive': False, 'use_wandb': False, 'max_steps': 4,
         'overrides': {'data.corpus_size': 60, 'train.micro_batch_size': 4, 'train.eval_every': 4, 'train.eval_batches': 1,
                       'train.log_every': 2, 'checkpoint.every_steps': 4}}  # no data.seq_len: the model's limit decides
MARKER = "from pathlib import Path; Path('model_code_ran').write_text('yes')  # planted by the test\n"

@pytest.fixture
def gists(monkeypatch):
    "The stand-in gist API, and the notebooks' kernels pointed at it."
    with GistServer() as srv:
        monkeypatch.setenv('NBTRAIN_GIST_API', srv.api)
        monkeypatch.setenv('OMP_NUM_THREADS', '1')  # tiny models: one intra-op thread is faster and steady on a busy machine
        for k in ('NBTRAIN_GIST_ID', 'NBTRAIN_MODEL_NAME', 'NBTRAIN_GIST_REVISION', 'GITHUB_TOKEN', 'GH_TOKEN', 'NBTRAIN_DRIVE',
                  'WANDB_API_KEY', 'HF_TOKEN'):
            monkeypatch.delenv(k, raising=False)
        yield srv

def execute(nb:str, cwd:Path, **params) -> dict:
    "Run the notebook `nb` of the repository in `cwd` with papermill; the executed notebook (also when it failed)."
    pm = pytest.importorskip('papermill')
    cwd.mkdir(parents=True, exist_ok=True)
    out = cwd/f'{Path(nb).stem}-out.ipynb'
    try: pm.execute_notebook(str(ROOT/nb), str(out), parameters=params, cwd=str(cwd), kernel_name='python3', progress_bar=False,
                             execution_timeout=300)
    except pm.PapermillExecutionError as e:
        e.notebook = json.loads(out.read_text())
        raise
    return json.loads(out.read_text())

def outputs(nb:dict, kind:str|None=None) -> str:
    "The text of every output of `nb` (only of the MIME type `kind`, if given)."
    parts = []
    for c in nb['cells']:
        for o in c.get('outputs', []):
            items = {'text/plain': o.get('text'), **o.get('data', {})} if kind is None else {kind: o.get('data', {}).get(kind)}
            parts += [''.join(t) if isinstance(t, list) else t for t in items.values() if isinstance(t, (str, list))]
    return '\n'.join(parts)

def errors(nb:dict) -> list[dict]: return [o for c in nb['cells'] for o in c.get('outputs', []) if o['output_type'] == 'error']

def planted(export:str) -> dict:
    "The files of an export, its model.py leaving a file behind when it runs."
    files = {p.name: p.read_text() for p in (EXPORTS/export).iterdir() if p.is_file()}
    return {**files, 'model.py': MARKER + files['model.py']}

@pytest.mark.slow
@pytest.mark.parametrize('export,max_len,repo', [('flat_lm', 32, 'nbtrain/nbtrain/blob/main'),
                                                  ('graph_lm', 64, 'someone/fork/blob/dev')])  # a fork's notebook links to the fork
def test_from_the_builder_link_to_a_trained_run(export, max_len, repo, gists, tmp_path):
    gid = gists.add_gist(EXPORTS/export)
    # the template, opened from Transformer Builder's link: the gist is the source without being named anywhere else
    page = f'https://colab.research.google.com/github/{repo}/template.ipynb?gist_id={gid}'
    nb = execute('template.ipynb', tmp_path/'check', colab_url=page, trust_code=True, **CHECKS)
    report = json.loads((tmp_path/'check'/'model_report'/'report.json').read_text())
    assert report['model']['source']['kind'] == 'file', report['model']
    assert {c['name'] for c in report['checks']} >= {'shapes', 'causality', 'gradient_flow'}
    choice = json.loads((tmp_path/'check'/'model_choice.json').read_text())
    record = json.loads((tmp_path/'check'/'gists'/gid/'gist.json').read_text())
    assert choice['limits']['max_seq_len'] == max_len and choice['config']['model']['max_seq_len'] == max_len
    assert choice['config']['model']['name'] == 'file' and choice['source']['gist'] == gid
    assert choice['source']['revision'] == record['revision'] and choice['limits']['vocab_size']
    assert f'sha256 `{record["files"]["model.py"]["sha256"]}`' in outputs(nb)  # the code was shown
    printed = re.findall(r'Train it in training\.ipynb: (\S+)', outputs(nb))
    assert len(printed) == 1, outputs(nb)
    link = printed[0]
    assert link.startswith(f'https://colab.research.google.com/github/{repo}/training.ipynb#')
    assert f'href="{html.escape(link)}"' in outputs(nb, 'text/html')  # the same link, as an anchor to click
    got = url_params(link)
    assert (got['gist_id'], got['revision'], got['max_seq_len'], got['vocab_size']) == \
           (gid, record['revision'], str(max_len), str(choice['limits']['vocab_size']))

    # the gist changes after the check: training gets the revision that was checked
    gists.update_gist(gid, {'model.py': "raise RuntimeError('a newer revision than the one checked')\n"})
    nb = execute('training.ipynb', tmp_path/'train', colab_url=link, trust_code=True, **TRAIN)
    run = tmp_path/'train'/'runs'/'my-run'
    assert (run/'final'/'model.safetensors').is_file() and (run/'final'/'model.py').is_file()
    assert (run/'final'/'model.py').read_text() == (EXPORTS/export/'model.py').read_text()
    import yaml
    cfg = yaml.safe_load((run/'config.yaml').read_text())
    assert cfg['model']['name'] == 'file' and cfg['model']['max_seq_len'] == max_len
    assert Path(cfg['model']['path']) == (tmp_path/'train'/'gists'/gid).resolve()
    assert 2 <= cfg['data']['seq_len'] <= max_len, cfg['data']
    steps = [json.loads(l)['step'] for l in (run/'metrics.jsonl').read_text().splitlines() if 'loss' in json.loads(l)]
    assert steps[-1] == TRAIN['max_steps']
    assert any(r.path == f"/gists/{gid}/{record['revision']}" for r in gists.requests)

@pytest.mark.slow
def test_without_trust_code_nothing_of_the_gist_runs(gists, tmp_path, monkeypatch):
    pm = pytest.importorskip('papermill')
    gid = gists.add_gist(planted('flat_lm'))
    with pytest.raises(pm.PapermillExecutionError) as e:  # the link's other form: a fragment with the model's name
        execute('template.ipynb', tmp_path/'check', colab_url=f'{PAGE}#gist_id={gid}&name=my-tiny-lm', **CHECKS)
    (err,) = errors(e.value.notebook)
    assert len(err['traceback']) == 1 and 'tick trust_code' in err['traceback'][0], err  # one line, no traceback wall
    assert 'planted by the test' in outputs(e.value.notebook)  # the code to read was shown
    assert (tmp_path/'check'/'gists'/gid/'model.py').is_file()
    assert not (tmp_path/'check'/'model_code_ran').exists() and not (tmp_path/'check'/'model_choice.json').exists()

    monkeypatch.setenv('NBTRAIN_GIST_ID', gid)  # the third way to name the gist
    with pytest.raises(pm.PapermillExecutionError) as e:  # training asks for its own tick
        execute('training.ipynb', tmp_path/'train', **TRAIN)
    assert f'Gist {gid} by builder-user' in outputs(e.value.notebook) and 'planted by the test' in outputs(e.value.notebook)
    (err,) = errors(e.value.notebook)
    assert len(err['traceback']) == 1 and 'tick trust_code' in err['traceback'][0], err
    assert not (tmp_path/'train'/'model_code_ran').exists() and not (tmp_path/'train'/'runs'/'my-run').exists()

@pytest.mark.slow
def test_the_link_names_the_model_of_a_file_with_two(gists, tmp_path):
    "config.json's model_name says MoELM; the link's name picks the other class of the same model.py."
    gid = gists.add_gist(EXPORTS/'two_models')
    link = f'https://colab.research.google.com/github/nbtrain/nbtrain/blob/main/training.ipynb#gist_id={gid}&name=DenseLM&max_seq_len=48'
    execute('training.ipynb', tmp_path, colab_url=link, trust_code=True, **{**TRAIN, 'max_steps': 2})
    run = tmp_path/'runs'/'my-run'
    assert json.loads((run/'model.json').read_text())['class'] == 'DenseLM'
    assert (run/'final'/'model.safetensors').is_file()
