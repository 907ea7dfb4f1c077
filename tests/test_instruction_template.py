"""colab_templates/instruction_tuning.ipynb run end to end by papermill, offline: with model_id='gpt' nbtrain's
reference GPT learns the chat set the notebook writes (the loss on the answers only), and the notebook shows a
training row with the trained tokens marked, the validation loss before and after, and the answers to its questions
before and after training; with a Hub model (a tiny GPT-2 on the stand-in Hub, its tokenizer carrying a ChatML
template) the conversations are written with the model's own template and LoRA adapters train. Also: the notebook
is stored clean, with one parameters cell."""
import json
from pathlib import Path
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
NB = ROOT/'colab_templates'/'instruction_tuning.ipynb'
SMALL = dict(preset='tiny-cpu', use_drive=False, use_wandb=False, micro_batch_size=8, seq_len=160, eval_every=20,
             max_new_tokens=8, overrides={'train.eval_batches': 4, 'data.max_samples': 600})

pytestmark = pytest.mark.usefixtures('one_thread')


def run(tmp_path:Path, monkeypatch, **params):
    pm = pytest.importorskip('papermill')
    for k in ('HF_TOKEN', 'HUGGING_FACE_HUB_TOKEN', 'NBTRAIN_FAKE_COLAB', 'COLAB_RELEASE_TAG', 'WANDB_API_KEY'):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    monkeypatch.setenv('NBTRAIN_CACHE_DIR', str(tmp_path/'cache'))
    out = tmp_path/f"out-{len(list(tmp_path.glob('out-*')))}.ipynb"
    return pm.execute_notebook(str(NB), str(out), parameters={**SMALL, **params}, cwd=str(tmp_path), kernel_name='python3',
                               progress_bar=False, execution_timeout=300)


def outputs(nb, starts:str, kind:str='stdout') -> str:
    "What the code cell starting with `starts` printed (kind 'stdout'), or displayed as `kind` ('text/html', 'text/markdown')."
    c = next(c for c in nb.cells if c.cell_type == 'code' and c.source.startswith(starts))
    if kind == 'stdout': return ''.join(o.get('text', '') for o in c.outputs if o.output_type == 'stream' and o.get('name') == 'stdout')
    return ''.join(o.get('data', {}).get(kind, '') for o in c.outputs if o.output_type != 'stream')


@pytest.mark.slow
def test_reference_gpt_learns_to_answer(tmp_path, monkeypatch):
    for k in ('HF_HUB_OFFLINE', 'HF_DATASETS_OFFLINE', 'TRANSFORMERS_OFFLINE'): monkeypatch.setenv(k, '1')
    nb = run(tmp_path, monkeypatch, model_id='gpt', max_steps=40, lr=3e-3, run_name='gpt-chat')
    run_dir = tmp_path/'runs'/'gpt-chat'
    cfg = yaml.safe_load((run_dir/'config.yaml').read_text())
    assert cfg['data']['format'] == 'chat' and cfg['data']['train_on_prompt'] is False and cfg['model']['name'] == 'gpt'
    assert "chat template: plain" in outputs(nb, 'model_id = model_id')
    row = outputs(nb, 'try:\n    preview', 'text/html')
    assert '<b style="color:#0a7d27">' in row and '### User:' in row and '### Assistant:' in row
    said = outputs(nb, 'try:\n    preview')
    assert 'training tokens are in the loss' in said
    trained, total = (int(x.replace(',', '')) for x in said.split(' training tokens')[0].split(' of '))
    assert 0 < trained < total / 2  # the answers are a small part of each conversation
    losses = outputs(nb, 'run_dir = result.run_dir')
    assert 'validation loss on the answers' in losses
    before, after = (float(x.split(' ')[0]) for x in losses.split('answers: ')[1].split(' -> '))
    assert after < before, losses
    rows = [json.loads(l) for l in (run_dir/'metrics.jsonl').read_text().splitlines() if l.strip()]
    assert [r['step'] for r in rows if 'val_loss' in r][0] == 0
    if (run_dir/'samples.jsonl').is_file():  # the questions, asked with the plain template at every evaluation
        table = outputs(nb, 'rows = [json.loads', 'text/markdown')
        assert '| question | before (step 0) | after (step 40) |' in table and 'Spell "garden" backwards.' in table
    assert '->' in outputs(nb, 'question = ')


def chatml_gpt2(folder:Path):
    "A 2-layer GPT-2 (random weights) and a byte-level BPE tokenizer with a ChatML chat template, saved as a Hub repository holds them."
    transformers = pytest.importorskip('transformers')
    from nbtrain.tokenizer import BPETokenizer
    texts = [f'Spell "garden" backwards. nedrag Add {a} and {a}. {2 * a} Write "river" in capital letters. RIVER' for a in range(50)]
    bpe = BPETokenizer.train(texts, vocab_size=400)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe.tok, eos_token='<|im_end|>', pad_token='<pad>',
                                               unk_token='<unk>', additional_special_tokens=['<|im_start|>', '<|im_end|>'])
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    # the template inside tokenizer_config.json, as most Hub repositories hold it (nbtrain's Hub download takes *.json)
    tok.save_pretrained(folder, save_jinja_files=False)
    cfg = transformers.GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=32, n_layer=2, n_head=2,
                                  eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(folder)


@pytest.mark.slow
def test_hub_model_with_its_own_chat_template(tmp_path, monkeypatch):
    pytest.importorskip('peft')
    from huggingface_hub import HfApi
    from hubserver import HubServer
    chatml_gpt2(tmp_path/'upload')
    with HubServer(tokens={'hf_owner_token_0123456789': 'alice'}) as hub:
        api = HfApi(endpoint=hub.url, token='hf_owner_token_0123456789')
        api.create_repo('alice/tiny-chat')
        api.upload_folder(folder_path=str(tmp_path/'upload'), repo_id='alice/tiny-chat')
        monkeypatch.setenv('HF_ENDPOINT', hub.url)
        monkeypatch.setenv('HF_HUB_DISABLE_TELEMETRY', '1')
        monkeypatch.delenv('HF_HUB_OFFLINE', raising=False)
        nb = run(tmp_path, monkeypatch, model_id='alice/tiny-chat', max_steps=10, eval_every=10, lr=3e-3, run_name='hub-chat',
                 overrides={'train.eval_batches': 2, 'data.max_samples': 200})
    assert "chat template: the tokenizer's own" in outputs(nb, 'model_id = model_id')
    assert "<|im_start|>assistant\\n" in outputs(nb, 'model_id = model_id')
    row = outputs(nb, 'try:\n    preview', 'text/html')
    assert '&lt;|im_start|&gt;user' in row and '<b style="color:#0a7d27">' in row
    cfg = yaml.safe_load((tmp_path/'runs'/'hub-chat'/'config.yaml').read_text())
    assert cfg['lora']['enabled'] is True and cfg['model']['name'] == 'hf' and cfg['data']['format'] == 'chat'
    assert 'validation loss on the answers' in outputs(nb, 'run_dir = result.run_dir')


def test_notebook_is_clean_and_parametrised():
    nb = json.loads(NB.read_text())
    code = [c for c in nb['cells'] if c['cell_type'] == 'code']
    assert not any(c.get('outputs') or c.get('execution_count') for c in code), f"{NB.name} has outputs: nbdev-clean --fname {NB}"
    tagged = [c for c in nb['cells'] if 'parameters' in c['metadata'].get('tags', [])]
    assert len(tagged) == 1
    params = ''.join(tagged[0]['source'])
    for v in ('run_name', 'preset = None', 'max_steps', 'micro_batch_size', 'lr', 'use_drive = True', 'use_wandb = False',
              'overrides = {}', "data_format = 'chat'", 'train_on_prompt = False', 'chat_template = None'):
        assert v in params, f"the parameters cell has no {v!r}"
    src = ''.join(''.join(c['source']) for c in nb['cells'])
    assert 'https://colab.research.google.com/github/nbtrain/nbtrain/blob/main/colab_templates/instruction_tuning.ipynb' in src
    assert "find_spec('nbtrain') is None" in src and "'nbtrain[train]'" in src and ' -U ' not in src
