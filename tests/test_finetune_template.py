"""colab_templates/finetune_pretrained.ipynb run end to end by papermill against the stand-in Hub on 127.0.0.1
(`tests/hubserver.py`), offline from the internet: a tiny GPT-2 with random weights and its own tokenizer stands in
for SmolLM2; the notebook downloads it, trains LoRA adapters on the instruction set it writes, compares the
validation loss before and after, answers a prompt with and without the adapter, and pushes the adapter (peft's
format, with a card) to the Hub with the token from the environment, which never reaches a parameter, an output or
a file; without a token it says the push was skipped."""
import json
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parent.parent
NB = ROOT/'colab_templates'/'finetune_pretrained.ipynb'
TOKEN = 'hf_finetune_token_0123456789'
SMALL = dict(preset='tiny-cpu', use_drive=False, use_wandb=False, max_steps=24, micro_batch_size=8, seq_len=64, lr=3e-3,
             eval_every=12, max_new_tokens=8, overrides={'train.eval_batches': 4})

pytestmark = pytest.mark.usefixtures('one_thread')


def tiny_gpt2_with_tokenizer(folder:Path):
    "A 2-layer GPT-2 (random weights) and a byte-level BPE tokenizer of 400 tokens, saved as a Hub repository holds them."
    transformers = pytest.importorskip('transformers')
    from nbtrain.embedded import embedded_corpus
    from nbtrain.tokenizer import BPETokenizer
    texts = embedded_corpus(100).split('\n\n') + ['### Instruction:\nAdd 12 and 30.\n\n### Response:\n42'] * 20
    bpe = BPETokenizer.train(texts, vocab_size=400)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe.tok, eos_token='<eos>', pad_token='<pad>', unk_token='<unk>')
    tok.save_pretrained(folder)
    cfg = transformers.GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=32, n_layer=2, n_head=2,
                                  eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(folder)


def run(tmp_path:Path, monkeypatch, hub, token:str|None, **params):
    pm = pytest.importorskip('papermill')
    for k in ('HF_TOKEN', 'HUGGING_FACE_HUB_TOKEN', 'HF_HUB_OFFLINE', 'NBTRAIN_FAKE_COLAB', 'COLAB_RELEASE_TAG', 'WANDB_API_KEY'):
        monkeypatch.delenv(k, raising=False)
    if token: monkeypatch.setenv('HF_TOKEN', token)
    monkeypatch.setenv('HF_ENDPOINT', hub.url)
    monkeypatch.setenv('HF_HUB_DISABLE_TELEMETRY', '1')
    monkeypatch.setenv('NBTRAIN_CACHE_DIR', str(tmp_path/'cache'))
    out = tmp_path/f"out-{len(list(tmp_path.glob('out-*')))}.ipynb"
    nb = pm.execute_notebook(str(NB), str(out), parameters={**SMALL, **params}, cwd=str(tmp_path), kernel_name='python3',
                             progress_bar=False, execution_timeout=300)
    assert TOKEN not in out.read_text(), "the token was shown in the notebook"
    return nb


def printed(nb, starts:str) -> str:
    c = next(c for c in nb.cells if c.cell_type == 'code' and c.source.startswith(starts))
    return ''.join(o.get('text', '') for o in c.outputs if o.output_type == 'stream' and o.name == 'stdout')


@pytest.mark.slow
def test_lora_fine_tune_of_a_hub_model_compared_and_pushed(tmp_path, monkeypatch):
    pytest.importorskip('peft')
    from huggingface_hub import HfApi
    from hubserver import HubServer
    tiny_gpt2_with_tokenizer(tmp_path/'upload')
    with HubServer(tokens={TOKEN: 'alice'}) as hub:
        api = HfApi(endpoint=hub.url, token=TOKEN)
        api.create_repo('alice/tiny-gpt2')
        commit = api.upload_folder(repo_id='alice/tiny-gpt2', folder_path=str(tmp_path/'upload')).oid
        nb = run(tmp_path, monkeypatch, hub, TOKEN, model_id='hf:alice/tiny-gpt2', run_name='ft', hub_repo='tiny-gpt2-lora')
        pushed = hub.state.files('alice/tiny-gpt2-lora')
        assert hub.state.repos['alice/tiny-gpt2-lora'].private  # private=True by default
        run_dir = tmp_path/'runs'/'ft'
        assert f'alice/tiny-gpt2 at commit {commit[:12]}' in printed(nb, "model_id = model_id[3:]")

        # the same notebook without a token: the finished run is read back, the push is skipped with the reason
        nb2 = run(tmp_path, monkeypatch, hub, None, model_id='alice/tiny-gpt2', run_name='ft', hub_repo='tiny-gpt2-lora')
        assert 'Not pushed: no Hugging Face token' in printed(nb2, 'if not hub_repo')
    adapter = run_dir/'final'/'adapter'
    assert (adapter/'adapter_config.json').is_file() and (adapter/'adapter_model.safetensors').is_file()
    assert json.loads((adapter/'adapter_config.json').read_text())['base_model_name_or_path'] == 'alice/tiny-gpt2'
    rows = [json.loads(l) for l in (run_dir/'metrics.jsonl').read_text().splitlines() if l.strip()]
    ev = [r for r in rows if 'val_loss' in r]
    assert [r['step'] for r in ev] == [0, 12, 24] and ev[-1]['val_loss'] < ev[0]['val_loss'], ev
    text = printed(nb, 'run_dir = result.run_dir')
    assert f"validation loss {ev[0]['val_loss']:.3f} (pretrained, before training) -> {ev[-1]['val_loss']:.3f} (fine-tuned, step 24)" in text, text
    answers = printed(nb, 'from peft import PeftModel')
    assert 'pretrained: ' in answers and 'fine-tuned: ' in answers, answers
    assert {'adapter_config.json', 'adapter_model.safetensors', 'README.md'} <= set(pushed), sorted(pushed)
    assert pushed['adapter_model.safetensors'] == (adapter/'adapter_model.safetensors').read_bytes()
    assert b'base_model: alice/tiny-gpt2' in pushed['README.md'] and commit.encode() in pushed['README.md']
    assert 'alice/tiny-gpt2-lora: ' in printed(nb, 'if not hub_repo')
    leaked = [str(p) for p in tmp_path.rglob('*') if p.is_file() and TOKEN.encode() in p.read_bytes()]
    assert not leaked, leaked
