"""Samples during training: the same seed at every evaluation, the training's random numbers untouched (a run stopped
and resumed with samples on ends with the same weights, bit for bit, as one without samples), samples.jsonl rows once
per step across a resume, failures that disable sampling without stopping training, and the form's samples and
Generate box."""
import json, warnings
from pathlib import Path
import pytest, torch
from safetensors.torch import load_file
from nbtrain.callbacks import Callback
from nbtrain.config import load_config
from nbtrain.samples import SAMPLES_FILE, SampleCallback, read_samples
from nbtrain.trainer import Trainer


def tiny(tmp_path, name, **over):
    return load_config(overrides={'output_dir': str(tmp_path/'runs'), 'name': name, 'data.corpus_size': 60, 'data.seq_len': 32,
                                  'model.n_layer': 1, 'model.d_model': 32, 'model.n_head': 2, 'model.dropout': 0.1,
                                  'train.micro_batch_size': 8, 'train.max_steps': 8, 'train.eval_every': 4, 'train.eval_batches': 1,
                                  'train.log_every': 4, 'train.progress_bar': False, 'checkpoint.every_steps': 4,
                                  'checkpoint.keep_best_k': 0, 'eval.num_samples': 2, 'eval.sample_max_new_tokens': 12, **over})


class StopAt(Callback):
    "Stops training after step `n` (with the end checkpoint), as an interruption would."
    def __init__(self, n): self.n = n
    def on_step_end(self, trainer):
        if trainer.step == self.n: trainer.should_stop = True


class RngWatch(Callback):
    "Records the torch RNG state just before and just after SampleCallback's work in each evaluation."
    def __init__(self): self.before, self.same = None, []
    order = -30
    def on_eval_metrics(self, trainer, metrics): self.before = torch.get_rng_state().clone()
class RngCheck(Callback):
    order = -1
    def __init__(self, watch): self.watch = watch
    def on_eval_metrics(self, trainer, metrics): self.watch.same.append(torch.equal(self.watch.before, torch.get_rng_state()))


def weights(res): return load_file(str(res.run_dir/'final'/'model.safetensors'))


def test_samples_leave_training_bitwise_unchanged_across_a_resume(tmp_path):
    plain = Trainer(tiny(tmp_path, 'plain', **{'eval.samples': False})).fit()
    assert not (plain.run_dir/SAMPLES_FILE).exists()

    straight = Trainer(tiny(tmp_path, 'straight'), callbacks=[SampleCallback(tiny(tmp_path, 'straight'))]).fit()
    rows = read_samples(straight.run_dir)
    assert [r['step'] for r in rows] == [0, 0, 4, 4, 8, 8] and all(r['text'] for r in rows)

    watch = RngWatch()
    first = Trainer(cfg := tiny(tmp_path, 'cut'), callbacks=[SampleCallback(cfg), StopAt(4), watch, RngCheck(watch)]).fit()
    assert first.step == 4 and watch.same == [True, True]  # sampling left the global RNG as it found it
    with open(first.run_dir/SAMPLES_FILE, 'a') as f:  # rows an interrupted attempt wrote after its checkpoint
        f.write(json.dumps(dict(step=6, prompt='stale', text='stale')) + '\n')
    second = Trainer(cfg := tiny(tmp_path, 'cut'), callbacks=[SampleCallback(cfg)]).fit()
    assert second.step == 8

    for name, w in weights(plain).items():  # samples on or off, straight or resumed: the same weights
        assert torch.equal(w, weights(straight)[name]) and torch.equal(w, weights(second)[name]), name
    assert read_samples(second.run_dir) == rows  # the same samples: a fixed seed, the same weights at each step


class Boom(Callback):
    def on_samples(self, trainer, rows): raise RuntimeError('listener broke')
class Listen(Callback):
    def __init__(self): self.got = []
    def on_samples(self, trainer, rows): self.got.append(len(rows))


def test_failures_disable_sampling_or_a_listener_without_stopping_training(tmp_path, monkeypatch):
    listen = Listen()
    with pytest.warns(RuntimeWarning, match='Boom failed in on_samples'):
        res = Trainer(cfg := tiny(tmp_path, 'listener'), callbacks=[SampleCallback(cfg), Boom(), listen]).fit()
    assert res.step == 8 and listen.got == [2, 2, 2]
    assert [f['callback'] for f in res.callback_failures] == ['Boom']

    import nbtrain.generate
    def broken(*a, **k): raise RuntimeError('generation broke')
    monkeypatch.setattr(nbtrain.generate, 'generate', broken)
    with pytest.warns(RuntimeWarning, match='SampleCallback failed in on_eval_metrics'):
        res = Trainer(cfg := tiny(tmp_path, 'broken'), callbacks=[SampleCallback(cfg)]).fit()
    assert res.step == 8 and [f['callback'] for f in res.callback_failures] == ['SampleCallback']
    assert res.last_eval and 'val_loss' in res.last_eval and read_samples(res.run_dir) == []


def test_prompts_of_your_own_and_printed_samples(tmp_path, capsys):
    cfg = tiny(tmp_path, 'mine', **{'eval.sample_prompts': ['Once upon a time', 'The dog'], 'train.max_steps': 4,
                                    'eval.sample_temperature': 0.0})
    res = Trainer(cfg, callbacks=[SampleCallback(cfg, print_samples=True)]).fit()
    rows = read_samples(res.run_dir)
    assert [(r['step'], r['prompt']) for r in rows] == [(0, 'Once upon a time'), (0, 'The dog'), (4, 'Once upon a time'), (4, 'The dog')]
    out = capsys.readouterr().out
    assert 'samples at step 0:' in out and "'Once upon a time' →" in out
