"""LoRA fine-tuning of pretrained models, end to end and offline: a tiny GPT-2 (and a tiny BERT classifier) saved with
`save_pretrained` next to its own tokenizer, fine-tuned by folder and by Hub id through the stand-in Hub. Only the
adapters train (the base stays bit-identical), the loss goes down, checkpoints hold only the adapters, a SIGKILLed run
resumes bitwise, a different base is refused, and final/ loads with plain peft and equals base + adapter.
"""
import json, os, random, signal, subprocess, sys, time
from pathlib import Path
import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.usefixtures('one_thread')
TOKEN = 'hf_lora_token_0123456789abcdef'
SCRIPT = Path(__file__).parent/'scripts'/'ckpt_run.py'


def tokenizer():
    "A byte-level BPE tokenizer trained on a few sentences, as transformers saves one (GPT-2's kind: no padding token)."
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    from transformers import PreTrainedTokenizerFast
    from nbtrain.embedded import embedded_corpus
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tk.train_from_iterator(embedded_corpus(50, seed=0).split('\n\n'),
                           trainers.BpeTrainer(vocab_size=400, special_tokens=['<|endoftext|>'], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token='<|endoftext|>', bos_token='<|endoftext|>')


def save_gpt2(folder, seed=0, n_embd=64, vocab=None):
    from transformers import GPT2Config, GPT2LMHeadModel
    tok = tokenizer()
    torch.manual_seed(seed)
    m = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=n_embd, n_head=2, vocab_size=vocab or len(tok), n_positions=64,
                                   bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id))
    m.save_pretrained(folder); tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope='module')
def gpt2(tmp_path_factory): return save_gpt2(tmp_path_factory.mktemp('base')/'tiny-gpt2')


def cfg(tmp_path, base, name='run', **over):
    from nbtrain.config import load_config
    o = {'output_dir': str(tmp_path/'runs'), 'name': name, 'model.name': 'hf', 'model.path': str(base), 'lora.enabled': True,
         'lora.r': 4, 'data.corpus_size': 80, 'data.seq_len': 32, 'train.micro_batch_size': 8, 'train.max_steps': 12,
         'train.eval_every': 12, 'train.eval_batches': 2, 'train.progress_bar': False, 'optim.lr': 3e-3,
         'checkpoint.every_minutes': None, 'tracking.dashboard': False, **over}
    return load_config(preset='tiny-cpu', overrides=o)


def test_only_the_adapters_train_and_final_loads_with_plain_peft(gpt2, tmp_path, capsys):
    from transformers import GPT2LMHeadModel
    from peft import PeftModel
    from nbtrain.trainer import Trainer
    from nbtrain.loading import load_model
    tr = Trainer(cfg(tmp_path, gpt2))
    out = capsys.readouterr().out
    assert "data.tokenizer: the model's own" in out and 'pads' in out   # GPT-2's tokenizer has no padding token
    assert 'LoRA r=4 on c_attn, c_fc, c_proj' in out
    res = tr.fit()
    assert res.last_eval['val_loss'] < res.first_eval['val_loss']
    base = GPT2LMHeadModel.from_pretrained(gpt2).state_dict()
    sd = tr.raw_model.state_dict()
    frozen = {k.replace('.base_layer', ''): v for k, v in sd.items() if 'lora_' not in k}
    assert frozen.keys() == base.keys() and all(torch.equal(frozen[k], base[k]) for k in base)  # the base is bit-identical
    assert {n for n, p in tr.raw_model.named_parameters() if p.requires_grad} == {k for k in sd if 'lora_' in k}

    final = res.run_dir/'final'
    info = json.loads((final/'nbtrain.json').read_text())['model']['lora']
    assert info['merged'] and info['trainable_params'] < 0.2 * info['base_params']
    cfgj = json.loads((final/'adapter'/'adapter_config.json').read_text())
    assert cfgj['peft_type'] == 'LORA' and cfgj['r'] == 4 and cfgj['base_model_name_or_path'] == str(gpt2)
    plain = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(gpt2), final/'adapter').eval()  # no nbtrain
    merged = load_model(final).eval()
    x = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        a, b = plain(x).logits, merged(x).logits
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    # merged = base + B·A·alpha/r, layer by layer (GPT-2's Conv1D stores W transposed)
    w = load_file(final/'model.safetensors')
    ad = load_file(final/'adapter'/'adapter_model.safetensors')
    k = 'transformer.h.1.mlp.c_fc'
    A, B = ad[f'base_model.model.{k}.lora_A.weight'], ad[f'base_model.model.{k}.lora_B.weight']
    assert B.abs().sum() > 0  # the adapter learnt something
    assert torch.allclose(w[f'{k}.weight'], base[f'{k}.weight'] + (B @ A).T * (cfgj['lora_alpha'] / cfgj['r']), atol=1e-6)


def test_checkpoints_hold_only_the_adapters(tmp_path):
    from nbtrain.trainer import train
    base = save_gpt2(tmp_path/'wide', n_embd=256)
    size = lambda d: sum(f.stat().st_size for f in d.rglob('*') if f.is_file())
    over = {'train.max_steps': 2, 'train.eval_every': 2, 'lora.r': 2}
    full = train(cfg(tmp_path, base, 'full', **over, **{'lora.enabled': False}))
    lora = train(cfg(tmp_path, base, 'lora', **over))
    [a], [b] = (list((r.run_dir/'checkpoints').glob('step-*')) for r in (full, lora))
    assert size(b) < 0.05 * size(a), (size(b), size(a))
    assert set(load_file(b/'model.safetensors')) == {k for k in load_file(b/'model.safetensors') if 'lora_' in k}


def run_ckpt(out, name, base):
    return subprocess.Popen([sys.executable, str(SCRIPT), str(out), name, '0', '--model.name', 'hf', '--model.path', str(base),
                             '--lora.enabled', 'true', '--lora.r', '4', '--lora.dropout', '0.1', '--checkpoint.every_steps', '4'],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, 'PYTHONUNBUFFERED': '1'})


@pytest.mark.slow
def test_sigkill_and_resume_of_a_lora_run_is_bitwise_identical(gpt2, tmp_path):
    from nbtrain.callbacks import read_metrics
    ref = run_ckpt(tmp_path, 'reference', gpt2)  # the uninterrupted run, on the other core while the kills go on
    run_dir, rng = tmp_path/'killed', random.Random(0)
    for _ in range(2):
        p = run_ckpt(tmp_path, 'killed', gpt2)
        before = len(list((run_dir/'checkpoints').glob('step-*'))) if (run_dir/'checkpoints').exists() else 0
        t0 = time.monotonic()
        while p.poll() is None and time.monotonic() - t0 < 300:
            done = [r['step'] for r in read_metrics(run_dir) if 'loss' in r] if (run_dir/'metrics.jsonl').exists() else []
            if done and max(done) > 10 * (before + 1): break
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.3))
        if p.poll() is None: p.send_signal(signal.SIGKILL)
        p.communicate()
    p = run_ckpt(tmp_path, 'killed', gpt2)
    o, e = p.communicate(timeout=600)
    assert p.returncode == 0 and 'DONE step=60' in o and 'Resumed from' in o, e[-2000:]
    o, e = ref.communicate(timeout=600)
    assert ref.returncode == 0 and 'DONE step=60' in o, e[-2000:]
    for f in ('adapter/adapter_model.safetensors', 'model.safetensors'):
        a, b = load_file(tmp_path/'reference'/'final'/f), load_file(run_dir/'final'/f)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f'{f} differs from the uninterrupted run'


def test_a_resume_onto_another_base_is_refused(tmp_path):
    from nbtrain.trainer import Trainer, train
    from nbtrain.checkpoint import CheckpointError
    base = save_gpt2(tmp_path/'base', seed=0)
    train(cfg(tmp_path, base, 'a', **{'train.max_steps': 2, 'checkpoint.save_final': False}))
    save_gpt2(tmp_path/'base', seed=1)  # the same folder, other weights
    with pytest.raises(CheckpointError, match='holds adapters trained on another base model'):
        Trainer(cfg(tmp_path, base, 'a', **{'train.max_steps': 4})).fit()


def test_a_new_classifier_head_trains_in_full(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification
    from nbtrain.trainer import train
    from nbtrain.loading import load_model
    tok = tokenizer()
    tok.add_special_tokens({'pad_token': '[PAD]'})
    BertForSequenceClassification(BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                                             vocab_size=len(tok), max_position_embeddings=64)).save_pretrained(tmp_path/'bert')
    tok.save_pretrained(tmp_path/'bert')
    res = train(cfg(tmp_path, tmp_path/'bert', 'clf', **{'task.name': 'sequence_classification', 'train.max_steps': 20,
                                                         'train.eval_every': 20, 'train.eval_batches': None}))
    lo = json.loads((res.run_dir/'model.json').read_text())['lora']
    assert lo['modules_to_save'] == ['classifier']  # new and random: it trains in full
    assert len(lo['target_modules']) == 12 and all('.encoder.layer.' in t for t in lo['target_modules'])  # not the pooler
    assert res.last_eval['val_loss'] < res.first_eval['val_loss']
    m = load_model(res.run_dir)
    assert type(m).__name__ == 'BertForSequenceClassification' and m.config.num_labels == 3


def test_quantization_and_vocabulary_mistakes_say_what_to_do(gpt2, tmp_path):
    from nbtrain.trainer import Trainer
    from nbtrain.errors import ConfigError, ModelLoadError
    with pytest.raises(ConfigError, match="lora.quantize='4bit' needs a CUDA GPU"):
        Trainer(cfg(tmp_path, gpt2, 'q', **{'lora.quantize': '4bit'}))
    small = save_gpt2(tmp_path/'small-vocab', vocab=300)  # its tokenizer has 400 tokens
    with pytest.raises(ModelLoadError, match='Set model.resize_embeddings true'):
        Trainer(cfg(tmp_path, small, 'v'))
    assert not (tmp_path/'runs'/'v').exists()  # nothing written for a refused run
    tr = Trainer(cfg(tmp_path, small, 'w', **{'model.resize_embeddings': True, 'lora.enabled': False, 'train.max_steps': 1}))
    assert tr.raw_model.get_input_embeddings().num_embeddings == 400


def test_a_hub_model_by_id_with_lora_through_the_cli(gpt2, tmp_path):
    from huggingface_hub import HfApi
    from hubserver import HubServer
    with HubServer(tokens={TOKEN: 'alice'}) as hub:
        api = HfApi(endpoint=hub.url, token=TOKEN)
        api.create_repo('alice/tiny-gpt2', private=True)
        sha = api.upload_folder(repo_id='alice/tiny-gpt2', folder_path=str(gpt2)).oid
        env = {k: v for k, v in os.environ.items() if k not in ('HF_TOKEN', 'HUGGING_FACE_HUB_TOKEN')}
        env.update(HF_ENDPOINT=hub.url, HF_TOKEN=TOKEN, OMP_NUM_THREADS='1', HF_HUB_DISABLE_TELEMETRY='1')
        p = subprocess.run([sys.executable, '-m', 'nbtrain.cli', 'train', '--output_dir', str(tmp_path/'runs'), '--name', 'ft',
                            '--model.name', 'hf', '--model.path', 'alice/tiny-gpt2', '--model.cache_dir', str(tmp_path/'cache'),
                            '--lora.enabled', 'true', '--data.corpus_size', '60', '--data.seq_len', '32', '--train.max_steps', '2',
                            '--train.micro_batch_size', '4', '--train.progress_bar', 'false'],
                           capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "data.tokenizer: the model's own" in p.stdout and 'LoRA r=8' in p.stdout
    final = tmp_path/'runs'/'ft'/'final'
    ad = json.loads((final/'adapter'/'adapter_config.json').read_text())
    assert (ad['base_model_name_or_path'], ad['revision']) == ('alice/tiny-gpt2', sha)
    leaked = [str(f) for f in tmp_path.rglob('*') if f.is_file() and TOKEN.encode() in f.read_bytes()]
    assert not leaked and TOKEN not in p.stdout + p.stderr, leaked


@pytest.mark.parametrize('over', [{'train.gradient_checkpointing': True},
                                  {'model.name': 'gpt', 'model.path': None, 'data.tokenizer': 'char'}], ids=['hf-checkpointing', 'reference-gpt'])
def test_lora_with_gradient_checkpointing_and_on_a_reference_model(gpt2, tmp_path, over):
    from nbtrain.trainer import train
    from nbtrain.loading import load_model
    res = train(cfg(tmp_path, gpt2, 'x', **{'train.max_steps': 8, 'train.eval_every': 8, **over}))
    assert res.last_eval['val_loss'] < res.first_eval['val_loss']
    lo = json.loads((res.run_dir/'model.json').read_text())['lora']
    assert lo['trainable_params'] < lo['base_params']
    nb = json.loads((res.run_dir/'final'/'nbtrain.json').read_text())['model']['lora']
    assert nb['merged']  # a base that cannot be downloaded again is always merged
    assert not any('lora_' in n for n, _ in load_model(res.run_dir).named_parameters())


@pytest.mark.slow
def test_lora_under_ddp_and_fsdp_matches_one_process(tmp_path):
    common = ['--data.corpus_size', '80', '--data.seq_len', '32', '--train.max_steps', '4', '--train.eval_every', '4',
              '--train.eval_batches', '2', '--train.progress_bar', 'false', '--train.deterministic', 'true',
              '--train.accelerator', 'cpu', '--optim.lr', '1e-2', '--lora.enabled', 'true', '--lora.dropout', '0',
              '--train.micro_batch_size', '8', '--tracking.dashboard', 'false']
    runs = {'one': ['--train.grad_accum', '2', '--train.devices', '1'],
            'ddp': ['--train.devices', '2', '--train.strategy', 'ddp'], 'fsdp': ['--train.devices', '2', '--train.strategy', 'fsdp']}
    procs = {}
    try:
        for name, extra in runs.items():  # all three at once: one's imports and single-process phases overlap the others'
            with open(tmp_path/f'{name}.out', 'w') as o, open(tmp_path/f'{name}.err', 'w') as e:
                procs[name] = subprocess.Popen([sys.executable, '-m', 'nbtrain.cli', 'train', '--output_dir', str(tmp_path), '--name', name,
                                                *common, *extra], stdout=o, stderr=e, text=True, env={**os.environ, 'OMP_NUM_THREADS': '1'})
        for name, p in procs.items():
            p.wait(600)
            assert p.returncode == 0, (tmp_path/f'{name}.out').read_text()[-2000:] + (tmp_path/f'{name}.err').read_text()[-3000:]
    finally:
        for p in procs.values():
            if p.poll() is None: p.kill(); p.wait()
    for f in ('adapter/adapter_model.safetensors', 'model.safetensors'):  # FSDP merges from the gathered weights
        a = load_file(tmp_path/'one'/'final'/f)
        for name in ('ddp', 'fsdp'):
            b = load_file(tmp_path/name/'final'/f)
            assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4, (name, f)
