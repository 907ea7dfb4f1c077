"""Data through the trainer: an image folder trains the reference ViT, a BPE trained offline trains the GPT, masked LM
trains the encoder, the token cache is hit by the next run, and a tokenizer too big for the model is a clear error."""
import json, math, os, subprocess, sys, textwrap
from pathlib import Path
import pytest
from PIL import Image
from nbtrain.errors import ModelLoadError
from nbtrain.embedded import digits_images, save_image_folder
from nbtrain.trainer import train

QUICK = {'train.max_steps': 6, 'train.micro_batch_size': 8, 'train.eval_every': 3, 'train.eval_batches': 2,
         'train.log_every': 2, 'train.progress_bar': False, 'checkpoint.every_steps': None, 'checkpoint.every_minutes': None}
OFFLINE = {'HF_HUB_OFFLINE': '1', 'HF_DATASETS_OFFLINE': '1', 'TRANSFORMERS_OFFLINE': '1', 'HF_ENDPOINT': 'http://127.0.0.1:9'}

@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv('NBTRAIN_CACHE_DIR', str(tmp_path/'cache'))

def quick(tmp_path, **over):
    from nbtrain.config import CheckpointConfig
    q = {k: v for k, v in QUICK.items() if not k.startswith('checkpoint.') or k.split('.')[1] in CheckpointConfig.field_names()}
    return {**q, 'output_dir': str(tmp_path/'runs'), **over}

@pytest.mark.slow
def test_image_folder_trains_the_vit(tmp_path):
    x, y = digits_images()
    save_image_folder(tmp_path/'pets', x[:64], y[:64] % 3, names=['bird', 'cat', 'dog'], size=16, mode='RGB')
    Image.fromarray(x[70]).convert('RGB').resize((16, 16)).save(tmp_path/'pets'/'cat'/'extra.jpg')  # another format, same size
    res = train(preset='tiny-cpu', overrides=quick(tmp_path, **{'task.name': 'image_classification', 'model.name': 'vit',
                                                               'data.source': str(tmp_path/'pets')}))
    assert res.step == 6 and res.last_eval and 'val_acc' in res.last_eval
    cfg = json.loads((res.run_dir/'model.json').read_text())
    assert cfg['config']['image_size'] == 16 and cfg['config']['in_channels'] == 3 and cfg['config']['num_labels'] == 3
    assert (res.run_dir/'final'/'model.safetensors').is_file()

@pytest.mark.slow
def test_masked_lm_trains_the_encoder(tmp_path):
    res = train(preset='tiny-cpu', overrides=quick(tmp_path, **{'task.name': 'masked_lm', 'model.name': 'encoder_classifier',
                                                               'data.corpus_size': 60, 'data.seq_len': 64}))
    assert res.step == 6 and math.isfinite(res.last_eval['val_loss']) and res.last_eval['val_acc'] > 0

@pytest.mark.slow
def test_bpe_trains_offline_and_the_next_run_hits_the_cache(tmp_path):
    env = {**os.environ, **OFFLINE, 'NBTRAIN_CACHE_DIR': str(tmp_path/'cache'), 'PYTHONUNBUFFERED': '1'}
    args = [sys.executable, '-m', 'nbtrain.cli', 'train', '--data.tokenizer', 'bpe', '--data.corpus_size', '300',
            '--data.seq_len', '64', '--output_dir', str(tmp_path/'runs')]
    for k, v in QUICK.items():
        if not k.startswith('checkpoint.'): args += [f'--{k}', str(v)]
    r = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    run = next(p for p in (tmp_path/'runs').iterdir() if p.is_dir())
    tok = json.loads((run/'final'/'tokenizer.json').read_text())
    assert tok['model']['type'] == 'BPE' and len(list((tmp_path/'cache'/'tokenizers').iterdir())) == 1
    # a second process with the same data: tokenizer and token ids come from the cache (nothing is tokenized)
    script = textwrap.dedent(f'''
        import time
        from nbtrain.data import build_data, data_settings
        from nbtrain.tokenizer import BPETokenizer
        calls = []
        BPETokenizer.encode_flat = lambda self, *a, **k: calls.append(1)
        BPETokenizer.train = classmethod(lambda cls, *a, **k: calls.append(1))
        t0 = time.perf_counter()
        b = build_data(data_settings(None, tokenizer='bpe', corpus_size=300, seq_len=64), 'causal_lm', 1337)
        print(b.info['cache'], len(calls), round(time.perf_counter() - t0, 3), b.info['packing_efficiency'])
    ''')
    r2 = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, env=env, timeout=300)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "'tokenizers': 'hit'" in r2.stdout and "'tokens': 'hit'" in r2.stdout and r2.stdout.split()[-3] == '0', r2.stdout
    assert float(r2.stdout.split()[-1]) > 0.95  # packing efficiency, reported

def test_tokenizer_larger_than_the_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="The model's vocabulary has 50 tokens but the tokenizer uses 260"):
        train(preset='tiny-cpu', overrides=quick(tmp_path, **{'data.tokenizer': 'byte', 'data.corpus_size': 20,
                                                              'model.kwargs': {'vocab_size': 50}}))

def test_packing_efficiency_is_reported(tmp_path):
    from nbtrain.data import build_data, data_settings
    for tok in ('char', 'bpe'):
        b = build_data(data_settings(None, tokenizer=tok, corpus_size=500, seq_len=256), 'causal_lm', 0)
        assert b.info['packing_efficiency'] > 0.95 and b.info['padded_efficiency'] < b.info['packing_efficiency'], b.info

def test_data_benchmark_runs(capsys):
    import importlib.util
    spec = importlib.util.spec_from_file_location('data_benchmark', Path(__file__).resolve().parent.parent/'benchmarks'/'data.py')
    bench = importlib.util.module_from_spec(spec); spec.loader.exec_module(bench)
    ratios = bench.main(['--stories', '200', '--seq-len', '64', '--skip', '5', '--rounds', '1', '--batch', '4'])
    assert set(ratios) >= {'char_encode', 'cache', 'resume'} and all(r > 0 for r in ratios.values())
    assert 'resume after 5 batches' in capsys.readouterr().out

@pytest.mark.slow
def test_trainer_resume_with_skip_not_read(tmp_path, monkeypatch):
    """The trainer change proposed in the data notes: resume by `set_epoch(loader, epoch, skip)` instead of reading and
    dropping batches. A masked-LM run (random masks) cut at step 4 (mid-epoch) and resumed ends with the weights of an uninterrupted one."""
    import warnings, torch
    from safetensors.torch import load_file
    from nbtrain.callbacks import Callback
    from nbtrain.data import set_epoch
    from nbtrain.trainer import Trainer
    def _epoch_batches(self, epoch, skip=0):
        loader = self.train_loader
        set_epoch(loader, epoch, skip=skip)  # the skipped batches are never read
        if hasattr(loader, '_num_iter_calls'): loader._num_iter_calls = epoch
        return (self._to_device(b) for b in loader)
    monkeypatch.setattr(Trainer, '_epoch_batches', _epoch_batches)
    over = quick(tmp_path, **{'task.name': 'masked_lm', 'model.name': 'encoder_classifier', 'data.corpus_size': 40,
                              'data.seq_len': 32, 'train.max_steps': 6, 'train.eval_every': 3, 'checkpoint.every_steps': 2})
    full = train(preset='tiny-cpu', overrides={**over, 'name': 'full'})
    class CutAt4(Callback):
        def on_step_end(self, trainer):
            if trainer.step == 4: trainer.should_stop = True
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        part = train(preset='tiny-cpu', overrides={**over, 'name': 'cut', 'checkpoint.at_end': False}, callbacks=[CutAt4()])
    assert part.step == 4
    rest = train(preset='tiny-cpu', overrides={**over, 'name': 'cut'})
    assert rest.step == 6
    a, b = load_file(full.run_dir/'final'/'model.safetensors'), load_file(rest.run_dir/'final'/'model.safetensors')
    assert all(torch.equal(a[k], b[k]) for k in a), 'resumed run differs'

def test_full_disk_in_the_token_cache_trains_on_without_it(tmp_path, monkeypatch):
    "A full disk while the token ids are cached: a warning names the cache entry, nothing half-written stays, training goes on."
    import errno, warnings
    from nbtrain.processing import Encoded
    real = Encoded.save
    def save(self, folder):
        real(self, folder)
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(Encoded, 'save', save)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        res = train(preset='tiny-cpu', overrides=quick(tmp_path, **{'data.corpus_size': 20, 'data.seq_len': 16, 'train.max_steps': 2,
                                                                   'model.kwargs': {'n_layer': 1, 'd_model': 32, 'n_head': 2}}))
    assert res.step == 2
    said = [str(x.message) for x in w if 'data cache' in str(x.message)]
    assert said and all(str(tmp_path/'cache'/'tokens') in m and 'No space left on device' in m and 'free there' in m for m in said), said
    assert not [p for p in (tmp_path/'cache').rglob('*') if p.name.endswith('.tmp')]
    assert not (tmp_path/'cache'/'tokens').exists() or not any((tmp_path/'cache'/'tokens').iterdir())
