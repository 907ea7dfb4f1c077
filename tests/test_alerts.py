"""Alert rules in a real (tiny) training run: a planted rule fires once, is printed and recorded in alerts.jsonl and
sent to every callback's on_alert; `then stop` ends the run with a checkpoint at that step; a resumed run keeps
what fired and does not alert again."""
import json
import pytest
from nbtrain.alerts import AlertRules, read_alerts
from nbtrain.callbacks import Callback
from nbtrain.config import load_config
from nbtrain.errors import ConfigError
from nbtrain.trainer import Trainer

pytestmark = pytest.mark.usefixtures('one_thread')  # tests/conftest.py

RULES = ['val_loss > 0', 'loss < 1000 after 6 then stop']  # the first fires at the evaluation at step 0, the second at step 8


def tiny(tmp_path, **over):
    "The default preset (tiny-cpu), made smaller still."
    return load_config(overrides={'output_dir': str(tmp_path/'runs'), 'name': 'alerts', 'data.corpus_size': 60, 'data.seq_len': 32,
                                  'model.n_layer': 1, 'model.d_model': 32, 'model.n_head': 2, 'train.micro_batch_size': 8,
                                  'train.max_steps': 16, 'train.eval_every': 4, 'train.eval_batches': 1, 'train.log_every': 4,
                                  'train.progress_bar': False, 'checkpoint.every_steps': 100, 'checkpoint.keep_best_k': 0,
                                  'eval.samples': False, 'tracking.dashboard': False, 'tracking.eval_metrics': False,
                                  'checkpoint.save_final': False, 'alerts.rules': RULES, **over})


class Heard(Callback):
    "Records the alerts every callback is sent (as the W&B and TensorBoard trackers and the form receive them)."
    def __init__(self): self.alerts = []
    def on_alert(self, trainer, title, text, level): self.alerts.append((trainer.step, title, level))


def test_a_rule_fires_once_and_then_stop_ends_the_run_with_a_checkpoint(tmp_path, capsys):
    cfg, heard = tiny(tmp_path), Heard()
    res = Trainer(cfg, callbacks=[AlertRules(cfg), heard]).fit()
    assert res.step == 8 and res.stop_reason == "alert alerts.rules[1] 'loss < 1000 after 6 then stop' fired at step 8"
    assert (res.run_dir/'checkpoints'/'step-000000008'/'manifest.json').exists()  # the run ends with a checkpoint there
    rows = read_alerts(res.run_dir)
    assert [(r['step'], r['rule'], r['stop']) for r in rows] == [(0, 'val_loss > 0', False), (8, 'loss < 1000 after 6 then stop', True)]
    rule_alerts = [a for a in heard.alerts if a[1].startswith('Alert: ')]
    assert rule_alerts == [(0, 'Alert: val_loss > 0', 'warn'), (8, 'Alert: loss < 1000 after 6 then stop', 'warn')]  # once each
    out = capsys.readouterr().out
    assert out.count('alert at step 0: val_loss > 0: val_loss = ') == 1
    assert 'alert at step 8: loss < 1000 after 6 then stop: loss = ' in out and '-> stopping the run' in out

    # run again: it resumes at step 8; both rules fired before the checkpoint, so neither fires again
    heard2 = Heard()
    res2 = Trainer(cfg, callbacks=[AlertRules(cfg), heard2]).fit()
    assert res2.step == 16 and res2.stop_reason == 'reached 16 steps'
    assert [a for a in heard2.alerts if a[1].startswith('Alert: ')] == []
    assert len(read_alerts(res.run_dir)) == 2
    assert 'alert at step' not in capsys.readouterr().out


def test_alerts_stop_and_a_bad_rule(tmp_path):
    cfg = tiny(tmp_path, **{'alerts.rules': ['val_loss > 0 after 8'], 'alerts.stop': True, 'name': 'all-stop'})
    res = Trainer(cfg, callbacks=[AlertRules(cfg)]).fit()
    assert res.step == 8 and res.stop_reason.startswith("alert alerts.rules[0] 'val_loss > 0 after 8'")
    assert [json.loads(l)['stop'] for l in (res.run_dir/'alerts.jsonl').read_text().splitlines()] == [True]
    with pytest.raises(ConfigError, match=r"alerts.rules\[0\]='val_loss is high' is not a rule"):
        AlertRules(tiny(tmp_path, **{'alerts.rules': ['val_loss is high']}))
