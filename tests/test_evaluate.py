"""The best weights and the test split, end to end: a run that gets worse after its best evaluation ends with the best
checkpoint's weights in final/ (full models and LoRA adapters), says which step they come from, evaluates its test
split with them (test_* in metrics.jsonl), and `evaluate_run` measures final/ again with the same numbers."""
import json
import pytest, torch
from nbtrain.callbacks import Callback, read_metrics
from nbtrain.config import load_config
from nbtrain.errors import ConfigError
from nbtrain.evaluate import evaluate_run
from nbtrain.trainer import Trainer

pytestmark = pytest.mark.usefixtures('one_thread')


class Spoil(Callback):
    "Add noise to every trained weight once, after step `at`: the evaluations after it are worse."
    def __init__(self, at): self.at = at
    def on_step_end(self, trainer):
        if trainer.step == self.at:
            g = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for p in trainer.raw_model.parameters():
                    if p.requires_grad: p.add_(torch.randn(p.shape, generator=g).to(p) * 0.5)


def cfg(tmp_path, name, **over):
    return load_config(preset='tiny-cpu', overrides={
        'output_dir': str(tmp_path), 'name': name, 'data.corpus_size': 120, 'data.seq_len': 32, 'data.test_fraction': 0.1,
        'model.n_layer': 1, 'model.d_model': 32, 'model.n_head': 2, 'train.micro_batch_size': 8, 'train.max_steps': 20,
        'train.eval_every': 5, 'train.eval_batches': 2, 'train.log_every': 5, 'train.progress_bar': False,
        'tracking.backends': ['jsonl'], 'tracking.dashboard': False, 'eval.samples': False, **over})


def evals(run_dir): return {r['step']: r for r in read_metrics(run_dir) if 'val_loss' in r}


@pytest.mark.parametrize('lora', [False, True], ids=['full', 'lora'])
def test_final_holds_the_best_weights_and_the_test_split_is_evaluated_with_them(tmp_path, lora):
    over = {'lora.enabled': True, 'lora.r': 4, 'data.tokenizer': 'char', 'optim.lr': 1e-2} if lora else {}
    res = Trainer(cfg(tmp_path, 'run', **over), callbacks=[Spoil(12)]).fit()
    ev = evals(res.run_dir)
    best = min((s for s in ev if s > 0), key=lambda s: ev[s]['val_loss'])
    assert best <= 10 and ev[15]['val_loss'] > ev[best]['val_loss'], ev  # the spoiled weights are worse
    assert res.final_from['step'] == best and res.final_from['reason'] == 'best'
    nb = json.loads((res.run_dir/'final'/'nbtrain.json').read_text())
    assert nb['weights']['step'] == best and nb['weights']['monitor'] == 'val_loss'
    if lora: assert (res.run_dir/'final'/'adapter').is_dir()
    # final/ holds the weights of that step: its validation loss on the same batches is the one logged there
    again = evaluate_run(res.run_dir, split='validation', max_batches=2, quiet=True)
    assert again['val_loss'] == pytest.approx(ev[best]['val_loss'], rel=1e-4)
    # the test split, evaluated at the end with those weights, and again by evaluate_run
    rows = [r for r in read_metrics(res.run_dir) if 'test_loss' in r]
    assert len(rows) == 1 and rows[0]['weights_step'] == best and rows[0]['step'] == 20
    assert res.test_eval['test_loss'] == rows[0]['test_loss']
    ev_test = evaluate_run(res.run_dir, quiet=True)
    for k in ('test_loss', 'test_acc', 'test_ppl', 'test_top5_acc'): assert ev_test[k] == pytest.approx(rows[0][k], rel=1e-5), k
    saved = json.loads((res.run_dir/'eval-test.json').read_text())
    assert saved['weights_step'] == best and saved['metrics']['test_loss'] == pytest.approx(rows[0]['test_loss'])
    # the checkpoints still end at the last step: running the finished run again resumes there and adds one test row
    Trainer(cfg(tmp_path, 'run', **over)).fit()
    assert len([r for r in read_metrics(res.run_dir) if 'test_loss' in r]) == 1


def test_last_and_the_settings_best_cannot_honour(tmp_path):
    res = Trainer(cfg(tmp_path, 'last', **{'checkpoint.final': 'last'}), callbacks=[Spoil(12)]).fit()
    assert res.final_from == dict(step=20, reason='last')
    assert [r['weights_step'] for r in read_metrics(res.run_dir) if 'test_loss' in r] == [20]
    # no checkpoint is added for an improving evaluation when the last weights are wanted
    assert sorted(p.name for p in (res.run_dir/'checkpoints').iterdir() if p.name.startswith('step-')) == ['step-000000020']
    with pytest.raises(ConfigError, match='checkpoint.keep_best_k to 1 or more'):
        Trainer(cfg(tmp_path, 'no-best', **{'checkpoint.final': 'best', 'checkpoint.keep_best_k': 0}))
    with pytest.raises(ConfigError, match='has no validation set'):
        Trainer(cfg(tmp_path, 'no-val', **{'checkpoint.final': 'best', 'data.val_fraction': 0.0}))
    # without a test split (or with eval.test_at_end off) there is no test row
    quiet = Trainer(cfg(tmp_path, 'untested', **{'eval.test_at_end': False, 'train.max_steps': 5})).fit()
    assert quiet.test_eval is None and not any('test_loss' in r for r in read_metrics(quiet.run_dir))


def test_evaluate_run_on_other_data_and_a_classifier(tmp_path):
    "A classifier's test metrics (F1, confusion, calibration), and other data read with the run's label names."
    over = {'task.name': 'sequence_classification', 'data.source': 'embedded', 'model.name': 'encoder_classifier',
            'data.tokenizer': 'char', 'train.max_steps': 10, 'data.test_fraction': 0.2}
    res = Trainer(cfg(tmp_path, 'cls', **over)).fit()
    row = next(r for r in read_metrics(res.run_dir) if 'test_loss' in r)
    assert {'test_f1_macro', 'test_ece', 'test_confusion', 'test_acc'} <= set(row)
    n_test = json.loads((res.run_dir/'data.json').read_text())['n_test']
    assert sum(map(sum, row['test_confusion'])) == n_test  # every test example once
    names = json.loads((res.run_dir/'data.json').read_text())['label_names']
    # the same reviews as a file whose labels are words: class ids follow the run's label names, whatever the file's order
    from nbtrain.embedded import embedded_sentiment
    texts, labels = embedded_sentiment()
    rows = [dict(text=t, label=names[y] if isinstance(y, int) else y) for t, y in list(zip(texts, labels))[::-1][:40]]
    f = tmp_path/'reviews.jsonl'
    f.write_text(''.join(json.dumps(r) + '\n' for r in rows))
    other = evaluate_run(res.run_dir, data=str(f), quiet=True)
    assert other.path.name == 'eval-reviews-test.json' and other.info['examples'] == 40
    assert sum(map(sum, other['test_confusion'])) == 40 and 0 <= other['test_acc'] <= 1
    assert other['test_acc'] == pytest.approx(sum(other['test_confusion'][c][c] for c in range(len(names))) / 40)


def test_token_classification_entity_scores_in_validation_test_and_evaluate_run(tmp_path):
    import random
    rng, lines = random.Random(0), []
    for _ in range(200):
        lines += [f"{rng.choice(['Anna', 'Bo', 'Cleo'])} NNP B-PER", 'went VBD O', 'to IN O', f"{rng.choice(['Oslo', 'Rome', 'Lima'])} NNP B-LOC", '']
    (tmp_path/'ner.conll').write_text('-DOCSTART- -X- O\n\n' + '\n'.join(lines))
    res = Trainer(cfg(tmp_path, 'ner', **{'task.name': 'token_classification', 'model.name': 'encoder_classifier',
                                          'data.source': str(tmp_path/'ner.conll'), 'train.micro_batch_size': 16,
                                          'train.max_steps': 30, 'train.eval_every': 15, 'optim.lr': 3e-3,
                                          'data.test_fraction': 0.2})).fit()
    ev = evals(res.run_dir)
    assert 0 <= ev[0]['val_entity_f1'] < ev[30]['val_entity_f1'] and ev[30]['val_entity_f1'] > 0.8, ev
    test = next(r for r in read_metrics(res.run_dir) if 'test_loss' in r)
    assert {'test_entity_precision', 'test_entity_recall', 'test_entity_f1', 'test_f1_macro'} <= set(test)
    again = evaluate_run(res.run_dir, quiet=True)
    for k in ('test_entity_precision', 'test_entity_recall', 'test_entity_f1', 'test_acc'): assert again[k] == pytest.approx(test[k]), k


def test_seq2seq_run_gets_bleu_chrf_and_rouge_from_its_generations(tmp_path):
    rows = [{'source': f'{a} {b} {c}', 'target': f'{c} {b} {a}'} for a in range(10) for b in range(10) for c in range(3)]
    (tmp_path/'pairs.jsonl').write_text('\n'.join(json.dumps(r) for r in rows))
    res = Trainer(cfg(tmp_path, 's2s', **{'task.name': 'seq2seq', 'model.name': 'encoder_decoder', 'data.source': str(tmp_path/'pairs.jsonl'),
                                          'data.seq_len': 16, 'train.micro_batch_size': 16, 'train.max_steps': 10,
                                          'optim.lr': 3e-3})).fit()
    ev = evaluate_run(res.run_dir, quiet=True, max_generate=8)
    assert {'test_loss', 'test_acc', 'test_bleu', 'test_chrf', 'test_rougeL'} <= set(ev)
    assert 0 <= ev['test_bleu'] <= 100 and 0 <= ev['test_chrf'] <= 100 and 0 <= ev['test_rougeL'] <= 1
    assert 'test_bleu' not in evaluate_run(res.run_dir, quiet=True, generate=False, save=False)
