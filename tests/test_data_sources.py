"""Data from files, folders, Hugging Face datasets and Python objects through `build_data`, and every bad input's message."""
import json, sys, types
from pathlib import Path
from types import SimpleNamespace
import numpy as np
import pytest
import torch
from PIL import Image
from nbtrain.errors import DataError
from nbtrain.data import build_data, data_settings, split_indices, IGNORE_INDEX
from nbtrain.embedded import digits_images, embedded_sentiment, save_image_folder, SENTIMENT_LABELS

FIX = Path(__file__).resolve().parent/'fixtures'/'data'

@pytest.fixture
def cfg(tmp_path):
    "Data settings with the cache in the test's folder."
    return lambda **kw: data_settings(None, cache_dir=str(tmp_path/'cache'), **kw)

def task(name, **kw): return SimpleNamespace(name=name, **kw)

# --- sources -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', ['reviews.jsonl', 'reviews.csv', 'reviews.parquet'])
def test_text_classification_from_files(cfg, name):
    b = build_data(cfg(source=str(FIX/name), seq_len=48), 'sequence_classification', seed=0)
    assert b.num_labels == 3 and len(b.train) + len(b.val) in (30, 60)
    batch = b.collate([b.train[i] for i in range(4)])
    assert batch['input_ids'].shape == batch['attention_mask'].shape and batch['labels'].shape == (4,)
    names = b.info['label_names']
    assert names == (['negative', 'neutral', 'positive'] if name.endswith('jsonl') else ['0', '1', '2'])

def test_lm_from_txt_and_hf_datasets_local_files(cfg, tmp_path):
    import datasets
    b = build_data(cfg(source=str(FIX/'stories.txt'), seq_len=64), 'causal_lm', seed=0)
    assert (b.info['train_documents'], b.info['val_documents']) == (18, 2)
    dd = datasets.load_dataset('json', data_files={'train': str(FIX/'reviews.jsonl'), 'validation': str(FIX/'reviews.jsonl')})
    h = build_data(cfg(seq_len=48), 'sequence_classification', 0, source=dd)
    assert (len(h.train), len(h.val), h.info['text_column']) == (60, 60, 'review')  # the source's own splits, not re-split
    dd.save_to_disk(str(tmp_path/'saved'))
    assert len(build_data(cfg(source=str(tmp_path/'saved'), seq_len=48), 'sequence_classification', 0).train) == 60
    ds = datasets.Dataset.from_dict({'text': ['good', 'bad'] * 10, 'label': [1, 0] * 10},
                                    features=datasets.Features(text=datasets.Value('string'),
                                                               label=datasets.ClassLabel(names=['neg', 'pos'])))
    assert build_data(cfg(seq_len=16), 'sequence_classification', 0, source=ds).label_names == ['neg', 'pos']

def test_hf_image_dataset_and_in_memory_images(cfg):
    import datasets
    x, y = digits_images()
    imgs = [Image.fromarray(a).convert('RGB').resize((16, 16)) for a in x[:40]]
    ds = datasets.Dataset.from_dict({'img': imgs, 'label': y[:40].tolist()},
                                    features=datasets.Features(img=datasets.Image(), label=datasets.Value('int64')))
    b = build_data(cfg(normalize='imagenet'), 'image_classification', 0, source=ds)
    assert b.train[0]['pixel_values'].shape == (3, 16, 16) and b.info['image_column'] == 'img'
    m = build_data(cfg(), 'image_classification', 0, source=(list(x[:50]), y[:50].tolist()))
    assert m.train[0]['pixel_values'].shape == (1, 8, 8) and m.num_labels == 10

def test_zip_upload_and_drive(cfg, tmp_path, monkeypatch):
    import shutil
    x, y = digits_images()
    save_image_folder(tmp_path/'pets', x[:20], y[:20] % 2, names=['cat', 'dog'], size=16, mode='RGB')
    shutil.make_archive(str(tmp_path/'pets'), 'zip', tmp_path, 'pets')
    z = build_data(cfg(source=str(tmp_path/'pets.zip')), 'image_classification', 0)
    assert z.label_names == ['cat', 'dog'] and z.info['image_size'] == 16
    colab = types.ModuleType('google.colab')
    colab.files = SimpleNamespace(upload=lambda: {'pets.zip': (tmp_path/'pets.zip').read_bytes()})
    monkeypatch.setitem(sys.modules, 'google', types.ModuleType('google'))
    monkeypatch.setitem(sys.modules, 'google.colab', colab)
    u = build_data(cfg(source='upload'), 'image_classification', 0)
    assert len(u.train) + len(u.val) == 20
    monkeypatch.setenv('NBTRAIN_DRIVE', str(tmp_path))
    d = build_data(cfg(source='drive:pets'), 'image_classification', 0)
    assert len(d.train) + len(d.val) == 20

def test_split_folders_are_used_as_given(cfg, tmp_path):
    x, y = digits_images()
    save_image_folder(tmp_path/'d'/'train', x[:30], y[:30]); save_image_folder(tmp_path/'d'/'valid', x[30:40], y[30:40])
    save_image_folder(tmp_path/'d'/'test', x[40:45], y[40:45])
    b = build_data(cfg(source=str(tmp_path/'d')), 'image_classification', 0)
    assert (len(b.train), len(b.val), len(b.test)) == (30, 10, 5)

def test_stratified_split_keeps_class_ratios_within_one(cfg, tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.choice(['rare', 'mid', 'common'], size=257, p=[0.05, 0.25, 0.7]).tolist()
    rows = [{'text': f'example {i}', 'label': l} for i, l in enumerate(labels)]
    (tmp_path/'imb.jsonl').write_text('\n'.join(json.dumps(r) for r in rows))
    for seed in range(5):
        b = build_data(cfg(source=str(tmp_path/'imb.jsonl'), val_fraction=0.2, test_fraction=0.1), 'sequence_classification', seed)
        names = b.label_names
        counts = {n: labels.count(n) for n in names}
        for part, f in ((b.val, 0.2), (b.test, 0.1)):
            got = torch.bincount(part.labels, minlength=3).tolist()
            for k, n in enumerate(names): assert abs(got[k] - counts[n] * f) < 1, (seed, n, got[k], counts[n] * f)
    plain = split_indices(257, 0.2, 0)  # without labels the rare class can be off by more than one
    assert len(plain.val) == round(257 * 0.2)

# --- bad input: each names the file, row or column and what was expected ---------------------------------------------

def test_empty_datasets(cfg, tmp_path):
    with pytest.raises(DataError, match=r'empty\.jsonl is empty: it holds no text'): build_data(cfg(source=str(FIX/'empty.jsonl')), 'causal_lm', 0)
    (tmp_path/'header.csv').write_text('text,label\n')
    with pytest.raises(DataError, match=r'header\.csv has no rows'): build_data(cfg(source=str(tmp_path/'header.csv')), 'causal_lm', 0)
    (tmp_path/'blank.txt').write_text('\n \n')
    with pytest.raises(DataError, match=r'blank\.txt is empty: it holds no text'): build_data(cfg(source=str(tmp_path/'blank.txt')), 'causal_lm', 0)
    with pytest.raises(DataError, match='the in-memory data is empty'): build_data(cfg(), 'causal_lm', 0, source=[])
    (tmp_path/'nothing').mkdir()
    with pytest.raises(DataError, match='found no data in this folder'): build_data(cfg(source=str(tmp_path/'nothing')), 'causal_lm', 0)
    (tmp_path/'blank.jsonl').write_text('{"text": " "}\n{"text": ""}\n')
    with pytest.raises(DataError, match="every text in column 'text' is empty"): build_data(cfg(source=str(tmp_path/'blank.jsonl')), 'causal_lm', 0)

def test_missing_or_ambiguous_column(cfg, tmp_path):
    with pytest.raises(DataError, match=r"data\.text_column='reviw' is not a column of .*reviews\.jsonl\. Did you mean 'review'\? Its columns: id, label, review"):
        build_data(cfg(source=str(FIX/'reviews.jsonl'), text_column='reviw'), 'sequence_classification', 0)
    with pytest.raises(DataError, match=r"stories\.txt has no column that holds the labels .*set data\.label_column"):
        build_data(cfg(source=str(FIX/'stories.txt')), 'sequence_classification', 0)
    (tmp_path/'two.jsonl').write_text('{"title": "a", "body": "b", "label": 1}\n{"title": "c", "body": "d", "label": 0}\n')
    with pytest.raises(DataError, match=r'holds the text: candidates are body, title\. Set data\.text_column'):
        build_data(cfg(source=str(tmp_path/'two.jsonl')), 'sequence_classification', 0)
    (tmp_path/'mixed.jsonl').write_text('{"text": "a"}\n{"text": 3}\n')
    with pytest.raises(DataError, match=r"mixed\.jsonl, line 2: column 'text' holds int 3, expected a string"):
        build_data(cfg(source=str(tmp_path/'mixed.jsonl')), 'causal_lm', 0)

def test_non_utf8_file(cfg):
    with pytest.raises(DataError, match=r'reviews_latin1\.csv is not UTF-8 text: line 4 has byte 0xe9 .*iconv -f latin1'):
        build_data(cfg(source=str(FIX/'reviews_latin1.csv')), 'sequence_classification', 0)

def test_labels_out_of_range_or_missing(cfg):
    with pytest.raises(DataError, match=r"reviews_bad_labels\.csv, line 4: label 7 is out of range: expected a class id 0\.\.2 \(task\.num_labels=3\) in column 'label'"):
        build_data(cfg(source=str(FIX/'reviews_bad_labels.csv')), task('sequence_classification', num_labels=3), 0)
    with pytest.raises(DataError, match=r'line 4: label 7 is out of range: expected a class id 0\.\.2 \(the 3 label names\)'):
        build_data(cfg(source=str(FIX/'reviews_bad_labels.csv'), label_names=['neg', 'neu', 'pos']), 'sequence_classification', 0)
    with pytest.raises(DataError, match=r"reviews_no_label\.csv, line 3: no label in column 'label'"):
        build_data(cfg(source=str(FIX/'reviews_no_label.csv')), 'sequence_classification', 0)
    with pytest.raises(DataError, match=r'row 2: label -1 is negative.*unlabelled row'):
        build_data(cfg(), 'sequence_classification', 0, source=(['a', 'b', 'c'], [0, -1, 1]))
    with pytest.raises(DataError, match=r"row 2: label 'postive' is not one of the label names .*Did you mean 'positive'\?"):
        build_data(cfg(label_names=list(SENTIMENT_LABELS)), 'sequence_classification', 0, source=(['a', 'b'], ['positive', 'postive']))

def test_images_of_mixed_sizes_or_modes(cfg, tmp_path):
    x, y = digits_images()
    save_image_folder(tmp_path/'imgs', x[:12], y[:12] % 2, names=['a', 'b'], size=16, mode='RGB')
    odd = tmp_path/'imgs'/'b'/'zz_grey.png'
    Image.fromarray(x[0]).resize((16, 16)).save(odd)
    with pytest.raises(DataError, match=rf"{odd} is a grey \(L\) image but .*00000\.png is colour \(RGB\): .*Set data\.image_mode='RGB'"):
        build_data(cfg(source=str(tmp_path/'imgs')), 'image_classification', 0)
    b = build_data(cfg(source=str(tmp_path/'imgs'), image_mode='RGB'), 'image_classification', 0)
    assert b.train[0]['pixel_values'].shape == (3, 16, 16)
    Image.new('RGB', (24, 16)).save(odd)
    with pytest.raises(DataError, match=rf'{odd} is 24x16 pixels but .*00000\.png is 16x16: .*Set data\.image_size=N'):
        build_data(cfg(source=str(tmp_path/'imgs')), 'image_classification', 0)
    b = build_data(cfg(source=str(tmp_path/'imgs'), image_size=12), 'image_classification', 0)
    assert b.train[0]['pixel_values'].shape == (3, 12, 12)
    odd.write_bytes(b'\x89PNG broken')
    with pytest.raises(DataError, match=rf'{odd}: not an image PIL can read'):
        build_data(cfg(source=str(tmp_path/'imgs')), 'image_classification', 0)

def test_masked_lm_batches(cfg):
    b = build_data(cfg(corpus_size=50, seq_len=64, tokenizer='bpe', vocab_size=400), task('masked_lm', mlm_probability=0.3), 0)
    batch = b.collate([b.train[i] for i in range(16)], seeds=list(range(16)))
    frac = (batch['labels'] != IGNORE_INDEX).float().sum() / batch['attention_mask'].sum()
    assert 0.25 < frac < 0.35, frac
