"""colab_templates/ner.ipynb runs end to end by papermill with small settings: it writes its CoNLL example data,
trains a token classifier, reports entity-level precision, recall and F1 (validation and test), and tags new
sentences with the model rebuilt from final/."""
import json
import pytest
from test_colab_templates import check_run_folder, evals, printed, run_notebook

NER = dict(preset='tiny-cpu', size='tiny', use_drive=False, use_wandb=False, n_sentences=600, max_steps=60,
           micro_batch_size=32, seq_len=32, lr=3e-3, eval_every=30)


@pytest.mark.slow
def test_ner_template(tmp_path, monkeypatch):
    nb = run_notebook('ner', tmp_path, monkeypatch, run_name='ner', **NER)
    assert (tmp_path/'runs'/'data'/'ner.conll').read_text().count('B-PER') > 100  # the example data it wrote
    run = tmp_path/'runs'/'ner'
    ev = evals(check_run_folder(run, tmp_path))
    assert ev[0]['step'] == 0 and ev[-1]['step'] == 60 and 30 in [r['step'] for r in ev]  # also at each epoch's end
    last = ev[-1]
    for k in ('val_entity_precision', 'val_entity_recall', 'val_entity_f1'): assert 0 <= last[k] <= 1, last
    assert last['val_entity_f1'] > ev[0]['val_entity_f1'] and last['val_acc'] > 0.8, ev
    labels = json.loads((run/'data.json').read_text())['label_names']
    assert set(labels) == {'O', 'B-PER', 'I-PER', 'B-LOC', 'I-LOC', 'B-ORG', 'I-ORG'}, labels
    scores = printed(nb, 'rows = read_metrics(run_dir)')
    assert 'validation: entity precision' in scores and 'test: entity precision' in scores, scores
    lines = printed(nb, 'for sentence, pairs in zip(examples, tag(examples)):\n    print(').splitlines()
    assert len(lines) == 2, lines
    tags = [w.rsplit('/', 1)[1] for l in lines for w in l.split() if '/' in w]
    assert tags and set(tags) <= set(labels) - {'O'}, lines
    assert len(lines[0].split()) == 10, lines  # 'Maria Silva works for Acme Corp in New York .': every word kept
