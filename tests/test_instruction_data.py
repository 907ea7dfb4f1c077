"""Instruction and chat data (data.format prompt_response and chat): the loss reaches only the answers (prompt tokens
get exactly zero gradient, also in packed rows, where no example's loss covers the next one's prompt), EOS ends every
answer, the tokenizer's own chat template is used for a pretrained tokenizer, the shapes `datasets` gives (Alpaca,
ShareGPT, OpenAI messages) are read as they come, long conversations are truncated or refused with counts, and a
run trains end to end from the command line."""
import json, math, os, subprocess, sys, warnings
from pathlib import Path
import pytest
import torch
from nbtrain.data import IGNORE_INDEX, build_data, data_settings
from nbtrain.errors import DataError

pytestmark = pytest.mark.usefixtures('one_thread')

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv('NBTRAIN_CACHE_DIR', str(tmp_path/'cache'))


def alpaca(n=60):
    return [{'instruction': f'Add {a} and {a % 7 + 2}.', 'input': '' if a % 3 else 'Answer with the number only.',
             'output': str(a + a % 7 + 2)} for a in range(n)]


def settings(tmp_path, **kw):
    return data_settings(None, cache_dir=str(tmp_path/'cache'), **kw)


def grads_of_logits(bundle, rows, train_on_prompt_positions=None):
    "The tiny reference GPT on a batch of `rows`: the batch, and the gradient of the task's loss with respect to the logits."
    from nbtrain.models import get_reference
    from nbtrain.tasks import build_task
    torch.manual_seed(0)
    model = get_reference('gpt', 'tiny', vocab_size=bundle.vocab_size, max_seq_len=128)
    batch = bundle.collate([bundle.train[i] for i in rows])
    out = model(batch['input_ids'], batch['attention_mask'])
    out.logits.retain_grad()
    task = build_task('causal_lm')
    task.loss(out, batch).backward()
    return batch, out.logits.grad


def test_prompt_tokens_get_zero_gradient(tmp_path):
    b = build_data(settings(tmp_path, source=alpaca(), format='prompt_response', seq_len=96, pack=False), 'causal_lm', 0)
    batch, g = grads_of_logits(b, range(8))
    ids, labels = batch['input_ids'], batch['labels']
    target = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # what position t predicts
    per_position = g.abs().sum(-1)
    assert (per_position[target == IGNORE_INDEX] == 0).all(), 'a prompt (or padding) position got gradient'
    assert (per_position[target != IGNORE_INDEX] > 0).all()
    tok = b.tokenizer
    for r in range(8):  # what is trained is the answer and its <eos>, nothing of the prompt
        trained = tok.decode(ids[r][labels[r] != IGNORE_INDEX], skip_special=False)
        assert trained.endswith('<eos>') and trained[:-5].isdigit(), trained
        assert tok.decode(ids[r][:int(batch['attention_mask'][r].sum())]).startswith('### User:\nAdd ')
    # train_on_prompt: the prompt's positions are trained too (all but each example's first token)
    b2 = build_data(settings(tmp_path, source=alpaca(), format='prompt_response', seq_len=96, pack=False, train_on_prompt=True),
                    'causal_lm', 0)
    batch2, g2 = grads_of_logits(b2, range(8))
    real = batch2['attention_mask'].bool()
    assert (g2.abs().sum(-1)[:, :-1][real[:, 1:]] > 0).all()


def test_the_loss_is_the_mean_over_answer_tokens(tmp_path):
    from nbtrain.models import get_reference
    from nbtrain.tasks import build_task
    b = build_data(settings(tmp_path, source=alpaca(), format='prompt_response', seq_len=96, pack=False), 'causal_lm', 0)
    batch = b.collate([b.train[i] for i in range(4)])
    torch.manual_seed(0)
    model = get_reference('gpt', 'tiny', vocab_size=b.vocab_size, max_seq_len=96)
    out = model(batch['input_ids'], batch['attention_mask'])
    loss = build_task('causal_lm').loss(out, batch)
    terms = []
    for r in range(4):
        for t in range(batch['input_ids'].shape[1] - 1):
            y = batch['labels'][r, t + 1].item()
            if y != IGNORE_INDEX: terms.append(-torch.log_softmax(out.logits[r, t], -1)[y])
    assert terms and abs(loss.item() - torch.stack(terms).mean().item()) < 1e-5


def test_packed_rows_keep_each_examples_mask(tmp_path):
    b = build_data(settings(tmp_path, source=alpaca(80), format='prompt_response', seq_len=128), 'causal_lm', 0)
    unpacked = build_data(settings(tmp_path, source=alpaca(80), format='prompt_response', seq_len=128, pack=False), 'causal_lm', 0)
    assert len(b.train) < len(unpacked.train) and b.info['packing_efficiency'] > b.info['padded_efficiency']
    multi = [i for i, r in enumerate(b.train.rows) if len(r) > 1]
    assert multi
    batch, g = grads_of_logits(b, multi[:4])
    labels, ids = batch['labels'], batch['input_ids']
    target = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    assert (g.abs().sum(-1)[target == IGNORE_INDEX] == 0).all()
    tok = b.tokenizer
    for r, row in enumerate(multi[:4]):
        # every example of the row is whole, in order, and only its answers are targets
        n_examples = len(b.train.rows[row])
        text = tok.decode(ids[r][batch['attention_mask'][r].bool()], skip_special=False)
        assert text.count('### User:\n') == n_examples == text.count('<eos>'), text
        trained = tok.decode(ids[r][labels[r] != IGNORE_INDEX], skip_special=False)
        assert all(a.isdigit() for a in trained.split('<eos>')[:-1]) and trained.count('<eos>') == n_examples, trained
    # the same targets as the unpacked rows, just grouped: nothing lost, nothing of a prompt added
    count = lambda d: sum(int((d[i]['labels'] != IGNORE_INDEX).sum()) for i in range(len(d)))
    assert count(b.train) == count(unpacked.train) == b.info['trained_tokens']


def chatml_tokenizer(folder:Path, eos:str='<|im_end|>'):
    "A pretrained-style tokenizer saved as transformers does: a BPE trained here, with special tokens and a ChatML template."
    transformers = pytest.importorskip('transformers')
    from nbtrain.embedded import embedded_corpus
    from nbtrain.tokenizer import BPETokenizer
    bpe = BPETokenizer.train(embedded_corpus(60).split('\n\n') + ['Add 2 and 3. The answer is 5.'] * 5, vocab_size=400)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe.tok, eos_token=eos, pad_token='<pad>', unk_token='<unk>',
                                               additional_special_tokens=['<|im_start|>', '<|im_end|>'])
    tok.chat_template = CHATML
    tok.save_pretrained(folder)
    return tok


@pytest.mark.parametrize('eos', ['<|im_end|>', '<|endoftext|>'])
def test_a_pretrained_tokenizer_uses_its_own_chat_template(tmp_path, eos):
    hf = chatml_tokenizer(tmp_path/'tok', eos)
    convs = [{'messages': [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': f'Add {a} and 3.'},
                           {'role': 'assistant', 'content': str(a + 3)}, {'role': 'user', 'content': 'Thanks'},
                           {'role': 'assistant', 'content': 'You are welcome.'}]} for a in range(12)]
    b = build_data(settings(tmp_path, source=convs, format='chat', tokenizer=str(tmp_path/'tok'), seq_len=96, pack=False,
                            val_fraction=0.0), 'causal_lm', 0)
    assert b.info['chat_template'] == "the tokenizer's own" and b.info['messages_column'] == 'messages'
    row = b.train[0]
    text = hf.decode(row['input_ids'])
    assert text.startswith('<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nAdd ')
    trained = hf.decode(row['input_ids'][row['labels'] != IGNORE_INDEX])
    a = text.split('Add ')[1].split(' ')[0]
    want = f"{int(a) + 3}<|im_end|>\nYou are welcome.<|im_end|>\n"
    # the tokenizer's end-of-text token ends the last answer, once (ChatML's <|im_end|> is it, or it is appended)
    assert trained == (want if eos == '<|im_end|>' else want + eos), trained
    assert int((row['input_ids'] == hf.eos_token_id).sum()) == (5 if eos == '<|im_end|>' else 1)  # ChatML ends every message with <|im_end|>
    # a template given in data.chat_template wins over the tokenizer's own; 'plain' is nbtrain's
    p = build_data(settings(tmp_path, source=convs, format='chat', tokenizer=str(tmp_path/'tok'), pack=False,
                            val_fraction=0.0, chat_template='plain', seq_len=160), 'causal_lm', 0)
    assert p.info['chat_template'] == 'plain' and hf.decode(p.train[0]['input_ids']).startswith('### System:\nBe brief.')


def test_hf_datasets_shapes_as_they_come(tmp_path):
    datasets = pytest.importorskip('datasets')
    from nbtrain.sources import memory_tables
    share = datasets.Dataset.from_dict({'conversations': [
        {'from': ['human', 'gpt'], 'value': [f'Say {w}.', w]} for w in ['yes', 'no', 'maybe', 'never'] * 5]},
        features=datasets.Features({'conversations': datasets.Sequence({'from': datasets.Value('string'), 'value': datasets.Value('string')})}))
    assert isinstance(memory_tables(share)['train'].columns['conversations'][0], dict)  # datasets gives a dict of lists
    share.save_to_disk(str(tmp_path/'sharegpt'))
    b = build_data(settings(tmp_path, source=str(tmp_path/'sharegpt'), format='chat', seq_len=64, pack=False), 'causal_lm', 0)
    assert b.info['messages_column'] == 'conversations' and b.info['n_train'] == 18 and b.info['n_val'] == 2
    row = b.train[0]
    assert b.tokenizer.decode(row['input_ids'][row['labels'] != IGNORE_INDEX], skip_special=False) in {'yes<eos>', 'no<eos>', 'maybe<eos>', 'never<eos>'}
    alp = datasets.DatasetDict({'train': datasets.Dataset.from_list(alpaca(40)), 'test': datasets.Dataset.from_list(alpaca(6))})
    a = build_data(settings(tmp_path, format='prompt_response', seq_len=96), 'causal_lm', 0, source=alp)
    assert a.info['prompt_column'] == 'instruction + input' and a.info['test_examples'] == 6
    oai = datasets.Dataset.from_list([{'messages': [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello!'}]}] * 10)
    o = build_data(settings(tmp_path, format='chat', seq_len=64), 'causal_lm', 0, source=oai)
    assert o.info['trained_tokens'] == len('Hello!<') * o.info['train_examples']  # six characters and <eos>


def test_csv_messages_as_json_text(tmp_path):
    import csv
    with open(tmp_path/'chat.csv', 'w', newline='') as f:
        w = csv.writer(f); w.writerow(['id', 'messages'])
        for k in range(10): w.writerow([k, json.dumps([{'role': 'user', 'content': f'{k}?'}, {'role': 'assistant', 'content': f'{k}!'}])])
    b = build_data(settings(tmp_path, source=str(tmp_path/'chat.csv'), format='chat', seq_len=32), 'causal_lm', 0)
    assert b.info['n_train'] >= 1 and b.info['trained_tokens'] == 3 * b.info['train_examples']


def long_chats(n=10):
    "Conversations of one exchange, except every fifth: eight exchanges, far longer than 96 characters."
    out = []
    for k in range(n):
        turns = 8 if k % 5 == 0 else 1
        ms = [{'role': 'system', 'content': 'Be brief.'}]
        for t in range(turns): ms += [{'role': 'user', 'content': f'Question {t} of {k}?'}, {'role': 'assistant', 'content': f'Answer {t}.'}]
        out.append({'messages': ms})
    return out


def test_long_conversations_truncated_or_refused_with_counts(tmp_path):
    cfg = dict(source=long_chats(), format='chat', seq_len=96, val_fraction=0.0, pack=False)
    with pytest.raises(DataError, match=r"2 of 10 examples are longer than data.seq_len=96 tokens \(the longest, the in-memory data, row \d+, has \d+\): raise data.seq_len, or set data.long_examples='truncate'"):
        build_data(settings(tmp_path, long_examples='refuse', **cfg), 'causal_lm', 0)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        b = build_data(settings(tmp_path, **cfg), 'causal_lm', 0)
    assert any('2 of 10 examples are longer than data.seq_len=96 tokens' in str(x.message) and '2 lost their oldest turns' in str(x.message) for x in w)
    assert b.info['long_examples'] == dict(policy='truncate', longer_than_seq_len=2, oldest_turns_dropped=2, cut=0, dropped=0)
    tok = b.tokenizer
    texts = [tok.decode(b.train[i]['input_ids'], skip_special=False) for i in range(len(b.train))]
    assert len(texts) == 10 and all(t.startswith('### System:\nBe brief.\n\n### User:\nQuestion ') for t in texts)
    kept = [t for t in texts if 'of 0?' in t][0]  # the system message stays, the newest turns are kept, the oldest went
    assert kept.startswith('### System:\nBe brief.') and 'Question 7 of 0?' in kept and 'Question 0 of 0?' not in kept
    # one exchange longer than seq_len: cut at seq_len; a prompt that leaves no room for its answer: dropped, and said
    rows = [{'prompt': 'p' * 20, 'response': 'r' * 60}, {'prompt': 'q' * 200, 'response': 'a'}] + [{'prompt': 'x', 'response': 'y'}] * 4
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        c = build_data(settings(tmp_path, source=rows, format='prompt_response', seq_len=64, val_fraction=0.0, pack=False), 'causal_lm', 0)
    assert c.info['long_examples'] == dict(policy='truncate', longer_than_seq_len=2, oldest_turns_dropped=0, cut=2, dropped=1)
    assert c.info['train_examples'] == 5 and max(len(c.train[i]['input_ids']) for i in range(5)) == 64
    assert any('1 left with no answer token were dropped' in str(x.message) for x in w)


@pytest.mark.parametrize('records,kw,message', [
    ([{'prompt': 'q', 'answer': ''}] * 4, {}, "the in-memory data, row 1: an empty response in column 'answer'"),
    ([{'text': 'q', 'label': 'a'}] * 4, {}, "needs a column of prompts, but the in-memory data has none named prompt, instruction, question, query: set data.prompt_column to one of its columns: label, text."),
    ([{'prompt': 'q', 'response': 'a'}] * 4, {'response_column': 'respons'}, "data.response_column='respons' is not a column of the in-memory data. Did you mean 'response'?"),
    ([{'prompt': 'q', 'response': 3}] * 4, {}, "column 'response' holds int 3, expected the response as text"),
    ([{'messages': [{'role': 'user', 'content': 'q'}, {'role': 'assistant', 'content': ' '}]}] * 4, {'format': 'chat'}, 'an empty response'),
    ([{'messages': [{'role': 'user', 'content': 'q'}]}] * 4, {'format': 'chat'}, 'row 1: the conversation in column \'messages\' has no assistant message'),
    ([{'chat': []}] * 4, {'format': 'chat'}, "data.format='chat' needs a column of messages, but"),
])
def test_bad_instruction_data_says_where_and_what_works(tmp_path, records, kw, message):
    with pytest.raises(DataError) as e:
        build_data(settings(tmp_path, source=records, **{'format': 'prompt_response', **kw}), 'causal_lm', 0)
    assert message in str(e.value), str(e.value)


@pytest.mark.slow
def test_instruction_tuning_from_the_command_line(tmp_path):
    "A chat file trains the reference GPT end to end from the CLI; the loss is on the answers, the run folder says how the data was read."
    path = tmp_path/'chat.jsonl'
    path.write_text('\n'.join(json.dumps({'messages': [{'role': 'user', 'content': f'Add {a} and {b}.'},
                                                         {'role': 'assistant', 'content': str(a + b)}]})
                              for a in range(30) for b in range(4)))
    env = {**os.environ, 'NBTRAIN_CACHE_DIR': str(tmp_path/'cache'), 'HF_HUB_OFFLINE': '1', 'OMP_NUM_THREADS': '1'}
    args = [sys.executable, '-m', 'nbtrain.cli', 'train', '--data.source', str(path), '--data.format', 'chat',
            '--data.seq_len', '64', '--train.max_steps', '12', '--train.micro_batch_size', '8', '--train.eval_every', '6',
            '--train.eval_batches', '2', '--train.log_every', '3', '--train.progress_bar', 'false', '--optim.lr', '3e-3',
            '--output_dir', str(tmp_path/'runs'), '--name', 'chat']
    r = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path/'runs'/'chat'
    import yaml
    cfg = yaml.safe_load((run/'config.yaml').read_text())
    assert cfg['data']['format'] == 'chat' and cfg['data']['train_on_prompt'] is False
    rows = [json.loads(l) for l in (run/'metrics.jsonl').read_text().splitlines() if l.strip()]
    evals = [x['val_loss'] for x in rows if 'val_loss' in x]
    assert len(evals) >= 2 and all(math.isfinite(v) for v in evals) and evals[-1] < evals[0], evals
    assert (run/'final'/'model.safetensors').is_file() and (run/'final'/'tokenizer.json').is_file()
