"""Evaluation metrics end to end: what TaskMetrics adds reaches metrics.jsonl at evaluation steps (language model and
classifier), and switching it on changes nothing about training."""
import math
import pytest, torch
from safetensors.torch import load_file
from nbtrain.callbacks import read_metrics
from nbtrain.config import load_config
from nbtrain.metrics import TaskMetrics
from nbtrain.trainer import Trainer


def quick_cfg(tmp_path, name, **over):
    return load_config(overrides={'output_dir': str(tmp_path), 'name': name, 'data.corpus_size': 60, 'data.seq_len': 32,
                                  'model.n_layer': 1, 'model.d_model': 32, 'model.n_head': 2,
                                  'train.micro_batch_size': 8, 'train.max_steps': 20, 'train.log_every': 5,
                                  'train.eval_every': 10, 'train.eval_batches': 2, 'train.progress_bar': False,
                                  'checkpoint.at_end': False, **over})


def test_language_model_eval_metrics_in_metrics_jsonl(tmp_path):
    res = Trainer(cfg := quick_cfg(tmp_path, 'lm'), callbacks=[TaskMetrics(cfg)]).fit()
    rows = read_metrics(res.run_dir)
    evals, logs = [r for r in rows if 'val_loss' in r], [r for r in rows if 'loss' in r]
    assert [r['step'] for r in evals] == [0, 10, 20]
    for r in evals:
        assert 0 <= r['val_acc'] <= r['val_top5_acc'] <= 1
        assert 0 < r['val_conf_top1'] <= r['val_conf_top5'] <= 1
        assert 0 < r['val_entropy'] <= math.log(res_vocab(res)) + 1e-6
        assert 0 <= r['val_js_labels'] < 0.1 and 0 <= r['val_js_preds'] <= 1
        assert 'val_f1_macro' not in r and 'val_confusion' not in r  # a vocabulary is not a set of classes
    assert evals[-1]['val_entropy'] < evals[0]['val_entropy']  # training makes the model surer
    assert evals[-1]['val_js_preds'] < evals[0]['val_js_preds']  # and its predictions closer to the token frequencies
    assert [r['step'] for r in logs] == [5, 10, 15, 20]
    assert all(r['ppl'] == pytest.approx(math.exp(r['loss'])) for r in logs)


def res_vocab(res):
    import json
    return json.loads((res.run_dir/'final'/'nbtrain.json').read_text())['model_config']['vocab_size']


def test_classifier_eval_metrics_in_metrics_jsonl(tmp_path):
    cfg = quick_cfg(tmp_path, 'cls', **{'task.name': 'image_classification', 'model.name': 'vit', 'data.source': 'digits',
                                        'train.micro_batch_size': 16, 'train.eval_batches': 4})
    rows = read_metrics(Trainer(cfg, callbacks=[TaskMetrics(cfg, top_k=3)]).fit().run_dir)
    evals = [r for r in rows if 'val_loss' in r]
    assert [r['step'] for r in evals] == [0, 10, 20]
    for r in evals:
        cm = torch.tensor(r['val_confusion'])
        assert cm.shape == (10, 10) and cm.sum() == 64  # 4 batches of 16
        assert r['val_acc'] == pytest.approx(cm.diag().sum().item() / 64)
        tp, pred, true = cm.diag().double(), cm.sum(0).double(), cm.sum(1).double()
        seen = pred + true > 0
        assert r['val_f1_macro'] == pytest.approx((2 * tp / (pred + true).clamp_min(1))[seen].mean().item())
        assert r['val_acc'] <= r['val_top3_acc'] <= 1
    assert 'ppl' not in rows[1]


def test_task_metrics_do_not_change_training(tmp_path):
    "Evaluation metrics read the data and logits only: the weights after training are bitwise the same."
    a = Trainer(quick_cfg(tmp_path, 'plain')).fit()
    b = Trainer(cfg := quick_cfg(tmp_path, 'measured'), callbacks=[TaskMetrics(cfg)]).fit()
    wa, wb = load_file(a.run_dir/'final'/'model.safetensors'), load_file(b.run_dir/'final'/'model.safetensors')
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    va = [r['val_loss'] for r in read_metrics(a.run_dir) if 'val_loss' in r]
    assert va == [r['val_loss'] for r in read_metrics(b.run_dir) if 'val_loss' in r]
