"""The live dashboard in a real training run: a fixed number of in-place updates for a given run length, the wall-time
throttle, nothing drawn outside a notebook, the PNGs in the run folder, and runs compared from their folders."""
import pytest
from nbtrain.config import load_config
from nbtrain.dashboard import LiveDashboard, compare_runs, notebook_display, plot_runs, save_dashboard
from nbtrain.metrics import TaskMetrics
from nbtrain.trainer import Trainer

PNG = b'\x89PNG\r\n\x1a\n'


def quick_cfg(tmp_path, name, **over):
    return load_config(overrides={'output_dir': str(tmp_path), 'name': name, 'data.corpus_size': 60, 'data.seq_len': 32,
                                  'model.n_layer': 1, 'model.d_model': 32, 'model.n_head': 2,
                                  'train.micro_batch_size': 8, 'train.max_steps': 40, 'train.log_every': 5,
                                  'train.eval_every': 20, 'train.eval_batches': 1, 'train.progress_bar': False,
                                  'checkpoint.save_final': False, 'checkpoint.at_end': False, **over})


class FakeDisplay:
    "Stands in for IPython's display(obj, display_id=True): counts displays and in-place updates."
    def __init__(self): self.displayed, self.updates, self.images = 0, 0, []
    def __call__(self, obj):
        self.displayed += 1; self.images.append(obj)
        return self
    def update(self, obj): self.updates += 1; self.images.append(obj)


@pytest.mark.parametrize('every,expected', [(5, 8), (10, 6), (1000, 4)])
def test_live_plot_updates_a_fixed_number_of_times(tmp_path, every, expected):
    # 20 steps, logs every 5, evaluations at 0, 10, 20. every=5: evaluation 0 (creates the display), logs 5, 10,
    # evaluation 10, logs 15, 20, evaluation 20, the end = 8. every=10: without logs 5 and 15 = 6.
    # every=1000: the evaluations and the end = 4.
    disp = FakeDisplay()
    dash = LiveDashboard(every=every, min_interval_s=0, max_overhead=None, display=disp)
    res = Trainer(quick_cfg(tmp_path, 'live', **{'train.max_steps': 20, 'train.eval_every': 10}), callbacks=[dash]).fit()
    assert res.step == 20
    assert (dash.draws, disp.displayed, disp.updates) == (expected, 1, expected - 1)  # one output, updated in place
    assert all(img.data[:8] == PNG for img in disp.images)
    assert (res.run_dir/'dashboard.png').read_bytes()[:8] == PNG


def test_wall_time_throttle_limits_draws(tmp_path):
    disp = FakeDisplay()
    dash = LiveDashboard(every=1, min_interval_s=3600, display=disp)
    Trainer(quick_cfg(tmp_path, 'throttled', **{'train.log_every': 1, 'train.max_steps': 20}), callbacks=[dash]).fit()
    assert dash.draws == 2 and disp.displayed == 1  # the first (evaluation at step 0) and the final one


def test_drawing_stays_a_small_share_of_the_run(tmp_path):
    # every step logs and asks for a draw; the overhead throttle (5%) lets through only a few
    dash = LiveDashboard(every=1, min_interval_s=0, max_overhead=0.05, display=FakeDisplay())
    res = Trainer(quick_cfg(tmp_path, 'cheap', **{'train.log_every': 1}), callbacks=[dash]).fit()
    assert dash.draws <= 12, dash.draws
    per_draw = dash.draw_s / dash.draws
    # forced draws (the evaluations right after a draw at the same step, the final one) are outside the throttle
    assert dash.draw_s <= 0.05 * res.elapsed_s + 5 * per_draw


def test_outside_a_notebook_nothing_is_drawn_but_the_png_is_written(tmp_path):
    assert notebook_display() is None  # pytest is not a notebook kernel
    dash = LiveDashboard(every=1, min_interval_s=0)
    res = Trainer(quick_cfg(tmp_path, 'script', **{'train.max_steps': 10}), callbacks=[dash]).fit()
    assert dash.draws == 0 and dash.rows == []
    assert (res.run_dir/'dashboard.png').stat().st_size > 10_000


def test_classification_dashboard_has_a_confusion_matrix(tmp_path):
    cfg = quick_cfg(tmp_path, 'digits', **{'task.name': 'image_classification', 'model.name': 'vit', 'data.source': 'digits',
                                           'train.max_steps': 10, 'train.eval_every': 5, 'train.micro_batch_size': 16})
    res = Trainer(cfg, callbacks=[TaskMetrics(cfg), LiveDashboard(cfg)]).fit()
    assert (res.run_dir/'dashboard.png').read_bytes()[:8] == PNG
    assert (res.run_dir/'confusion_matrix.png').read_bytes()[:8] == PNG


def test_compare_runs_from_their_folders(tmp_path):
    dirs = [Trainer(quick_cfg(tmp_path, f'lr{lr}', **{'optim.lr': lr, 'train.max_steps': 10, 'train.eval_every': 5})).fit().run_dir
            for lr in (1e-3, 3e-3)]
    fig = plot_runs(dirs, ['loss', 'val_loss', 'missing'], path=tmp_path/'cmp.png')
    assert [ax.get_title() for ax in fig.axes] == ['loss', 'val_loss']
    assert [len(ax.lines) for ax in fig.axes] == [2, 2]
    assert (tmp_path/'cmp.png').read_bytes()[:8] == PNG
    fig = plot_runs(dirs, x='time')
    assert fig.axes[0].get_xlabel() == 'minutes'
    table = compare_runs(dirs)
    assert [(r['run'], r['steps']) for r in table] == [('lr0.001', 10), ('lr0.003', 10)]
    assert all(r['best_step'] in (0, 5, 10) and r['best_val_loss'] > 0 and r['tokens_per_s'] > 0 for r in table)
    assert save_dashboard(dirs[0]) == dirs[0]/'dashboard.png'
    with pytest.raises(FileNotFoundError, match='no metrics.jsonl'): plot_runs([tmp_path/'nope'])
    with pytest.raises(ValueError, match='none of the metrics'): plot_runs(dirs, ['nothing'])


def test_test_metrics_in_the_dashboard_and_the_comparison(tmp_path):
    "A run with a test split: the star on the loss panel at the step of the weights tested, the test confusion matrix, compare_runs."
    from nbtrain.dashboard import plot_dashboard
    from nbtrain.callbacks import read_metrics
    cfg = quick_cfg(tmp_path, 'tested', **{'task.name': 'image_classification', 'model.name': 'vit', 'data.source': 'digits',
                                           'data.test_fraction': 0.1, 'train.max_steps': 20, 'train.eval_every': 10,
                                           'train.eval_batches': 2, 'checkpoint.at_end': True})
    res = Trainer(cfg).fit()
    rows = read_metrics(res.run_dir)
    test = next(r for r in rows if 'test_loss' in r)
    assert (res.run_dir/'confusion_matrix_test.png').read_bytes()[:8] == PNG
    fig = plot_dashboard(rows)
    star = next(l for l in fig.axes[0].lines if l.get_label() == 'test_loss')
    assert list(star.get_xdata()) == [test['weights_step']] and list(star.get_ydata()) == [test['test_loss']]
    acc = next(ax for ax in fig.axes if ax.get_title() == 'accuracy')
    assert {'test_acc', 'test_f1_macro'} <= {l.get_label() for l in acc.lines}
    row = compare_runs([res.run_dir])[0]
    assert row['test_loss'] == test['test_loss'] and row['weights_step'] == test['weights_step']
