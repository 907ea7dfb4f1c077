"""Faults end in one clear line and a resumable run: unreadable checkpoints, missing or garbage manifests, a full disk
at every write of a run (simulated by failing the write with ENOSPC), a damaged final/, an unreadable config.yaml; and
metrics that are exact across restarts and reruns."""
import csv, errno, io, json, os, warnings
from pathlib import Path
import pytest, torch
from nbtrain.callbacks import JSONLLogger, read_metrics
from nbtrain.checkpoint import MANIFEST, STATE, WEIGHTS, LOCK, CheckpointError, CheckpointManager, ckpt_name, read_manifest, sha256_file
from nbtrain.config import load_config
from nbtrain.errors import ConfigError, ModelLoadError
from nbtrain.files import DiskFullError
from nbtrain.trainer import Trainer

TIMING = {'time', 'samples_per_s', 'tokens_per_s', 'mfu', 'gpu_mem_gb', 'elapsed_s'}
NO_SPACE = OSError(errno.ENOSPC, 'No space left on device')

@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv('NBTRAIN_CACHE_DIR', str(tmp_path/'cache'))

def cfg(tmp_path, name, **over):
    "A run of a few seconds: a one-layer GPT, 8 steps, a checkpoint every 2, logs every 3, evaluations at 5 (and the end)."
    return load_config(overrides={
        'output_dir': str(tmp_path), 'name': name, 'data.corpus_size': 40, 'data.seq_len': 16, 'train.micro_batch_size': 4,
        'train.max_steps': 8, 'train.log_every': 3, 'train.eval_every': 5, 'train.eval_batches': 1, 'train.progress_bar': False,
        'train.deterministic': True, 'checkpoint.every_steps': 2, 'checkpoint.every_minutes': None, 'checkpoint.keep_last_n': 3,
        'checkpoint.keep_best_k': 0, 'tracking.dashboard': False, 'tracking.eval_metrics': False,
        'model.kwargs': {'n_layer': 1, 'd_model': 32, 'n_head': 2}, **over})

def fit(tmp_path, name, **over): return Trainer(cfg(tmp_path, name, **over)).fit()

def rows(run_dir): return [{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(run_dir)]

def leftovers(run_dir):
    "Temporary files or folders anywhere in a run folder, and the lock file."
    return sorted(str(p.relative_to(run_dir)) for p in Path(run_dir).rglob('*')
                  if p.name.endswith('.tmp') or p.name.startswith(('.tmp-', '.old-')) or p.name == LOCK)

def tamper(ck:Path, name:str, data:bytes):
    "Replace a checkpoint file and make the manifest match it: the checkpoint verifies, but may not load."
    (ck/name).write_bytes(data)
    m = read_manifest(ck); m['files'][name] = dict(sha256=sha256_file(ck/name), bytes=len(data))
    (ck/MANIFEST).write_text(json.dumps(m))

class Foo: pass

# ---------------------------------------------------------------- checkpoints that verify but cannot be read

def test_unreadable_checkpoints_are_skipped_with_a_reason(tmp_path, capsys):
    fit(tmp_path, 'r')
    ck = tmp_path/'r'/'checkpoints'
    assert sorted(p.name for p in ck.iterdir()) == [ckpt_name(s) for s in (4, 6, 8)]
    buf = io.BytesIO(); torch.save({'x': Foo()}, buf)
    tamper(ck/ckpt_name(8), STATE, buf.getvalue())                        # weights-only loading refuses it
    raw = (ck/ckpt_name(6)/WEIGHTS).read_bytes()
    tamper(ck/ckpt_name(6), WEIGHTS, b'\xff' * 8 + raw[8:])                # a damaged safetensors header
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        res = fit(tmp_path, 'r', **{'train.max_steps': 10})
    msgs = [str(x.message) for x in w if 'Skipping checkpoint' in str(x.message)]
    assert len(msgs) == 2, msgs
    assert 'step-000000008/state.pt holds something safe (weights-only) loading refuses' in msgs[0] and 'Foo' in msgs[0]
    assert 'step-000000006/model.safetensors cannot be read (SafetensorError' in msgs[1]
    assert not any('weights_only' in m for m in msgs)
    assert f"Resumed from {ck/ckpt_name(4)} at step 4" in capsys.readouterr().out
    assert res.step == 10
    assert [r['step'] for r in read_metrics(tmp_path/'r') if 'loss' in r] == [3, 6, 9, 10]

def test_nothing_usable_left_says_so_or_refuses(tmp_path, capsys):
    fit(tmp_path, 'n')
    ck = tmp_path/'n'/'checkpoints'
    (ck/ckpt_name(8)/MANIFEST).write_bytes(b'\x89PNG\r\n garbage')
    (ck/ckpt_name(6)/MANIFEST).unlink()
    (ck/ckpt_name(4)/STATE).write_bytes(b'')
    before = (tmp_path/'n'/'metrics.jsonl').read_bytes()
    # must: refuses in one line, changes nothing
    with warnings.catch_warnings(), pytest.raises(CheckpointError) as e:
        warnings.simplefilter('ignore')
        fit(tmp_path, 'n', **{'checkpoint.resume': 'must'})
    msg = str(e.value)
    assert msg.startswith("checkpoint.resume='must': no usable checkpoint in") and '3 skipped' in msg and '\n' not in msg, msg
    assert 'step-000000008: ' in msg and 'manifest.json is unreadable: not UTF-8 text' in msg
    assert 'step-000000006: ' in msg and 'manifest.json is missing' in msg
    assert 'step-000000004: ' in msg and 'state.pt has 0 bytes' in msg
    assert (tmp_path/'n'/'metrics.jsonl').read_bytes() == before and not leftovers(tmp_path/'n')
    # auto: every bad one named, then one line saying it starts over, and why
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        res = fit(tmp_path, 'n')
    named = [str(x.message) for x in w if 'Skipping checkpoint' in str(x.message)]
    assert len(named) == 3 and any('step-000000006: ' in m and 'manifest.json is missing' in m for m in named)
    out = [l for l in capsys.readouterr().out.splitlines() if 'step 0' in l]
    assert len(out) == 1 and out[0].startswith('Starting from step 0: no usable checkpoint in') and '3 skipped' in out[0], out
    assert res.step == 8
    assert [r['step'] for r in read_metrics(tmp_path/'n')] == [0, 3, 5, 6, 8, 8]

# ---------------------------------------------------------------- a full disk

def fail_fsync_of(monkeypatch, name):
    "ENOSPC when a file whose name contains `name` is flushed (every atomic write flushes before its rename)."
    real = os.fsync
    def fsync(fd):
        if name in os.readlink(f'/proc/self/fd/{fd}'): raise OSError(errno.ENOSPC, 'No space left on device')
        return real(fd)
    monkeypatch.setattr(os, 'fsync', fsync)

@pytest.mark.parametrize('name', ['env.json', 'model.json', 'data.json', 'config.yaml'])
def test_full_disk_writing_run_files(tmp_path, monkeypatch, name):
    with monkeypatch.context() as m:
        if name == 'config.yaml':  # save_config writes config.yaml.tmp, then renames it
            real = Path.write_text
            def write_text(self, data, *a, **k):
                if self.name == 'config.yaml.tmp': real(self, data[:10], *a, **k); raise OSError(errno.ENOSPC, 'No space left on device')
                return real(self, data, *a, **k)
            m.setattr(Path, 'write_text', write_text)
        else: fail_fsync_of(m, name)
        with pytest.raises(DiskFullError) as e: Trainer(cfg(tmp_path, 'd'))
    msg = str(e.value)
    assert f"writing {tmp_path/'d'/name} needs " in msg and 'free there' in msg and '\n' not in msg, msg
    assert not leftovers(tmp_path/'d')
    assert fit(tmp_path, 'd').step == 8  # the same command again, with space: the run goes on

def test_full_disk_writing_metrics_stops_cleanly_and_resumes(tmp_path, monkeypatch):
    ref = fit(tmp_path, 'ref')
    real = JSONLLogger.write
    def write(self, trainer, metrics):
        if trainer.step == 6 and 'loss' in metrics:  # the disk fills up in the middle of the row
            f = self._f
            class Half:
                def seek(self, *a): return f.seek(*a)
                def truncate(self, n): return f.truncate(n)
                def write(self, b):
                    if len(b) > 10: return f.write(b[:10])
                    raise OSError(errno.ENOSPC, 'No space left on device')
            self._f = Half()
            try: return real(self, trainer, metrics)
            finally: self._f = f
        return real(self, trainer, metrics)
    with monkeypatch.context() as m:
        m.setattr(JSONLLogger, 'write', write)
        with pytest.raises(DiskFullError) as e: fit(tmp_path, 'm')
    assert f"writing {tmp_path/'m'/'metrics.jsonl'} needs " in str(e.value) and 'resume' in str(e.value)
    assert (tmp_path/'m'/'metrics.jsonl').read_bytes().endswith(b'}\n') and not leftovers(tmp_path/'m')
    res = fit(tmp_path, 'm')
    assert res.step == 8 and rows(tmp_path/'m') == rows(ref.run_dir)

def test_full_disk_in_another_callback_is_one_line(tmp_path, monkeypatch):
    from nbtrain.tracking import CSVLogger
    def write(self, trainer, metrics): raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(CSVLogger, 'write', write)
    with pytest.raises(DiskFullError, match=r'writing the files of callback CSVLogger in .* needs more space'):
        fit(tmp_path, 'csv')
    assert not leftovers(tmp_path/'csv')

def test_full_disk_writing_metrics_csv_names_the_file_and_leaves_no_half_row(tmp_path, monkeypatch):
    from nbtrain.tracking import CSVLogger
    import builtins
    real_open = builtins.open
    def open_(path, mode='r', *a, **k):  # the disk fills up in the middle of the CSV row of step 6
        f = real_open(path, mode, *a, **k)
        if str(path).endswith('metrics.csv') and mode == 'ab' and open_.armed:
            class Half:
                def __enter__(self): return self
                def __exit__(self, *e): f.close()
                def seek(self, *a): return f.seek(*a)
                def truncate(self, n): return f.truncate(n)
                def write(self, b):
                    if len(b) > 10: return f.write(b[:10])
                    raise OSError(errno.ENOSPC, 'No space left on device')
            return Half()
        return f
    open_.armed = False
    real_write = CSVLogger.write
    def write(self, trainer, metrics):
        open_.armed = trainer.step == 6 and 'loss' in metrics
        try: return real_write(self, trainer, metrics)
        finally: open_.armed = False
    with monkeypatch.context() as m:
        m.setattr(builtins, 'open', open_); m.setattr(CSVLogger, 'write', write)
        with pytest.raises(DiskFullError) as e: fit(tmp_path, 'c')
    assert f"writing {tmp_path/'c'/'metrics.csv'} needs " in str(e.value) and 'resume' in str(e.value)
    assert (tmp_path/'c'/'metrics.csv').read_bytes().endswith(b'\r\n') and not leftovers(tmp_path/'c')
    assert fit(tmp_path, 'c').step == 8

def test_full_disk_writing_final_keeps_the_previous_one(tmp_path, monkeypatch, capsys):
    import safetensors.torch
    from nbtrain.loading import load_final_folder
    def full(*a, **k): raise RuntimeError('Error while serializing: I/O error: No space left on device (os error 28)')
    with monkeypatch.context() as m:
        m.setattr(safetensors.torch, 'save_model', full)
        with pytest.raises(DiskFullError) as e: fit(tmp_path, 'f')
    final = tmp_path/'f'/'final'
    msg = str(e.value)
    assert f"Disk full (No space left on device): writing {final/WEIGHTS} needs " in msg and 'run again with the same name' in msg, msg
    assert not final.exists() and not leftovers(tmp_path/'f')
    done = rows(tmp_path/'f')
    res = fit(tmp_path, 'f')                      # again, with space: final/ from the end checkpoint, no metrics added
    assert res.step == 8 and rows(tmp_path/'f') == done
    assert read_manifest(final)['folder'] == 'final' and load_final_folder(final).info['final'] == str(final)
    good = (final/WEIGHTS).read_bytes()
    with monkeypatch.context() as m:              # a failed rewrite leaves the complete final/ as it was
        m.setattr(safetensors.torch, 'save_model', full)
        with pytest.raises(DiskFullError): fit(tmp_path, 'f')
    assert (final/WEIGHTS).read_bytes() == good and not leftovers(tmp_path/'f')

def test_damaged_final_is_one_clear_error(tmp_path):
    from nbtrain.hub import load_final
    from nbtrain.loading import load_final_folder
    final = fit(tmp_path, 'x').run_dir/'final'
    raw = (final/WEIGHTS).read_bytes()
    (final/WEIGHTS).write_bytes(raw[:len(raw) // 2])
    for load in (load_final_folder, load_final):
        with pytest.raises(ModelLoadError) as e: load(final.parent)
        msg = str(e.value)
        assert f"The final model in {final} is damaged: {final/WEIGHTS} has {len(raw) // 2} bytes, the manifest says {len(raw)}" in msg
        assert '\n' not in msg and 'same name' in msg
    # without a manifest (an older run) the broken file is still one ModelLoadError, not a SafetensorError
    (final/MANIFEST).unlink()
    with pytest.raises(ModelLoadError, match='model.safetensors does not fit'): load_final_folder(final)

def test_full_disk_in_the_mirror_leaves_no_half_slot(tmp_path, monkeypatch):
    import shutil
    cm = CheckpointManager(tmp_path/'ck', mirror=tmp_path/'drive', async_save=False)
    cm.save({'model': {'w': torch.ones(1000)}}, step=1)
    real = shutil.copyfile
    def copyfile(src, dst, *a, **k):
        if Path(dst).name == STATE: raise OSError(errno.ENOSPC, 'No space left on device')
        return real(src, dst, *a, **k)
    monkeypatch.setattr(shutil, 'copyfile', copyfile)
    with pytest.raises(CheckpointError) as e: cm.save({'model': {'w': torch.ones(1000) * 2}}, step=2)
    msg = str(e.value)
    assert 'Mirroring step-000000002' in msg and 'it needs about' in msg and 'free there' in msg and 'is complete' in msg, msg
    assert [c.step for c in cm.mirror_list()] == [1] and len(list((tmp_path/'drive').iterdir())) == 1
    assert [c.step for c in cm.list(verify=True)] == [1, 2]

def test_full_disk_writing_checkpoint_weights_gives_the_hint(tmp_path, monkeypatch):
    "safetensors reports a full disk only in its text: the checkpoint error still says the disk is full and what it needed."
    import safetensors.torch
    cm = CheckpointManager(tmp_path/'ck', async_save=False)
    cm.save({'model': {'w': torch.ones(1000)}}, step=1)
    def full(*a, **k): raise RuntimeError('Error while serializing: I/O error: No space left on device (os error 28)')
    monkeypatch.setattr(safetensors.torch, 'save_file', full)
    with pytest.raises(CheckpointError) as e: cm.save({'model': {'w': torch.ones(1000)}}, step=2)
    msg = str(e.value)
    assert f'failed while writing {WEIGHTS}' in msg and 'The disk is full' in msg and 'it needs about 3.9 KB' in msg, msg
    assert sorted(p.name for p in (tmp_path/'ck').iterdir()) == [ckpt_name(1)]

# ---------------------------------------------------------------- config.yaml that cannot be read

@pytest.mark.parametrize('content,why', [(b'\x89PNG\r\n\x1a\n\x00\xff', 'is not UTF-8 text'),
                                         (b'model: {name: gpt\ntrain: [1, 2\n', 'is not valid YAML'),
                                         (b'- just\n- a list\n', 'holds a YAML list')])
def test_unreadable_config_yaml_is_named_and_kept(tmp_path, content, why):
    run = tmp_path/'y'
    run.mkdir()
    (run/'config.yaml').write_bytes(content)
    with pytest.raises(ConfigError) as e: Trainer(cfg(tmp_path, 'y'))
    assert str(e.value).startswith(f"{run/'config.yaml'} {why}") and 'Nothing was changed' in str(e.value)
    assert (run/'config.yaml').read_bytes() == content and not leftovers(run)

# ---------------------------------------------------------------- metrics exact across restarts

def test_rerun_of_a_finished_run_adds_nothing(tmp_path):
    res = fit(tmp_path, 'done')                   # the last evaluation (step 8) comes after the step's checkpoint
    def csv_rows():  # the CSV is rewritten from metrics.jsonl when a run starts: its time column then takes the JSONL's
        with open(res.run_dir/'metrics.csv', newline='') as f: return [{k: v for k, v in r.items() if k != 'time'} for r in csv.DictReader(f)]
    jsonl, table = (res.run_dir/'metrics.jsonl').read_bytes(), csv_rows()
    assert len(table) == 6
    again = fit(tmp_path, 'done')
    assert again.step == 8 and (res.run_dir/'metrics.jsonl').read_bytes() == jsonl and csv_rows() == table

def test_resumed_run_logs_the_same_losses(tmp_path):
    from nbtrain.callbacks import Callback
    ref = fit(tmp_path, 'ref')
    class CutAt(Callback):  # stop after step 4: its checkpoint holds one step of the window that is logged at step 6
        def on_step_end(self, trainer):
            if trainer.step == 4: trainer.request_stop('a test')
    Trainer(cfg(tmp_path, 'cut'), callbacks=[CutAt()]).fit()
    assert [r['step'] for r in read_metrics(tmp_path/'cut') if 'loss' in r] == [3]
    res = fit(tmp_path, 'cut')
    assert res.step == 8 and rows(tmp_path/'cut') == rows(ref.run_dir)

def test_full_disk_while_exporting_keeps_the_previous_export(tmp_path, monkeypatch):
    import nbtrain.export as ex
    run = fit(tmp_path, 'x').run_dir
    ex.export_run(run, ['safetensors'], log=None)
    before = sorted(p.name for p in (run/'export').iterdir())
    def full(path, obj, **kw): raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(ex, 'write_json', full)
    with pytest.raises(DiskFullError) as e: ex.export_run(run, ['safetensors'], log=None)
    assert f"{run/'export'}" in str(e.value) and 'previous export' in str(e.value) and '\n' not in str(e.value)
    assert not (run/'export.tmp').exists() and sorted(p.name for p in (run/'export').iterdir()) == before
