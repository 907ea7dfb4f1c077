"""Publishing to the Hugging Face Hub with the real `huggingface_hub` client, against a stand-in Hub on 127.0.0.1.

The stand-in (tests/hubserver.py) answers the client's requests and keeps everything it receives, so these tests check
what would land on huggingface.co: the files, the model card, the branch and tag, and that the token is never in a
byte that was uploaded. The failure tests make the server answer 500s.
"""
import json, os, shlex, subprocess, sys
from pathlib import Path
import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from hubserver import HubServer

from nbtrain.callbacks import read_metrics
from nbtrain.cli import main
from nbtrain.models import ModelOutput
from nbtrain.hub import PushError, headline_metrics, load_final, load_from_hub, push_run, read_run

TOKEN = 'hf_TestToken_7f3a9c1e5b2d4086'
QUICK = {'train.max_steps': 6, 'train.eval_every': 3, 'train.log_every': 2, 'train.micro_batch_size': 4, 'train.eval_batches': 2,
         'train.progress_bar': False, 'data.corpus_size': 60, 'data.seq_len': 32}
FIXTURES = Path(__file__).parent/'fixtures'


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
    from nbtrain.trainer import train
    return train(overrides={**QUICK, 'output_dir': str(tmp_path_factory.mktemp('runs')), 'name': 'tiny'}).run_dir


@pytest.fixture
def hub(monkeypatch):
    monkeypatch.setenv('HF_TOKEN', TOKEN)
    monkeypatch.setenv('HF_HUB_DISABLE_PROGRESS_BARS', '1')
    with HubServer(tokens={TOKEN: 'tester'}, orgs={'tester': ['acme']}) as h:
        yield h


def test_push_uploads_model_card_and_never_the_token(run_dir, hub):
    r = push_run(run_dir, 'acme/tiny-gpt', private=True, revision='release', tag='v1', endpoint=hub.url, log=None)
    repo = hub.state.repos['acme/tiny-gpt']
    assert repo.private and r.private
    assert repo.branches['release'] == r.commit and repo.tags['v1'] == r.commit
    assert repo.branches['main'] != r.commit  # the version went to its branch, main is untouched
    files = hub.state.files('acme/tiny-gpt', 'v1')
    final = run_dir/'final'
    in_final = {p.name for p in final.iterdir() if p.is_file()}
    assert {'model.safetensors', 'config.json', 'tokenizer.json'} <= in_final
    assert set(files) == (in_final - {'manifest.json'}) | {'.gitattributes', 'README.md', 'training/metrics.jsonl', 'training/config.yaml', 'training/env.json'}  # final/'s own manifest stays home
    for f in in_final - {'manifest.json'}: assert files[f] == (final/f).read_bytes(), f
    kinds = [q.kind for q in hub.state.requests]
    assert 'whoami' not in kinds and kinds.count('commit') == 1  # one commit holds the whole model

    card = files['README.md'].decode()
    _, front, body = card.split('---\n', 2)
    meta = yaml.safe_load(front)
    assert meta['pipeline_tag'] == 'text-generation' and meta['library_name'] == 'nbtrain'
    run = read_run(run_dir)
    metrics = meta['model-index'][0]['results'][0]['metrics']
    assert {m['type']: m['value'] for m in metrics} == {k[4:]: v for k, v in headline_metrics(run).items()}
    assert {'loss', 'acc', 'ppl'} <= {m['type'] for m in metrics}
    for section in ('## How to load it', '## Training data', '## Evaluation', '## Training configuration',
                    '## Hardware and time', '## Environment', '## Limitations', '## Files'):
        assert section in body, section
    evals = [row for row in read_metrics(run_dir) if 'val_loss' in row]
    table = body.split('## Evaluation')[1].split('##')[0]
    assert [l.split('|')[1].strip() for l in table.strip().splitlines()[2:]] == [str(e['step']) for e in evals]
    assert f"{evals[-1]['val_loss']:.4g}" in table
    assert "load_from_hub('acme/tiny-gpt', revision='v1')" in body and 'pip install' in body
    assert 'CPU (' in body and 'torch' in body

    # the token authenticated every request, and is in no uploaded byte and no staged file
    assert all(q.headers.get('authorization') == f'Bearer {TOKEN}' for q in hub.state.requests)
    assert TOKEN.encode() not in hub.state.uploaded_bytes()
    assert all(TOKEN.encode() not in b for b in files.values())
    assert all(TOKEN.encode() not in p.read_bytes() for p in r.folder.rglob('*') if p.is_file())


def test_user_namespace_and_loading_back(run_dir, hub, tmp_path):
    r = push_run(run_dir, 'tiny-gpt', tag='v1', endpoint=hub.url, log=None)
    assert r.repo_id == 'tester/tiny-gpt'  # found with whoami
    back = load_from_hub('tester/tiny-gpt', 'v1', endpoint=hub.url, cache_dir=tmp_path)
    here = load_final(run_dir)
    x = torch.tensor([here.tokenizer.encode('Once upon a time there was')])
    with torch.no_grad(): assert torch.equal(back.module(x).logits, here.module(x).logits)
    assert back.tokenizer.encode('a cat') == here.tokenizer.encode('a cat')
    with pytest.raises(PushError, match="tag 'v1' already exists"):  # a tag names one version
        push_run(run_dir, 'tester/tiny-gpt', tag='v1', endpoint=hub.url, log=None, backoff=0)


def test_transient_errors_are_retried(run_dir, hub):
    hub.state.fail('commit', times=2, status=503)
    said = []
    r = push_run(run_dir, 'acme/flaky', endpoint=hub.url, backoff=0.01, log=said.append)
    assert [q.status for q in hub.state.requests if q.kind == 'commit'] == [503, 503, 200]
    assert sum('retrying in' in s for s in said) == 2
    assert hub.state.repos['acme/flaky'].branches['main'] == r.commit


def test_failed_push_leaves_a_ready_folder_and_the_command_that_uploads_it(run_dir, hub):
    hub.state.fail('commit', times=100, status=500)
    with pytest.raises(PushError) as ei:
        push_run(run_dir, 'acme/down', private=True, tag='v2', endpoint=hub.url, attempts=3, backoff=0.01, log=None)
    e = ei.value
    assert [q.status for q in hub.state.requests if q.kind == 'commit'] == [500] * 3
    assert 'while uploading the files (HTTP 500' in str(e) and str(e.folder) in str(e)
    assert {'README.md', 'config.json', 'model.safetensors', 'tokenizer.json', 'training'} <= {p.name for p in e.folder.iterdir()}
    assert e.commands[0].startswith(f'HF_ENDPOINT={hub.url} hf upload acme/down {e.folder} . --revision main --private')
    assert TOKEN not in str(e) and all(TOKEN not in c for c in e.commands)

    hub.state.failures.clear()  # the Hub is back: the printed Python command finishes the job
    env_prefix, cmd = e.commands[-1].split(' ', 1)
    env = {**os.environ, env_prefix.split('=', 1)[0]: env_prefix.split('=', 1)[1]}
    argv = shlex.split(cmd)
    res = subprocess.run([sys.executable, *argv[1:]], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    repo = hub.state.repos['acme/down']
    assert repo.private and 'v2' in repo.tags
    assert hub.state.files('acme/down', 'v2')['model.safetensors'] == (run_dir/'final'/'model.safetensors').read_bytes()


def test_no_token_stops_before_any_request(run_dir, hub, monkeypatch):
    monkeypatch.delenv('HF_TOKEN')
    monkeypatch.delenv('HUGGING_FACE_HUB_TOKEN', raising=False)
    with pytest.raises(PushError, match='no Hugging Face token'):
        push_run(run_dir, 'acme/x', endpoint=hub.url, log=None)
    assert hub.state.requests == []


def test_push_command(run_dir, hub, capsys):
    assert main(['push', str(run_dir), '--repo', 'acme/cli', '--private', '--tag', 'v1', '--endpoint', hub.url]) == 0
    assert capsys.readouterr().out.strip().endswith(f'{hub.url}/acme/cli/tree/v1')
    assert hub.state.repos['acme/cli'].private
    hub.state.fail('create', times=100, status=502)
    assert main(['push', str(run_dir), '--repo', 'acme/cli2', '--endpoint', hub.url, '--attempts', '2']) == 1
    err = capsys.readouterr().err
    assert 'while creating the repository (HTTP 502' in err and 'hf upload acme/cli2' in err


def test_file_model_ships_its_code(hub, tmp_path):
    from nbtrain.trainer import train
    run = train(overrides={**QUICK, 'train.max_steps': 2, 'train.eval_every': 2, 'output_dir': str(tmp_path), 'name': 'gist',
                           'model.name': 'file', 'model.path': str(FIXTURES/'gist_gpt'), 'model.trust_code': True}).run_dir
    push_run(run, 'acme/gist', tag='v1', endpoint=hub.url, log=None)
    files = hub.state.files('acme/gist', 'v1')
    assert files['model.py'] == (FIXTURES/'gist_gpt'/'model.py').read_bytes()
    assert 'trust_code=True' in files['README.md'].decode()
    with pytest.raises(Exception, match='trust_code=True'):
        load_from_hub('acme/gist', 'v1', endpoint=hub.url, cache_dir=tmp_path/'c1')
    back = load_from_hub('acme/gist', 'v1', endpoint=hub.url, cache_dir=tmp_path/'c2', trust_code=True)
    here = load_final(run, trust_code=True)
    x = torch.randint(0, 50, (1, 12))
    logits = lambda m: ModelOutput.from_raw(m(x)).logits
    with torch.no_grad(): assert torch.equal(logits(back.module), logits(here.module))


@pytest.mark.slow
def test_hugging_face_model_loads_with_transformers_too(hub, tmp_path):
    from nbtrain.trainer import train
    run = train(overrides={**QUICK, 'train.max_steps': 2, 'train.eval_every': 2, 'output_dir': str(tmp_path), 'name': 'hf',
                           'model.name': 'hf', 'model.path': 'gpt2', 'model.n_layer': 2, 'model.d_model': 64, 'model.n_head': 2}).run_dir
    push_run(run, 'acme/gpt2ish', tag='v1', endpoint=hub.url, log=None)
    config = json.loads(hub.state.files('acme/gpt2ish', 'v1')['config.json'])
    assert config['model_type'] == 'gpt2' and config['architectures'] == ['GPT2LMHeadModel'] and config['nbtrain']['task'] == 'causal_lm'
    from huggingface_hub import snapshot_download
    from transformers import AutoModelForCausalLM
    here = load_final(run)
    x = torch.randint(0, 50, (2, 10))
    with torch.no_grad():
        want = here.module(x).logits
        tf = AutoModelForCausalLM.from_pretrained(snapshot_download('acme/gpt2ish', revision='v1', endpoint=hub.url, cache_dir=tmp_path/'c'))
        assert torch.allclose(tf.eval()(x).logits, want, atol=1e-5)
        assert torch.equal(load_from_hub('acme/gpt2ish', 'v1', endpoint=hub.url, cache_dir=tmp_path/'c').module(x).logits, want)


def test_a_card_names_the_hub_base_and_its_commit(tmp_path):
    from nbtrain.hub import RunSummary, model_card
    sha = '9a8b7c6d' + '0' * 32
    info = {'kind': 'hf', 'class': 'GPT2LMHeadModel', 'source': 'org/base', 'hub_id': 'org/base', 'revision': sha,
            'requested_revision': 'v2', 'auto_class': 'AutoModelForCausalLM', 'n_params': 1000}
    run = RunSummary(tmp_path, {'model': info, 'task': 'causal_lm', 'run_config': {'name': 'ft'}})
    card = model_card(run, 'acme/ft', secrets=[TOKEN])
    meta = yaml.safe_load(card.split('---\n')[1])
    assert (meta['library_name'], meta['base_model'], meta['base_model_relation']) == ('nbtrain', 'org/base', 'finetune')
    assert 'lora' not in meta['tags'] and '## LoRA adapters' not in card
    assert f"Fine-tuned from [`org/base`](https://huggingface.co/org/base) at revision [`{sha}`]" in card
    assert "(the commit `v2` pointed to when training started)" in card and f"org/base at revision {sha}" in card
    assert "AutoModelForCausalLM.from_pretrained('acme/ft')" in card
