"""Seq2seq and token classification from raw data: pairs of texts train nbtrain's encoder-decoder end to end from the
command line (and the run generates), a CoNLL file trains the encoder's per-token head from the command line with
entity scores under the tag names; the Hugging Face shapes (a translation column, ClassLabel tag lists) are read as
they come; a pretrained WordPiece tokenizer puts each word's tag on its first sub-word and ignores the rest."""
import json, math, os, random, subprocess, sys
from pathlib import Path
import pytest
import torch
from nbtrain.data import IGNORE_INDEX, build_data, data_settings
from nbtrain.errors import DataError

pytestmark = pytest.mark.usefixtures('one_thread')
QUICK = ['--train.micro_batch_size', '16', '--train.eval_batches', '2', '--train.log_every', '5',
         '--train.progress_bar', 'false', '--optim.lr', '3e-3', '--checkpoint.every_steps', 'null']


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv('NBTRAIN_CACHE_DIR', str(tmp_path/'cache'))


def settings(tmp_path, **kw): return data_settings(None, cache_dir=str(tmp_path/'cache'), **kw)


def cli(tmp_path, *args):
    env = {**os.environ, 'NBTRAIN_CACHE_DIR': str(tmp_path/'cache'), 'HF_HUB_OFFLINE': '1', 'OMP_NUM_THREADS': '1'}
    r = subprocess.run([sys.executable, '-m', 'nbtrain.cli', 'train', '--output_dir', str(tmp_path/'runs'), *QUICK, *args],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def evals(run:Path) -> list[dict]:
    return [r for r in (json.loads(l) for l in (run/'metrics.jsonl').read_text().splitlines() if l.strip()) if 'val_loss' in r]


@pytest.mark.slow
def test_seq2seq_pairs_train_the_encoder_decoder_from_the_cli(tmp_path):
    rows = [{'source': f'{a} {b} {c}', 'target': f'{c} {b} {a}'} for a in range(10) for b in range(10) for c in range(3)]
    (tmp_path/'pairs.jsonl').write_text('\n'.join(json.dumps(r) for r in rows))
    cli(tmp_path, '--task.name', 'seq2seq', '--model.name', 'encoder_decoder', '--data.source', str(tmp_path/'pairs.jsonl'),
        '--data.seq_len', '16', '--train.max_steps', '40', '--train.eval_every', '20', '--name', 's2s')
    run = tmp_path/'runs'/'s2s'
    ev = evals(run)
    assert len(ev) >= 2 and ev[-1]['val_loss'] < ev[0]['val_loss'] / 3 and ev[-1]['val_acc'] > 0.8, ev
    info = json.loads((run/'data.json').read_text())
    model = json.loads((run/'model.json').read_text())
    assert model['config']['decoder_start_token_id'] == 0 and model['config']['vocab_size'] < 20  # one shared character vocabulary
    assert info['source_column'] == 'source' and info['target_column'] == 'target' and info['decoder_start_token_id'] == 0
    try: from nbtrain.generate import generate
    except ImportError: return
    out = generate(run, ['7 4 1', '2 9 0'], max_new_tokens=8, temperature=0.0)
    assert out == ['1 4 7', '0 9 2'], out


@pytest.mark.slow
def test_conll_file_trains_token_classification_from_the_cli(tmp_path):
    rng, lines = random.Random(0), []
    for _ in range(200):
        lines += [f"{rng.choice(['Anna', 'Bo', 'Cleo'])} NNP B-PER", 'went VBD O', 'to IN O', f"{rng.choice(['Oslo', 'Rome', 'Lima'])} NNP B-LOC", '']
    (tmp_path/'ner.conll').write_text('-DOCSTART- -X- O\n\n' + '\n'.join(lines))
    cli(tmp_path, '--task.name', 'token_classification', '--model.name', 'encoder_classifier', '--data.source',
        str(tmp_path/'ner.conll'), '--data.seq_len', '32', '--train.max_steps', '30', '--train.eval_every', '15', '--name', 'ner')
    run = tmp_path/'runs'/'ner'
    ev = evals(run)
    assert ev[-1]['val_loss'] < ev[0]['val_loss'] and ev[-1]['val_acc'] > 0.9, ev
    if 'val_entity_f1' in ev[-1]: assert ev[-1]['val_entity_f1'] > 0.8, ev  # entity scores read the B-/I- tag names
    final = json.loads((run/'final'/'nbtrain.json').read_text())
    assert final['task'] == 'token_classification'
    info = json.loads((run/'data.json').read_text())  # the tag names, kept for reports
    assert info['label_names'] == ['B-LOC', 'B-PER', 'O'] and info['tags_column'] == 'tags' and info['class_counts']['B-PER'] > 0


def test_hf_shapes_as_they_come(tmp_path):
    datasets = pytest.importorskip('datasets')
    names = ['O', 'B-PER', 'I-PER', 'B-LOC']
    feats = datasets.Features({'id': datasets.Value('string'), 'tokens': datasets.Sequence(datasets.Value('string')),
                               'ner_tags': datasets.Sequence(datasets.ClassLabel(names=names))})
    ner = datasets.Dataset.from_dict({'id': [str(i) for i in range(20)], 'tokens': [['Ann', 'Lee', 'in', 'Rome']] * 20,
                                      'ner_tags': [[1, 2, 0, 3]] * 20}, features=feats)
    b = build_data(settings(tmp_path, seq_len=32), 'token_classification', 0, source=datasets.DatasetDict({'train': ner, 'test': ner.select(range(4))}))
    assert b.label_names == names and b.num_labels == 4 and b.info['tags_column'] == 'ner_tags' and b.info['n_test'] == 4
    y = b.train[0]['labels']
    assert [names[int(g)] for g in y[y >= 0]] == ['B-PER', 'I-PER', 'O', 'B-LOC']
    wmt = datasets.Dataset.from_dict({'translation': [{'en': f'cat {i}', 'de': f'Katze {i}'} for i in range(20)]})
    t = build_data(settings(tmp_path, seq_len=32, text_column='en', label_column='de'), 'seq2seq', 0, source=wmt)
    assert t.info['source_column'] == 'translation.en' and t.info['target_column'] == 'translation.de'
    x = t.train[0]
    assert t.tokenizer.decode(x['input_ids']).startswith('cat ') and t.tokenizer.decode(x['labels'], skip_special=False).startswith('Katze ')
    assert x['labels'][-1].item() == t.tokenizer.eos_id


def wordpiece_tokenizer(folder:Path, texts):
    "A BERT-style tokenizer trained here (a WordPiece over `texts`), saved as transformers saves one."
    pytest.importorskip('transformers')
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, processors
    from transformers import BertTokenizerFast
    wp = Tokenizer(models.WordPiece(unk_token='[UNK]'))
    wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wp.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=120, special_tokens=['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]']))
    wp.post_processor = processors.TemplateProcessing(single='[CLS] $A [SEP]', special_tokens=[('[CLS]', 2), ('[SEP]', 3)])
    BertTokenizerFast(tokenizer_object=wp, unk_token='[UNK]', pad_token='[PAD]', cls_token='[CLS]', sep_token='[SEP]',
                      mask_token='[MASK]').save_pretrained(folder)


def test_a_pretrained_tokenizer_tags_first_subwords(tmp_path):
    sents = [{'tokens': ['Annabella', 'visited', 'Copenhagen', '.'], 'tags': ['B-PER', 'O', 'B-LOC', 'O']}] * 12
    wordpiece_tokenizer(tmp_path/'bert', ['Anna Bella visit ed Copen hagen . a b c d e f g h i j k l m n o p'] * 20)
    b = build_data(settings(tmp_path, seq_len=32, tokenizer=str(tmp_path/'bert')), 'token_classification', 0, source=sents)
    hf = b.tokenizer.tok
    x, y = b.train[0]['input_ids'], b.train[0]['labels']
    toks = hf.convert_ids_to_tokens(x.tolist())
    assert toks[0] == '[CLS]' and toks[-1] == '[SEP]' and y[0] == y[-1] == IGNORE_INDEX
    assert len(toks) > 6, toks  # the words were split into sub-words
    tagged = [(toks[i], b.label_names[int(y[i])]) for i in range(len(toks)) if y[i] >= 0]
    words = hf.convert_tokens_to_string(toks[1:-1]).split()
    assert [g for _, g in tagged] == ['B-PER', 'O', 'B-LOC', 'O'] and [t for t, _ in tagged] == [
        hf.tokenize(w)[0] for w in ['Annabella', 'visited', 'Copenhagen', '.']], (tagged, words)


def test_long_sentences_and_pairs_are_cut_and_counted(tmp_path):
    with pytest.warns(UserWarning, match=r"1 sentence\(s\) were longer than data.seq_len=12 tokens and were cut: 1 tagged word\(s\) lost"):
        b = build_data(settings(tmp_path, seq_len=12, val_fraction=0.0), 'token_classification', 0,
                       source=[{'tokens': ['aa', 'bb', 'cc', 'dd', 'ee'], 'tags': ['X'] * 5}] + [{'tokens': ['a'], 'tags': ['Y']}] * 3)
    assert b.info['truncated'] == 1 and max(len(b.train[i]['input_ids']) for i in range(4)) == 12
    with pytest.warns(UserWarning, match=r"1 source\(s\) and 1 target\(s\) were longer than data.seq_len=8"):
        s = build_data(settings(tmp_path, seq_len=8, val_fraction=0.0), 'seq2seq', 0,
                       source=[{'source': 'abcdefghijk', 'target': 'abcdefghijk'}] + [{'source': 'a', 'target': 'b'}] * 3)
    long = max((s.train[i] for i in range(4)), key=lambda r: len(r['labels']))
    assert len(long['input_ids']) == len(long['labels']) == 8 and long['labels'][-1].item() == s.tokenizer.eos_id


@pytest.mark.parametrize('task,records,kw,message', [
    ('seq2seq', [{'question': 'q', 'reply': 'a'}] * 4, {}, "Task seq2seq needs a column of targets, but the in-memory data has none named target, tgt, output, summary, highlights, answer: set data.label_column"),
    ('seq2seq', [{'source': 'q', 'target': 3}] * 4, {}, "row 1: the target (target) is int 3, expected text"),
    ('seq2seq', [{'source': 'q', 'target': 'a'}] * 4, {'label_column': 'targt'}, "data.label_column='targt' is not a column of the in-memory data. Did you mean 'target'?"),
    ('token_classification', [{'tokens': 'a b', 'tags': 'O O O'}] * 4, {}, "row 1: 2 words in column 'tokens' but 3 tags in column 'tags'"),
    ('token_classification', [{'tokens': ['a', ''], 'tags': ['O', 'O']}] * 4, {}, "expected a list of words (non-empty strings)"),
    ('token_classification', [{'tokens': ['a'], 'ner_tags': [7]}] * 4, {'label_names': ['O', 'B']}, "label 7 is out of range"),
])
def test_bad_data_says_where_and_what_works(tmp_path, task, records, kw, message):
    with pytest.raises(DataError) as e:
        build_data(settings(tmp_path, **kw), task, 0, source=records)
    assert message in str(e.value), str(e.value)


def test_seq2seq_with_a_t5_style_tokenizer(tmp_path):
    "A SentencePiece-style (Unigram) tokenizer that ends every sequence with </s>, as T5's: the source keeps its </s>, the target ends with one."
    transformers = pytest.importorskip('transformers')
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, processors, decoders
    uni = Tokenizer(models.Unigram())
    uni.pre_tokenizer, uni.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    uni.train_from_iterator(['translate English to German: the cat', 'die Katze', 'the dog', 'der Hund'] * 20,
                            trainers.UnigramTrainer(vocab_size=60, special_tokens=['<pad>', '</s>', '<unk>'], unk_token='<unk>'))
    uni.post_processor = processors.TemplateProcessing(single='$A </s>', special_tokens=[('</s>', 1)])
    transformers.PreTrainedTokenizerFast(tokenizer_object=uni, pad_token='<pad>', eos_token='</s>', unk_token='<unk>').save_pretrained(tmp_path/'t5')
    rows = [{'source': 'translate English to German: the cat', 'target': 'die Katze'}, {'source': 'the dog', 'target': 'der Hund'}] * 6
    b = build_data(settings(tmp_path, seq_len=32, tokenizer=str(tmp_path/'t5')), 'seq2seq', 0, source=rows)
    hf = b.tokenizer.tok
    x = b.train[0]
    assert x['input_ids'][-1].item() == hf.eos_token_id == x['labels'][-1].item()  # one </s> each, not two
    assert int((x['labels'] == hf.eos_token_id).sum()) == 1 and b.info['decoder_start_token_id'] == hf.pad_token_id == 0
    assert hf.decode(x['labels'], skip_special_tokens=True) in ('die Katze', 'der Hund')


@pytest.mark.slow
def test_a_hugging_face_t5_trains_on_pairs_with_its_own_tokenizer(tmp_path):
    "model.name hf: a tiny T5 (random weights) saved here with a Unigram tokenizer; the pairs are tokenized with it and it learns."
    transformers = pytest.importorskip('transformers')
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, processors, decoders
    from nbtrain.trainer import train
    texts = [f'{a} {b} {c}' for a in range(10) for b in range(10) for c in range(3)]
    uni = Tokenizer(models.Unigram())
    uni.pre_tokenizer, uni.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    uni.train_from_iterator(texts * 2, trainers.UnigramTrainer(vocab_size=40, special_tokens=['<pad>', '</s>', '<unk>'], unk_token='<unk>'))
    uni.post_processor = processors.TemplateProcessing(single='$A </s>', special_tokens=[('</s>', 1)])
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=uni, pad_token='<pad>', eos_token='</s>', unk_token='<unk>')
    tok.save_pretrained(tmp_path/'t5')
    cfg = transformers.T5Config(vocab_size=len(tok), d_model=32, d_ff=64, num_layers=2, num_heads=2, d_kv=16,
                                decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    import torch
    torch.manual_seed(0)  # the same random start every time
    transformers.T5ForConditionalGeneration(cfg).save_pretrained(tmp_path/'t5')
    (tmp_path/'pairs.jsonl').write_text('\n'.join(json.dumps({'source': t, 'target': ' '.join(reversed(t.split()))}) for t in texts))
    r = train(preset='tiny-cpu', overrides={
        'task.name': 'seq2seq', 'model.name': 'hf', 'model.path': str(tmp_path/'t5'), 'data.source': str(tmp_path/'pairs.jsonl'),
        'data.seq_len': 16, 'train.max_steps': 30, 'train.micro_batch_size': 16, 'train.eval_every': 15, 'train.eval_batches': 2,
        'train.progress_bar': False, 'checkpoint.every_steps': None, 'output_dir': str(tmp_path/'runs'), 'optim.lr': 3e-3})
    assert r.last_eval['val_loss'] < 0.7 * r.first_eval['val_loss'], (r.first_eval, r.last_eval)
    assert json.loads((r.run_dir/'data.json').read_text())['tokenizer'] == str(tmp_path/'t5')
