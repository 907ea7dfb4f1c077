"""Publishing a LoRA run to the Hugging Face Hub, against the stand-in Hub on 127.0.0.1 (tests/hubserver.py).

A LoRA run's repository is an adapter repository: peft's `adapter_config.json` and `adapter_model.safetensors` at the
top (what `peft.PeftModel.from_pretrained(base, repo_id)` reads), the card (`library_name: peft`, `base_model`), nbtrain's
records, and the merged model in `merged/` when the run has one. These tests build a LoRA run's folder by hand with
`nbtrain.lora` (the layout the trainer writes), push it with the real client, download it again and load it with plain
peft and transformers, and with nbtrain: from `merged/`, or the base at the commit the run started from plus the adapters.
"""
import json, sys
from pathlib import Path
from types import SimpleNamespace
import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from hubserver import HubServer

TOKEN = 'hf_LoraTestToken_3e8d1f0a9c52'
pytestmark = pytest.mark.usefixtures('one_thread')


def tiny_gpt2(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=264, n_positions=64,
                                      bos_token_id=0, eos_token_id=0)).eval()


def lora_run(run_dir, base='org/base', revision='0' * 40, *, merged=True, seed=0, tokenizer=False) -> Path:
    """A LoRA run's folder as the trainer writes it: `final/adapter/` in peft's format, the merged model with its own
    config.json when `merged`, and nbtrain.json whose model info names the Hub base and its commit. The base is
    `tiny_gpt2(seed)`; random adapters stand in for trained ones. `tokenizer`: a BPE tokenizer too (transformers reads it)."""
    from safetensors.torch import save_model
    from nbtrain.lora import apply_lora, base_fingerprint, merged_state_dict, save_adapter
    run_dir = Path(run_dir)
    final = run_dir/'final'
    model = tiny_gpt2(seed)
    lora = apply_lora(model, SimpleNamespace(r=4, alpha=8., dropout=0., target_modules='auto', modules_to_save=None, bias='none'))
    with torch.no_grad():  # as if trained: lora_B starts at zero, which would make the adapters do nothing
        for name, p in model.named_parameters():
            if 'lora_B' in name: p.normal_(0, 0.2)
    save_adapter(model, final/'adapter', base=base, revision=revision)
    lora.update(base_sha256=base_fingerprint(model), merged=merged)
    config = model.config.to_dict()
    if merged:
        plain = tiny_gpt2(seed)
        plain.load_state_dict(merged_state_dict(model))
        save_model(plain, str(final/'model.safetensors'))
        (final/'config.json').write_text(json.dumps(config, indent=2))
    info = {'kind': 'hf', 'class': 'GPT2LMHeadModel', 'source': base, 'hub_id': base, 'revision': revision, 'model_type': 'gpt2',
            'auto_class': 'AutoModelForCausalLM', 'pretrained': True, 'n_params': lora['base_params'], 'lora': lora}
    rc = {'name': run_dir.name, 'task': {'name': 'causal_lm'}, 'model': {'name': 'hf', 'path': base, 'revision': revision},
          'lora': {'enabled': True, 'r': 4, 'alpha': 8.0, 'dropout': 0.0, 'target_modules': 'auto'},
          'data': {'source': 'embedded', 'tokenizer': 'char', 'seq_len': 32},
          'optim': {'name': 'adamw', 'lr': 1e-3, 'weight_decay': 0.0}, 'train': {'max_steps': 3, 'micro_batch_size': 4, 'grad_accum': 1, 'seed': 0}}
    if tokenizer:
        from nbtrain.tokenizer import BPETokenizer
        BPETokenizer.train(['once upon a time there was a cat'] * 20, vocab_size=264).save(final)
    (final/'nbtrain.json').write_text(json.dumps({'model': info, 'model_config': config, 'task': 'causal_lm', 'run_config': rc}, indent=2))
    (run_dir/'model.json').write_text(json.dumps(info, indent=2))
    (run_dir/'config.yaml').write_text(yaml.safe_dump(rc, sort_keys=False))
    rows = [{'step': 1, 'loss': 4.1, 'time': 100.0}, {'step': 3, 'loss': 3.9, 'val_loss': 3.8, 'val_ppl': 44.7, 'time': 101.5}]
    (run_dir/'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    (run_dir/'env.json').write_text(json.dumps({'python': sys.version.split()[0], 'cpu_count': 2}))
    return run_dir


def merged_logits(run_dir, x):
    "What the run's merged model (final/model.safetensors, no peft) says for `x`."
    from safetensors.torch import load_model
    m = tiny_gpt2()
    load_model(m, str(Path(run_dir)/'final'/'model.safetensors'))
    with torch.no_grad(): return m(x).logits


def upload_base(hub, model, folder) -> str:
    "Put `model` in the repository org/base of the stand-in Hub; returns the commit."
    from huggingface_hub import HfApi
    api = HfApi(endpoint=hub.url, token=TOKEN)
    api.create_repo('org/base', exist_ok=True)
    model.save_pretrained(folder)
    return api.upload_folder(repo_id='org/base', folder_path=str(folder)).oid


@pytest.fixture
def hub(monkeypatch):
    monkeypatch.setenv('HF_TOKEN', TOKEN)
    monkeypatch.setenv('HF_HUB_DISABLE_PROGRESS_BARS', '1')
    with HubServer(tokens={TOKEN: 'tester'}, orgs={'tester': ['acme', 'org']}) as h:
        yield h


def no_token_anywhere(hub, files, staged):
    assert TOKEN.encode() not in hub.state.uploaded_bytes()
    assert all(TOKEN.encode() not in b for b in files.values())
    assert all(TOKEN.encode() not in p.read_bytes() for p in Path(staged).rglob('*') if p.is_file())


def test_lora_run_pushes_an_adapter_repository_that_peft_loads(hub, tmp_path):
    from huggingface_hub import snapshot_download
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from nbtrain.hub import load_from_hub, push_run
    sha = 'c0ffee' + '1' * 34
    run = lora_run(tmp_path/'tiny-lora', revision=sha, tokenizer=True)
    r = push_run(run, 'acme/tiny-lora', tag='v1', endpoint=hub.url, log=None)
    files = hub.state.files('acme/tiny-lora', 'v1')
    final = run/'final'
    assert set(files) == {'.gitattributes', 'README.md', 'adapter_config.json', 'adapter_model.safetensors', 'nbtrain.json',
                          'tokenizer.json', 'tokenizer_config.json', 'training/metrics.jsonl', 'training/config.yaml', 'training/env.json',
                          'merged/model.safetensors', 'merged/config.json', 'merged/nbtrain.json', 'merged/tokenizer.json', 'merged/tokenizer_config.json'}
    for f in ('adapter_config.json', 'adapter_model.safetensors'): assert files[f] == (final/'adapter'/f).read_bytes(), f
    assert files['merged/model.safetensors'] == (final/'model.safetensors').read_bytes()
    assert json.loads(files['adapter_config.json'])['base_model_name_or_path'] == 'org/base'
    merged_cfg = json.loads(files['merged/config.json'])
    assert merged_cfg['model_type'] == 'gpt2' and merged_cfg['nbtrain']['model']['lora']['merged'] is True

    card = files['README.md'].decode()
    _, front, body = card.split('---\n', 2)
    meta = yaml.safe_load(front)
    assert (meta['library_name'], meta['base_model'], meta['base_model_relation']) == ('peft', 'org/base', 'adapter')
    assert {'lora', 'peft', 'nbtrain'} <= set(meta['tags']) and meta['pipeline_tag'] == 'text-generation'
    assert f"revision [`{sha}`]" in body and '## LoRA adapters' in body
    assert f"base = AutoModelForCausalLM.from_pretrained('org/base', revision='{sha}')" in body
    assert "model = PeftModel.from_pretrained(base, 'acme/tiny-lora', revision='v1')" in body
    assert "from_pretrained('acme/tiny-lora', subfolder='merged', revision='v1')" in body
    assert "tokenizer = AutoTokenizer.from_pretrained('acme/tiny-lora', revision='v1')" in body
    lo = json.loads((final/'nbtrain.json').read_text())['model']['lora']
    assert f"| rank r | 4 |" in body and f"{lo['trainable_params']:,} of {lo['base_params']:,} ({lo['trainable_fraction']:.2%})" in body
    no_token_anywhere(hub, files, r.folder)

    # plain peft and transformers, on the downloaded repository
    folder = Path(snapshot_download('acme/tiny-lora', revision='v1', endpoint=hub.url, cache_dir=tmp_path/'c'))
    x = torch.randint(0, 128, (2, 12))
    want = merged_logits(run, x)
    with torch.no_grad():
        peft_model = PeftModel.from_pretrained(tiny_gpt2(), folder).eval()
        assert torch.allclose(peft_model(x).logits, want, atol=1e-5)
        tf = AutoModelForCausalLM.from_pretrained(folder/'merged').eval()
        assert torch.allclose(tf(x).logits, want, atol=1e-5)
        back = load_from_hub('acme/tiny-lora', 'v1', endpoint=hub.url, cache_dir=tmp_path/'c2')  # nbtrain takes merged/
        assert back.folder.name == 'merged' and torch.allclose(back.module(x).logits, want, atol=1e-5)
    text = 'once upon a time'
    assert AutoTokenizer.from_pretrained(folder)(text)['input_ids'] == back.tokenizer.encode(text)


def test_adapters_alone_load_on_the_base_at_its_pinned_commit(hub, tmp_path):
    from nbtrain.hub import HubError, load_from_hub, push_run
    first = upload_base(hub, tiny_gpt2(0), tmp_path/'b0')
    run = lora_run(tmp_path/'adapters-only', revision=first, merged=False)
    upload_base(hub, tiny_gpt2(1), tmp_path/'b1')  # the base repository moves on after the run
    r = push_run(run, 'acme/lora-only', endpoint=hub.url, log=None)
    files = hub.state.files('acme/lora-only')
    assert {'adapter_config.json', 'adapter_model.safetensors', 'README.md', 'nbtrain.json'} <= set(files)
    assert not [f for f in files if f.startswith('merged/') or f in ('model.safetensors', 'config.json')]
    card = files['README.md'].decode()
    assert 'not written (the run had lora.merge_final false)' in card and "subfolder='merged'" not in card
    no_token_anywhere(hub, files, r.folder)

    x = torch.randint(0, 128, (2, 12))
    want = merged_logits(lora_run(tmp_path/'same-adapters-merged'), x)  # the same base and adapters, merged
    back = load_from_hub('acme/lora-only', endpoint=hub.url, cache_dir=tmp_path/'c')
    with torch.no_grad(): assert torch.allclose(back.module(x).logits, want, atol=1e-5)  # base at `first`, not the newer one
    assert back.kind == 'hf' and back.task == 'causal_lm' and back.info['lora']['r'] == 4
    with pytest.raises(HubError, match='without a merged model'):
        load_from_hub('acme/lora-only', endpoint=hub.url, cache_dir=tmp_path/'c', merged=True)


def test_the_merged_model_alone_is_a_plain_model_repository(hub, tmp_path):
    from nbtrain.cli import main
    from nbtrain.hub import stage_repo
    run = lora_run(tmp_path/'m')
    assert main(['push', str(run), '--repo', 'acme/merged', '--what', 'merged', '--endpoint', hub.url]) == 0
    files = hub.state.files('acme/merged')
    assert {'model.safetensors', 'config.json', 'nbtrain.json', 'README.md'} <= set(files)
    assert not {'adapter_config.json', 'adapter_model.safetensors'} & set(files) and not any(f.startswith('merged/') for f in files)
    meta = yaml.safe_load(files['README.md'].decode().split('---\n')[1])
    assert (meta['library_name'], meta['base_model'], meta['base_model_relation']) == ('nbtrain', 'org/base', 'finetune')
    assert 'lora' in meta['tags'] and 'peft' not in meta['tags']
    staged = stage_repo(run, 'acme/a', what='adapter', folder=tmp_path/'staged')
    assert sorted(p.name for p in staged.iterdir()) == ['README.md', 'adapter_config.json', 'adapter_model.safetensors', 'nbtrain.json', 'training']
    no_token_anywhere(hub, files, run/'hub')


@pytest.mark.slow
def test_a_real_lora_run_from_a_hub_base_publishes_and_loads_with_peft(hub, tmp_path, monkeypatch):
    "The trainer's own final/ (LoRA on a Hub model, merged), pushed, then loaded by plain peft on the base at the commit the card names."
    from huggingface_hub import snapshot_download
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from nbtrain.hub import load_final, push_run
    from nbtrain.trainer import train
    monkeypatch.setenv('HF_ENDPOINT', hub.url)
    sha = upload_base(hub, tiny_gpt2(0), tmp_path/'b0')
    run = train(preset='tiny-cpu', overrides={
        'model.name': 'hf', 'model.path': 'org/base', 'model.cache_dir': str(tmp_path/'cache'), 'lora.enabled': True, 'lora.r': 4,
        'train.max_steps': 3, 'train.eval_every': 3, 'train.progress_bar': False, 'data.corpus_size': 60, 'data.seq_len': 32,
        'output_dir': str(tmp_path/'runs'), 'name': 'real-lora'}).run_dir
    upload_base(hub, tiny_gpt2(1), tmp_path/'b1')  # the base moves on; the card and the adapters keep the run's commit
    r = push_run(run, 'acme/real-lora', tag='v1', endpoint=hub.url, log=None)
    files = hub.state.files('acme/real-lora', 'v1')
    assert {'adapter_config.json', 'adapter_model.safetensors', 'merged/model.safetensors'} <= set(files)
    assert json.loads(files['adapter_config.json'])['revision'] == sha
    meta = yaml.safe_load(files['README.md'].decode().split('---\n')[1])
    assert (meta['library_name'], meta['base_model']) == ('peft', 'org/base') and 'lora' in meta['tags']
    assert f"from_pretrained('org/base', revision='{sha}')" in files['README.md'].decode()
    no_token_anywhere(hub, files, r.folder)

    folder = snapshot_download('acme/real-lora', revision='v1', endpoint=hub.url, cache_dir=tmp_path/'c')
    base = AutoModelForCausalLM.from_pretrained(snapshot_download('org/base', revision=sha, endpoint=hub.url, cache_dir=tmp_path/'c'))
    x = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        want = load_final(run).module(x).logits  # the run's merged model
        assert torch.allclose(PeftModel.from_pretrained(base, folder).eval()(x).logits, want, atol=1e-5)
