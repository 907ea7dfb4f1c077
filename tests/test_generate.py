"""nbtrain.generate on every kind of model it serves: the reference GPT with and without its KV cache, LoRA adapters put in
place, a model.py export, run folders, Hugging Face causal and seq2seq models, a seq2seq module; and what it must leave alone
(the training mode, the global random state)."""
import json, threading
from dataclasses import asdict
from pathlib import Path
import pytest
import torch
from torch import nn

from nbtrain.errors import ConfigError, ModelLoadError, TaskError
from nbtrain.generate import generate, stream, model_kind
from nbtrain.models import GPT, EncoderClassifier
from nbtrain.tokenizer import CharTokenizer

FIXTURES = Path(__file__).resolve().parent/'fixtures'
TOK = CharTokenizer('abcdefghij .')


def gpt(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(**{'n_layer': 2, 'n_head': 2, 'd_model': 32, 'vocab_size': TOK.vocab_size, 'max_seq_len': 24, **kw})


def final_folder(folder: Path, model: nn.Module, task: str = 'causal_lm', tok=TOK) -> Path:
    "final/ as a run writes it, for a reference model: weights, nbtrain.json, the tokenizer."
    from safetensors.torch import save_model
    name = {GPT: 'gpt', EncoderClassifier: 'encoder_classifier'}[type(model)]
    final = folder/'final'
    final.mkdir(parents=True)
    save_model(model, str(final/'model.safetensors'))
    (final/'nbtrain.json').write_text(json.dumps({'model': {'kind': 'reference', 'source': name, 'config': asdict(model.config)}, 'task': task}))
    if tok is not None: tok.save(final)
    return folder


def test_cached_and_uncached_greedy_decoding_give_the_same_tokens():
    m = gpt().eval()
    prompts = ['abc', 'j', 'hello . ab', 'a' * 30]  # the last is longer than max_seq_len 24: the window keeps its end
    for n in (5, 40):  # within the window, and past it (the cache gives way to the sliding window)
        cached = generate(m, prompts, tokenizer=TOK, max_new_tokens=n, temperature=0)
        plain = generate(m, prompts, tokenizer=TOK, max_new_tokens=n, temperature=0, use_cache=False)
        assert cached == plain and all(len(c) == n for c in cached), (cached, plain)
    sampled = dict(tokenizer=TOK, max_new_tokens=30, temperature=1.0, top_k=8, top_p=0.9, repetition_penalty=1.2, seed=5)
    assert generate(m, prompts, **sampled) == generate(m, prompts, use_cache=False, **sampled)  # same logits, same draws


def test_lora_adapters_in_place_generate_with_the_cache():
    from nbtrain.config import LoraConfig
    from nbtrain.lora import apply_lora, is_lora
    m = gpt()
    apply_lora(m, LoraConfig(enabled=True, r=4))
    assert is_lora(m) and type(m) is GPT
    with torch.no_grad():  # adapters that do something
        for n, p in m.named_parameters():
            if 'lora_B' in n: p.normal_(0, 0.5)
    m.train()
    out = generate(m, ['abc', 'def'], tokenizer=TOK, max_new_tokens=30, temperature=0)
    assert out == generate(m, ['abc', 'def'], tokenizer=TOK, max_new_tokens=30, temperature=0, use_cache=False)
    assert m.training and all(mod.training for mod in m.modules())


def test_training_mode_and_global_random_state_are_left_as_they_were():
    m = gpt(dropout=0.5)
    m.train()
    m.trunk.blocks[0].eval()  # a module its owner keeps in eval mode stays so
    modes = {n: mod.training for n, mod in m.named_modules()}
    cpu = torch.random.get_rng_state()
    a = generate(m, 'abc', tokenizer=TOK, max_new_tokens=20, temperature=0)
    b = generate(m, 'abc', tokenizer=TOK, max_new_tokens=20, temperature=0)
    generate(m, 'abc', tokenizer=TOK, max_new_tokens=20)  # unseeded sampling too
    assert a == b  # eval mode: no dropout
    assert torch.equal(torch.random.get_rng_state(), cpu)
    assert {n: mod.training for n, mod in m.named_modules()} == modes
    assert torch.is_grad_enabled()


def test_stream_yields_while_generating_and_stops_early():
    m = gpt().eval()
    it = stream(m, 'abc', tokenizer=TOK, max_new_tokens=200, temperature=0)
    first = next(it)
    assert isinstance(first, str) and first
    it.close()  # the caller stops: nothing runs on
    seen = []
    out = generate(m, ['ab', 'cd'], tokenizer=TOK, max_new_tokens=10, temperature=0, on_token=lambda i, p: seen.append((i, p)))
    assert [''.join(p for i, p in seen if i == k) for k in (0, 1)] == out


def test_end_of_text_and_stop_strings_end_the_text():
    m = gpt().eval()
    full = generate(m, 'abc', tokenizer=TOK, max_new_tokens=40, temperature=0)[0]
    stop = full[5:7]
    cut = generate(m, 'abc', tokenizer=TOK, max_new_tokens=40, temperature=0, stop=[stop, 'zzz'])[0]
    assert cut == full[:full.find(stop)]

    class EndsAtOnce(nn.Module):  # always says end-of-text
        def forward(self, input_ids):
            out = torch.zeros(*input_ids.shape, TOK.vocab_size)
            out[..., TOK.eos_id] = 1
            return out
    assert generate(EndsAtOnce(), ['abc', ''], tokenizer=TOK, max_new_tokens=10, temperature=0) == ['', '']


def test_a_model_py_export_generates_with_a_window():
    from nbtrain.loading import load_model
    from nbtrain.tokenizer import ByteTokenizer
    m = load_model(FIXTURES/'gist_gpt', trust_code=True)  # vocab 96, max_seq_len 64, no cache
    assert model_kind(m) == 'causal'
    tok = CharTokenizer(''.join(chr(c) for c in range(32, 32 + 90)))  # 94 ids < 96
    out = generate(m, ['Hello', 'abc'], tokenizer=tok, max_new_tokens=80, temperature=0.7, seed=0)  # 85 tokens > 64
    assert len(out) == 2 and all(isinstance(t, str) and t for t in out)
    assert out == generate(m, ['Hello', 'abc'], tokenizer=tok, max_new_tokens=80, temperature=0.7, seed=0)


def test_a_run_folder_is_loaded_with_its_tokenizer(tmp_path):
    m = gpt().eval()
    run = final_folder(tmp_path/'run', m)
    want = generate(m, ['abc', 'hij'], tokenizer=TOK, max_new_tokens=12, temperature=0)
    assert generate(run, ['abc', 'hij'], max_new_tokens=12, temperature=0) == want
    assert generate(str(run/'final'), 'abc', max_new_tokens=12, temperature=0) == want[:1]
    assert ''.join(stream(run, 'hij', max_new_tokens=12, temperature=0)) == want[1]

    with pytest.raises(ModelLoadError, match='no such folder'): generate(tmp_path/'nowhere', 'a')
    enc = final_folder(tmp_path/'clf', EncoderClassifier(vocab_size=TOK.vocab_size, num_labels=2), task='sequence_classification')
    with pytest.raises(TaskError, match='sequence_classification model: generate continues text with a language model'): generate(enc, 'a')
    bare = final_folder(tmp_path/'bare', m, tok=None)
    with pytest.raises(ConfigError, match='generate needs a tokenizer'): generate(bare, 'a')
    assert generate(bare, 'abc', tokenizer=TOK, max_new_tokens=12, temperature=0) == want[:1]


@pytest.mark.parametrize('kw, words', [
    (dict(temperature=-0.5), 'temperature=-0.5: expected a number >= 0'),
    (dict(top_k=0), 'top_k=0'), (dict(top_p=0.0), 'top_p=0.0'), (dict(top_p=True), 'top_p=True'),
    (dict(max_new_tokens=2.5), 'max_new_tokens=2.5'), (dict(repetition_penalty=-1), 'repetition_penalty=-1'),
    (dict(stop=[1]), 'stop=[1]'), (dict(seed=-3), 'seed=-3'), (dict(tokenizer=object()), 'tokenizer=object'),
])
def test_bad_settings_name_the_setting(kw, words):
    with pytest.raises(ConfigError) as e: generate(gpt(), 'abc', **{'tokenizer': TOK, **kw})
    assert words in str(e.value)


def test_hugging_face_causal_lm_uses_its_generate():
    transformers = pytest.importorskip('transformers')
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=TOK.vocab_size, n_positions=32, n_embd=32, n_layer=2,
                                                              n_head=2, eos_token_id=TOK.eos_id, bos_token_id=TOK.eos_id))
    hf.train()
    ids = torch.tensor([TOK.encode('abc')])
    with torch.no_grad():
        ref = hf.eval().generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False, pad_token_id=0)[0, 3:].tolist()
    hf.train()
    ref = ref[:ref.index(TOK.eos_id)] if TOK.eos_id in ref else ref
    state = torch.random.get_rng_state()
    pieces = []
    out = generate(hf, 'abc', tokenizer=TOK, max_new_tokens=12, temperature=0, on_token=lambda i, p: pieces.append(p))
    assert out == [TOK.decode(ref)] and ''.join(pieces) == out[0]
    s = dict(tokenizer=TOK, max_new_tokens=20, temperature=1.0, top_k=5, top_p=0.9, repetition_penalty=1.3)
    assert generate(hf, ['abc', 'de'], seed=11, **s)[1] == generate(hf, 'de', seed=11, **s)[0]
    assert torch.equal(torch.random.get_rng_state(), state) and hf.training
    long = generate(hf, 'abc' * 20, tokenizer=TOK, max_new_tokens=40, temperature=0)[0]  # 60 + 40 > 32 positions: cut to fit
    assert isinstance(long, str)
    it = stream(hf, 'abc', tokenizer=TOK, max_new_tokens=200, temperature=0.8, seed=0)
    next(it); it.close()  # the thread running generate is told to stop and joined
    assert not any(t.name == 'nbtrain-generate' for t in threading.enumerate())


def test_seq2seq_models():
    transformers = pytest.importorskip('transformers')
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=TOK.vocab_size, d_model=32, d_ff=64, d_kv=8, num_layers=1, num_heads=2, decoder_start_token_id=TOK.pad_id,
        pad_token_id=TOK.pad_id, eos_token_id=TOK.eos_id)).eval()
    assert model_kind(t5) == 'hf_seq2seq'
    src = torch.tensor([TOK.encode('abc')])
    with torch.no_grad():
        ref = t5.generate(src, attention_mask=torch.ones_like(src), max_new_tokens=8, do_sample=False)[0, 1:].tolist()
    ref = ref[:ref.index(TOK.eos_id)] if TOK.eos_id in ref else ref
    assert generate(t5, 'abc', tokenizer=TOK, max_new_tokens=8, temperature=0) == [TOK.decode(ref)]

    class Seq2Seq(nn.Module):  # a hand-written encoder-decoder: the decoder's next token is the source token at its position
        config = type('C', (), {'decoder_start_token_id': TOK.pad_id})()
        def forward(self, input_ids, decoder_input_ids):
            T = decoder_input_ids.shape[1]
            src = torch.cat([input_ids, input_ids.new_full((1, T), TOK.eos_id)], 1)[:, :T]
            return nn.functional.one_hot(src, TOK.vocab_size).float() * 10
    assert model_kind(Seq2Seq()) == 'seq2seq'
    assert generate(Seq2Seq(), ['abc', 'hij. a'], tokenizer=TOK, max_new_tokens=10, temperature=0) == ['abc', 'hij. a']
