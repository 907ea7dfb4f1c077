"""Streamed data (`nbtrain.stream`): exact resume through a checkpoint file, .txt folders, processes reading disjoint
parts, a Hub dataset streamed from the stand-in Hub, and the errors a user sees."""
import json, os, subprocess, sys, textwrap, time
from pathlib import Path
import pytest
import torch
from nbtrain.errors import DataError
from nbtrain.processing import PackedLMDataset, MLMCollator, IGNORE_INDEX
from nbtrain.sources import split_documents
from nbtrain.tokenizer import CharTokenizer
from nbtrain.stream import TokenStream, StreamLoader, stream_validation, stream_tokenizer, stream_source

HERE = Path(__file__).parent
WORDS = ['the cat', 'sat on', 'a mat', 'and then', 'the dog', 'ran off', 'far away', 'at noon']


def make_docs(n, tag='doc'):
    return [f"{tag} {i}: " + ' '.join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(i % 9 + 1)) for i in range(n)]


def write_jsonl(path, docs, column='text'):
    path.write_text(''.join(json.dumps({'id': i, column: d}) + '\n' for i, d in enumerate(docs)))
    return path


def same(a, b):
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


def run_epochs(dl, epochs, stop_after=None):
    "Batches of `epochs` epochs from where `dl` is; with `stop_after`, stop after that many and return the state too."
    out = []
    while True:
        for b in dl:
            out.append(b)
            if len(out) == stop_after: return out, dl.state_dict()
        assert dl.epoch_done
        if dl.epoch >= epochs: return out, None


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp('stream')
    docs = make_docs(240)
    return d, docs, write_jsonl(d / 'corpus.jsonl', docs), CharTokenizer(docs)


@pytest.mark.parametrize('task', ['causal_lm', 'masked_lm'])
def test_resume_through_a_checkpoint_file(corpus, task, tmp_path):
    "Stop after k batches, torch.save the state, torch.load it (weights_only, as a checkpoint does): the rest is exactly an uninterrupted run's."
    d, docs, f, tok = corpus
    causal = task == 'causal_lm'
    collate = MLMCollator(tok.mask_id, tok.vocab_size, tok.pad_id, tok.special_ids) if not causal else None
    def loader(prefetch):
        s = TokenStream(f, tok, 24, causal=causal, shuffle_buffer=32, seed=7, read_batch=16, skip_examples=10)
        return StreamLoader(s, 4, prefetch=prefetch, **({'collate': collate} if collate else {}))
    full, _ = run_epochs(loader(0), 2)
    n0 = len(run_epochs(loader(0), 1)[0])
    assert len(full) > n0 + 5
    for k in (3, n0 - 1, n0, n0 + 4):  # inside epoch 0, its last batch but one, its last, inside epoch 1
        first, state = run_epochs(loader(3), 2, stop_after=k)
        assert state['epoch'] == (1 if k >= n0 else 0)  # saved after a pass's last batch: the next pass, from its start
        torch.save(state, tmp_path / 'stream.pt')
        dl = loader(3)
        dl.load_state_dict(torch.load(tmp_path / 'stream.pt', weights_only=True))
        rest, _ = run_epochs(dl, 2)
        assert same(full, first + rest), (task, k)
        dl.close()


@pytest.mark.parametrize('prefetch', [0, 2])
def test_epoch_done_with_the_last_batch(corpus, prefetch):
    "The last batch of a pass says so when it is handed out; the epoch counts passes completed; drop_last drops a short batch."
    d, docs, f, tok = corpus
    for drop_last in (False, True):
        dl = StreamLoader(TokenStream(f, tok, 24, shuffle_buffer=4), 5, prefetch=prefetch, drop_last=drop_last)
        flags, epochs = [], []
        for b in dl: flags.append(dl.epoch_done); epochs.append(dl.epoch)
        assert flags == [False] * (len(flags) - 1) + [True] and epochs == [0] * (len(flags) - 1) + [1]
        blocks = dl.stream.blocks
        assert len(flags) == (blocks // 5 if drop_last else -(-blocks // 5)) and blocks % 5, (blocks, len(flags))
        assert dl.state_dict()['epoch'] == 1
        again = list(dl)  # the next iteration is the next epoch
        assert len(again) == len(flags) and dl.epoch == 2


def test_state_is_that_of_the_last_batch_handed_out(corpus):
    "The prefetching thread runs ahead; the state is still the one after the batch the loop got."
    d, docs, f, tok = corpus
    mk = lambda p: StreamLoader(TokenStream(f, tok, 16, shuffle_buffer=8, seed=1), 2, prefetch=p)
    ahead = mk(6)
    it = iter(ahead)
    got = [next(it) for _ in range(2)]
    deadline = time.monotonic() + 20
    while not ahead._queue.full() and time.monotonic() < deadline: time.sleep(0.01)  # poll: the thread has run ahead
    assert ahead._queue.full()
    state = ahead.state_dict()
    assert ahead.stream.blocks > 2 * 2 + 4  # the stream itself is further on
    assert state['blocks'] == 4
    ref = mk(0)
    ref_it = iter(ref)
    assert same(got, [next(ref_it) for _ in range(2)])
    r = mk(0); r.load_state_dict(state)
    assert same(list(r)[:5], [next(ref_it) for _ in range(5)])
    ahead.close()


def test_txt_folder_matches_packed_dataset_and_processes_are_disjoint(tmp_path):
    "A folder of .txt files (documents between blank lines) streams the blocks PackedLMDataset makes of them."
    folder = tmp_path / 'texts'; folder.mkdir()
    docs = make_docs(90, 'story')
    for k in range(3):
        part = docs[k * 30:(k + 1) * 30]
        (folder / f'part{k}.txt').write_text('\n\n'.join(part) + '\n\n\n', encoding='utf-8')
    expect = [d for k in range(3) for d in split_documents((folder / f'part{k}.txt').read_text())]
    assert expect == docs
    tok = CharTokenizer(docs + make_docs(12, 'extra'))
    ref = PackedLMDataset(tok.encode_flat(docs, add_eos=True)[0], 32, tok.pad_id)
    assert same(list(TokenStream(folder, tok, 32)), [ref[i] for i in range(len(ref))])
    # two processes: 3 files do not divide by 2, so each keeps every second example; 4 files go 2 and 2
    def doc_set(stream):
        ids = torch.cat([b['input_ids'][b['labels'][1:] != IGNORE_INDEX] for b in stream]).tolist()
        return tok.decode(ids + [tok.eos_id], skip_special=False).split('<eos>')[:-1]
    for n_files in (3, 4):
        if n_files == 4: (folder / 'part3.txt').write_text('\n\n'.join(make_docs(12, 'extra')) + '\n')
        alls = docs + (make_docs(12, 'extra') if n_files == 4 else [])
        parts = [doc_set(TokenStream(folder, tok, 32, rank=r, world_size=2, shuffle_buffer=5)) for r in range(2)]
        assert not set(parts[0]) & set(parts[1]) and sorted(parts[0] + parts[1]) == sorted(alls), n_files
        # with a validation slice held out, the slice is the first examples whatever the processes
        val = stream_validation(folder, tok, 32, 7)
        held = [doc_set(TokenStream(folder, tok, 32, rank=r, world_size=2, skip_examples=val.skip_examples)) for r in range(2)]
        assert sorted(held[0] + held[1]) == sorted(alls[7:]) and not set(held[0]) & set(held[1]), n_files


def test_line_per_document_txt_and_tokenizer_sample(tmp_path):
    "A .txt without blank lines holds one document a line; char tokenizers are built from the first examples."
    f = tmp_path / 'lines.txt'
    docs = make_docs(50)
    f.write_text('\n'.join(docs) + '\n')
    assert stream_source(f).kwargs == {'sample_by': 'line'}
    tok = stream_tokenizer('char', f, sample_examples=20)
    assert set(tok.chars) == set(''.join(docs[:20]))
    ref = PackedLMDataset(tok.encode_flat(docs, add_eos=True)[0], 16, tok.pad_id)
    assert same(list(TokenStream(f, tok, 16)), [ref[i] for i in range(len(ref))])


def _message(f):
    with pytest.raises(DataError) as e: f()
    return str(e.value)


def test_clear_errors(corpus, tmp_path, monkeypatch):
    d, docs, f, tok = corpus
    assert 'does not exist' in _message(lambda: TokenStream(d / 'nope.jsonl', tok, 16))
    m = _message(lambda: TokenStream(f, tok, 16, text_column='body'))
    assert "data.text_column='body'" in m and 'Its columns: id, text' in m
    other = write_jsonl(tmp_path / 'other.jsonl', docs[:5], column='content')
    assert TokenStream(other, tok, 16).column == 'content'  # the usual names are found
    nums = tmp_path / 'nums.jsonl'
    nums.write_text(''.join(json.dumps({'text': v}) + '\n' for v in ['fine', 'also fine', 42]))
    m = _message(lambda: list(TokenStream(nums, tok, 16)))
    assert 'example 3' in m and 'int 42' in m and 'expected a string' in m
    (tmp_path / 'a.zip').write_bytes(b'PK\x05\x06' + b'\0' * 18)
    assert 'cannot be streamed' in _message(lambda: stream_source(tmp_path / 'a.zip'))
    (tmp_path / 'a.conll').write_text('Paris B-LOC\n')
    assert 'cannot be streamed' in _message(lambda: stream_source(tmp_path / 'a.conll'))
    assert 'streaming=false' in _message(lambda: stream_source('embedded'))
    assert 'streaming=false' in _message(lambda: stream_source(['a list', 'of texts']))
    classes = tmp_path / 'classes'; (classes / 'cat').mkdir(parents=True); (classes / 'cat' / '1.txt').write_text('meow')
    assert 'streaming=false' in _message(lambda: stream_source(classes))
    mixed = tmp_path / 'mixed'; mixed.mkdir(); write_jsonl(mixed / 'a.jsonl', docs[:3]); (mixed / 'b.csv').write_text('text\nx\n')
    assert 'mixes file types' in _message(lambda: stream_source(mixed))
    assert 'only 240 examples' in _message(lambda: stream_validation(f, tok, 16, 500))
    assert 'Tokenizer object' in _message(lambda: TokenStream(f, 'char', 16))
    state = TokenStream(f, tok, 16, seed=1).state_dict()
    m = _message(lambda: TokenStream(f, tok, 16, seed=2).load_state_dict(state))
    assert 'seed: 1 then, 2 now' in m
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    assert 'offline mode is on' in _message(lambda: stream_source('hf:someone/corpus'))


HF_SCRIPT = textwrap.dedent('''
    import json, sys, torch
    from nbtrain.errors import DataError
    from nbtrain.processing import PackedLMDataset
    from nbtrain.stream import TokenStream, StreamLoader, stream_validation, stream_tokenizer
    docs = json.loads(sys.argv[1]); out = {}
    tok = stream_tokenizer('char', 'hf:tester/corpus', sample_examples=1000)
    val = stream_validation('hf:tester/corpus', tok, 16, 5)
    out['val'] = [val.split, val.skip_examples, val.examples]
    ref = PackedLMDataset(tok.encode_flat(docs[:30], add_eos=True)[0], 16, tok.pad_id)
    s = TokenStream('hf:tester/corpus', tok, 16)
    out['plain_equal'] = [all(torch.equal(a[k], ref[i][k]) for k in a) for i, a in enumerate(s)] == [True] * len(ref)
    mk = lambda: StreamLoader(TokenStream('hf:tester/corpus', tok, 16, shuffle_buffer=6, seed=2, read_batch=4), 3, prefetch=2)
    full = list(mk())
    dl = mk(); it = iter(dl); first = [next(it) for _ in range(4)]
    torch.save(dl.state_dict(), sys.argv[2]); dl.close()
    r = mk(); r.load_state_dict(torch.load(sys.argv[2], weights_only=True))
    rest = list(r)
    out['resume_equal'] = len(full) == len(first) + len(rest) and all(torch.equal(a['labels'], b['labels']) for a, b in zip(full, first + rest))
    out['n_batches'] = len(full)
    try: TokenStream('hf:tester/missing', tok, 16)
    except DataError as e: out['missing'] = str(e)
    print('RESULT ' + json.dumps(out))
''')


def test_hf_dataset_streams_from_the_stand_in_hub(tmp_path):
    "hf:NAME through datasets' own Hub client, against the loopback stand-in: splits, validation split, resume."
    sys.path.insert(0, str(HERE))
    from hubserver import HubServer
    docs = make_docs(36)
    with HubServer() as hub:
        hub.state.add_dataset('tester/corpus', {
            'README.md': '---\nlicense: mit\n---\n# A small corpus\n',
            'data/train.jsonl': ''.join(json.dumps({'text': t}) + '\n' for t in docs[:30]),
            'data/validation.jsonl': ''.join(json.dumps({'text': t}) + '\n' for t in docs[30:])})
        env = {k: v for k, v in os.environ.items() if not k.startswith(('HF_', 'HUGGING'))}
        env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / 'hf'), HF_HUB_DISABLE_PROGRESS_BARS='1',
                   HF_HUB_DISABLE_TELEMETRY='1', PYTHONPATH=str(HERE.parent))
        r = subprocess.run([sys.executable, '-c', HF_SCRIPT, json.dumps(docs), str(tmp_path / 's.pt')], env=env,
                           capture_output=True, text=True, timeout=240)
    line = next((l for l in r.stdout.splitlines() if l.startswith('RESULT ')), None)
    assert line, r.stdout[-2000:] + r.stderr[-3000:]
    out = json.loads(line[7:])
    assert out['val'] == ['validation', 0, 5]
    assert out['plain_equal'] and out['resume_equal'] and out['n_batches'] > 4, out
    assert "Hugging Face dataset 'tester/missing'" in out['missing'], out['missing']
    assert any(q.path.startswith('/datasets/tester/corpus/resolve/') for q in hub.state.requests)


def test_parquet_and_csv(tmp_path):
    "Parquet (row groups) and CSV stream the same blocks as PackedLMDataset; parquet resumes exactly mid-file."
    pq, pa = pytest.importorskip('pyarrow.parquet'), pytest.importorskip('pyarrow')
    docs = make_docs(600)
    pq.write_table(pa.table({'content': docs, 'n': list(range(600))}), tmp_path / 'c.parquet', row_group_size=100)
    (tmp_path / 'c.csv').write_text('text,x\n' + ''.join(f'"{d}",{i}\n' for i, d in enumerate(docs[:80])))
    tok = CharTokenizer(docs)
    for f, n in (('c.parquet', 600), ('c.csv', 80)):
        ref = PackedLMDataset(tok.encode_flat(docs[:n], add_eos=True)[0], 32, tok.pad_id)
        assert same(list(TokenStream(tmp_path / f, tok, 32)), [ref[i] for i in range(len(ref))]), f
    mk = lambda: StreamLoader(TokenStream(tmp_path / 'c.parquet', tok, 32, shuffle_buffer=50, seed=1), 8)
    full = list(mk())
    dl = mk(); it = iter(dl); first = [next(it) for _ in range(len(full) // 2)]
    torch.save(dl.state_dict(), tmp_path / 's.pt'); dl.close()
    r = mk(); r.load_state_dict(torch.load(tmp_path / 's.pt', weights_only=True))
    assert same(full, first + list(r))


class Generated(torch.utils.data.IterableDataset):
    "A user's own stream of ready examples, made from a seed and the pass number (the same each time a pass is read)."
    def __init__(self, n=40): self.n, self.epoch = n, 0
    def set_epoch(self, epoch): self.epoch = epoch
    def __iter__(self):
        g = torch.Generator().manual_seed(1000 + self.epoch)
        for _ in range(self.n):
            x = torch.randint(0, 40, (17,), generator=g)
            yield {'input_ids': x[:16], 'labels': x}


def test_a_users_iterable_dataset_trains_and_resumes_exactly(tmp_path):
    "A DataBundle whose train is an IterableDataset trains as a stream (passes counted as they end), and a run cut off and resumed ends with the uninterrupted run's weights."
    from safetensors.torch import load_file
    from nbtrain.callbacks import Callback
    from nbtrain.config import load_config
    from nbtrain.data import DataBundle
    from nbtrain.processing import collate_stack
    from nbtrain.trainer import Trainer
    bundle = lambda: DataBundle(Generated(), None, collate_stack, None, 40, None, {})
    over = lambda name: {'train.max_steps': 14, 'data.seq_len': 16, 'train.micro_batch_size': 4, 'train.eval_every': None,
                         'checkpoint.every_steps': 3, 'output_dir': str(tmp_path), 'name': name, 'tracking.backends': ['jsonl'],
                         'eval.samples': False, 'train.deterministic': True}
    full = Trainer(load_config(None, 'tiny-cpu', over('full')), data=bundle()).fit()
    assert full.step == 14
    class CutAt7(Callback):
        def on_step_end(self, trainer):
            if trainer.step == 7: trainer.should_stop = True
    cut = Trainer(load_config(None, 'tiny-cpu', over('cut')), data=bundle(), callbacks=[CutAt7()]).fit()
    assert cut.step == 7  # 10 batches a pass: the cut is in the second pass
    rest = Trainer(load_config(None, 'tiny-cpu', over('cut')), data=bundle()).fit()
    assert rest.step == 14
    a, b = (load_file(r.run_dir/'final'/'model.safetensors') for r in (full, rest))
    assert all(torch.equal(a[k], b[k]) for k in a), 'the resumed run differs'


class Labelled(torch.utils.data.IterableDataset):
    "A stream of classification examples (no sequence length the trainer could count tokens by)."
    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        for _ in range(24):
            yield {'input_ids': torch.randint(4, 40, (16,), generator=g), 'attention_mask': torch.ones(16, dtype=torch.long),
                   'labels': torch.randint(0, 2, (), generator=g)}


def test_an_iterable_dataset_of_unknown_length_needs_a_step_count(tmp_path):
    "max_epochs cannot size a stream of unknown length: the error names the iterable dataset and what to set, for a task with no tokens to count too."
    from nbtrain.config import load_config
    from nbtrain.data import DataBundle
    from nbtrain.errors import ConfigError
    from nbtrain.processing import collate_stack
    from nbtrain.trainer import Trainer
    cfg = load_config(None, 'tiny-cpu', {'task.name': 'sequence_classification', 'task.num_labels': 2, 'model.name': 'encoder_classifier',
                                         'data.seq_len': 16, 'train.max_steps': None, 'train.max_epochs': 1, 'output_dir': str(tmp_path)})
    with pytest.raises(ConfigError, match=r'the training set is an iterable dataset: its length is unknown, so train.max_epochs '
                                          r'cannot fix the number of steps .* Set train.max_steps$'):
        Trainer(cfg, data=DataBundle(Labelled(), None, collate_stack, None, 40, 2, {}))
