"""The training form inside a real notebook kernel, as in Colab: a click trains in a background thread while the kernel
stays free, what training prints goes to the form's log, Stop ends the run at a step boundary with a checkpoint, the live dashboard draws into the form, and
nothing the training thread prints lands in other cells."""
import json
from pathlib import Path
import pytest

CELLS = [
    """import time
from nbtrain.ui import TrainForm
TINY = {'preset': 'tiny-cpu', 'output_dir': 'runs', 'name': 'bg', 'data.corpus_size': 60, 'data.seq_len': 32,
        'train.micro_batch_size': 4, 'train.max_steps': 2000, 'train.eval_every': 4, 'train.log_every': 2,
        'tracking.live_plot_min_interval_s': 0.0, 'tracking.live_plot_every': 2}
from nbtrain.callbacks import Callback
import threading, warnings
class Chatty(Callback):  # prints and warns from the training thread, and from a thread of its own (as W&B does)
    def on_step_end(self, trainer):
        if trainer.step == 2:
            print('printed from training'); warnings.warn('warned from training')
            t = threading.Thread(target=lambda: print('printed from a helper thread')); t.start(); t.join()
form = TrainForm(TINY)
form.train(background=True, callbacks=[Chatty()])
assert form.running, 'Train must return at once, with training going on in the background'""",
    """t0 = time.monotonic()
while (form.trainer is None or form.trainer.step < 12) and form.running and time.monotonic() - t0 < 120: time.sleep(0.05)
print('kernel free while training at step', form.trainer.step)""",
    """form.stop_button.click()
r = form.wait(120)
assert r.stop_reason.startswith('interrupted by the Stop button'), r.stop_reason
assert 12 <= r.step < 2000 and (r.run_dir/'checkpoints'/f'step-{r.step:09d}'/'manifest.json').exists()
assert len(form.image.value) > 1000, 'the live dashboard draws into the form'
assert 'samples at step' in form.samples.value, 'the newest samples, shown in the form as training goes'
assert 'Done: interrupted by the Stop button' in form.status.value
assert not form.running and not form.train_button.disabled and form.stop_button.disabled
log = form.logbuf.text()
assert all(t in log for t in ('printed from training', 'warned from training', 'printed from a helper thread')), log
import sys; assert type(sys.stdout).__name__ != '_Router' and type(sys.stderr).__name__ != '_Router'
print('stopped at', r.step)""",
]

@pytest.mark.slow
def test_background_training_in_a_kernel(tmp_path, monkeypatch):
    pm = pytest.importorskip('papermill')
    nbformat = pytest.importorskip('nbformat')
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in CELLS])
    nb.metadata['kernelspec'] = {'name': 'python3', 'display_name': 'python3', 'language': 'python'}
    src, out = tmp_path/'form.ipynb', tmp_path/'out.ipynb'
    nbformat.write(nb, src)
    pm.execute_notebook(str(src), str(out), cwd=str(tmp_path), kernel_name='python3', progress_bar=False, execution_timeout=300)
    texts = [''.join(o.get('text', '')) for c in json.loads(out.read_text())['cells'] for o in c.get('outputs', [])]
    assert texts[0].startswith('kernel free while training at step') and texts[1].startswith('stopped at'), texts
    assert len(texts) == 2, texts  # nothing else: no tqdm bar, no eval lines, no warnings leaked into the cells


HUB_CELLS = [
    """import re
from nbtrain.ui import TrainForm
TINY = {'preset': 'tiny-cpu', 'output_dir': 'runs', 'name': 'lora', 'data.corpus_size': 60, 'data.seq_len': 32,
        'train.micro_batch_size': 4, 'train.max_steps': 4, 'train.eval_every': 2, 'train.log_every': 2, 'model.cache_dir': 'hub-cache'}
form = TrainForm(TINY)
assert not form.fields['lora.enabled'].value
form.fields['model.path'].value = 'hf:alice/Qwen2.5-0.5B'  # typed, then Enter (the text box sends it then, not at each key)
assert (form.fields['model.name'].value, form.fields['model.path'].value) == ('hf', 'alice/Qwen2.5-0.5B')
assert form.fields['lora.enabled'].value, form.model_note.value
print('note:', re.sub('<[^>]+>', '', form.model_note.value).split('<br>')[0])""",
    """form.fields['model.path'].value = 'hf:alice/tiny gpt2'
assert form.check() is None and 'is not a Hub model id' in form.errors['model.path'].value
form.fields['model.path'].value = 'alice/tiny-gpt2'
assert not form.fields['lora.enabled'].value and 'LoRA off: tiny-gpt2 has' in form.model_note.value, form.model_note.value
form.fields['lora.enabled'].value = True  # the person's choice
form.train_button.click()
r = form.wait(240)
assert (r.run_dir/'final'/'adapter'/'adapter_model.safetensors').is_file() and r.step == 4
assert 'LoRA on (your choice)' in form.model_note.value
print('trained', r.step)""",
]

@pytest.mark.slow
def test_hub_model_and_lora_in_a_kernel(tmp_path, monkeypatch):
    """In a kernel: a Hub id typed in model.path makes it a Hub model, a 494M-parameter one (its config.json only, read
    once) switches LoRA on with the reason; a small one leaves it off; ticked, Train fine-tunes adapters in the background."""
    pm = pytest.importorskip('papermill')
    nbformat = pytest.importorskip('nbformat')
    pytest.importorskip('peft')
    transformers = pytest.importorskip('transformers')
    from huggingface_hub import HfApi
    from hubserver import HubServer
    from test_finetune_template import tiny_gpt2_with_tokenizer
    tiny_gpt2_with_tokenizer(tmp_path/'upload')
    qwen = transformers.Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                    num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True)
    token = 'hf_kernel_token_0123456789'
    with HubServer(tokens={token: 'alice'}) as hub:
        api = HfApi(endpoint=hub.url, token=token)
        api.create_repo('alice/Qwen2.5-0.5B')
        api.upload_file(path_or_fileobj=qwen.to_json_string().encode(), path_in_repo='config.json', repo_id='alice/Qwen2.5-0.5B')
        api.create_repo('alice/tiny-gpt2')
        api.upload_folder(repo_id='alice/tiny-gpt2', folder_path=str(tmp_path/'upload'))
        for k in ('HF_TOKEN', 'HUGGING_FACE_HUB_TOKEN', 'HF_HUB_OFFLINE'): monkeypatch.delenv(k, raising=False)
        monkeypatch.setenv('HF_ENDPOINT', hub.url)
        monkeypatch.setenv('HF_HUB_DISABLE_TELEMETRY', '1')
        monkeypatch.setenv('OMP_NUM_THREADS', '1')
        nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in HUB_CELLS])
        nb.metadata['kernelspec'] = {'name': 'python3', 'display_name': 'python3', 'language': 'python'}
        src, out = tmp_path/'form.ipynb', tmp_path/'out.ipynb'
        nbformat.write(nb, src)
        pm.execute_notebook(str(src), str(out), cwd=str(tmp_path), kernel_name='python3', progress_bar=False, execution_timeout=300)
        qwen_gets = [r for r in hub.state.requests if r.kind == 'resolve' and 'Qwen2.5-0.5B' in r.path]
    assert len([r for r in qwen_gets if r.method == 'GET']) == 1 and all(r.path.endswith('/config.json') for r in qwen_gets)
    texts = [''.join(o['text']) for c in json.loads(out.read_text())['cells'] for o in c.get('outputs', [])
             if o.get('output_type') == 'stream' and o.get('name') == 'stdout']
    assert texts[0].startswith('note: LoRA on: Qwen2.5-0.5B has 494M parameters; full fine-tuning'), texts
    assert texts[-1].strip() == 'trained 4', texts
