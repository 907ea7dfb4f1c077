"""End-to-end runs of the `nbtrain` command in a subprocess, as a user would type them."""
import json, os, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT/'tests'/'fixtures'
QUICK = ['--train.max_steps', '6', '--train.eval_every', '3', '--train.eval_batches', '2', '--train.log_every', '2',
         '--data.corpus_size', '60', '--train.micro_batch_size', '4', '--data.seq_len', '32']

def nbtrain(*args, env=None, cwd=None, timeout=300):
    e = {**os.environ, 'PYTHONUNBUFFERED': '1', **(env or {})}
    return subprocess.run([sys.executable, '-m', 'nbtrain.cli', *args], capture_output=True, text=True,
                          env=e, cwd=cwd, timeout=timeout)

def only_run(out_dir:Path) -> Path:
    runs = [p for p in out_dir.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]

# The quick commands of the tests below, by test: started all at once when the first of them runs (on a 2-core machine
# one's imports overlap another's); each test reads its own result. {folder}: an empty folder of that test's own.
CHECK_QUICK = ['--tiers', '1', '--quick', '--batch-size', '2', '--seq-len', '16']
ONE_THREAD = {'OMP_NUM_THREADS': '1'}
SECRETS = {'WANDB_API_KEY': 'wandb-key-0123456789abcdef', 'HF_TOKEN': 'hf_SecretToken0123456789'}
GIST = ['train', '--model.name', 'file', '--model.path', str(FIXTURES/'gist_gpt'), *QUICK]
EARLY = {'test_help_lists_commands': (['--help'], None),
         'test_bad_override_is_one_clear_line': (['train', '--optim.lerning_rate', '1e-3', '--output_dir', '{folder}'], None),
         'test_check_a_file_export_writes_the_report_and_exits_0':
             (['check', str(FIXTURES/'gist_gpt'), '--trust-code', *CHECK_QUICK, '--out', '{folder}/report'], ONE_THREAD),
         'test_check_a_file_export_needs_trust_code':
             (['check', str(FIXTURES/'gist_gpt'), *CHECK_QUICK, '--out', '{folder}/report'], ONE_THREAD),
         'test_check_a_faulty_model_exits_1_and_names_the_check':
             (['check', str(FIXTURES/'faulty'/'dead_block'), '--trust-code', *CHECK_QUICK, '--out', '{folder}/report'], ONE_THREAD),
         'test_check_unknown_tier_is_a_user_error': (['check', 'gpt', '--tiers', '1,3', '--out', '{folder}/report'], None),
         'test_run_folder_complete_and_free_of_secrets': (['train', *QUICK, '--output_dir', '{folder}'], SECRETS),
         'test_gist_export_trains_from_cli': (GIST + ['--output_dir', '{folder}', '--model.trust_code', 'true'], None),
         'test_gist_export_trains_from_cli/refused': (GIST + ['--output_dir', '{folder}'], None)}  # a folder of its own

@pytest.fixture(scope='module')
def early(request, tmp_path_factory):
    "`early(key)`: (the result of the command EARLY[key] of a selected test, its folder)."
    procs = {}
    selected = {item.name for item in request.session.items if item.module is request.module}
    for key, (argv, env) in EARLY.items():
        if key.split('/')[0] in selected:
            folder = tmp_path_factory.mktemp(key[5:25])
            procs[key] = folder, subprocess.Popen([sys.executable, '-m', 'nbtrain.cli', *(a.format(folder=folder) for a in argv)],
                                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                                        env={**os.environ, 'PYTHONUNBUFFERED': '1', **(env or {})})
    def result(name):
        folder, p = procs[name]
        out, err = p.communicate(timeout=300)
        return subprocess.CompletedProcess(p.args, p.returncode, out, err), folder
    yield result
    for _, p in procs.values():
        if p.poll() is None: p.kill(); p.communicate()

def test_help_lists_commands(early):
    r, _ = early('test_help_lists_commands')
    assert r.returncode == 0 and 'train' in r.stdout and 'config' in r.stdout

def test_bad_override_is_one_clear_line(early):
    r, tmp_path = early('test_bad_override_is_one_clear_line')
    assert r.returncode == 2
    assert "Unknown config key 'optim.lerning_rate'. Did you mean 'lr'?" in r.stderr
    assert 'Traceback' not in r.stderr
    assert not any(tmp_path.iterdir())  # nothing half-written

@pytest.mark.slow
def test_run_folder_complete_and_free_of_secrets(early):
    secrets = SECRETS
    r, tmp_path = early('test_run_folder_complete_and_free_of_secrets')
    assert r.returncode == 0, r.stderr[-3000:]
    run = only_run(tmp_path)
    for f in ('config.yaml', 'metrics.jsonl', 'env.json', 'model.json', 'loss_curve.png',
              'final/model.safetensors', 'final/config.json', 'final/tokenizer.json'):
        assert (run/f).is_file() and (run/f).stat().st_size > 0, f
    rows = [json.loads(l) for l in (run/'metrics.jsonl').read_text().splitlines()]
    assert [r['step'] for r in rows if 'loss' in r] == [2, 4, 6]
    assert [r['step'] for r in rows if 'val_loss' in r] == [0, 3, 6]
    for p in run.rglob('*'):
        if p.is_file():
            data = p.read_bytes()
            for s in secrets.values(): assert s.encode() not in data, f'secret found in {p}'
    assert 'validation loss at start' in r.stdout and 'validation loss at end' in r.stdout
    lines = r.stdout.splitlines()  # the memory estimate: one line on a CPU, before the first step (or evaluation) is printed
    memory = [i for i, l in enumerate(lines) if l.startswith('memory: ')]
    steps = [i for i, l in enumerate(lines) if l.lstrip().startswith('step ')]
    assert len(memory) == 1 and 'Estimated training memory' in lines[memory[0]] and 'GB' in lines[memory[0]], r.stdout
    assert steps and memory[0] < steps[0], r.stdout

@pytest.mark.slow
def test_gist_export_trains_from_cli(early):
    src = FIXTURES/'gist_gpt'
    r, refused = early('test_gist_export_trains_from_cli/refused')
    assert r.returncode == 2 and 'trust_code' in r.stderr  # executing a file must be allowed explicitly
    assert not [p for p in refused.iterdir() if p.is_dir()]  # no run folder
    r, tmp_path = early('test_gist_export_trains_from_cli')
    assert r.returncode == 0, r.stderr[-3000:]
    run = only_run(tmp_path)
    info = json.loads((run/'model.json').read_text())
    import hashlib
    assert info['sha256'] == hashlib.sha256((src/'model.py').read_bytes()).hexdigest()
    assert (run/'final'/'model.safetensors').is_file() and (run/'final'/'model.py').is_file()
    losses = [json.loads(l)['loss'] for l in (run/'metrics.jsonl').read_text().splitlines() if '"loss"' in l]
    assert len(losses) == 3 and all(l == l for l in losses)  # finite, logged at steps 2, 4, 6

@pytest.mark.slow
def test_second_session_refused_while_a_run_trains_then_takes_over_when_it_is_gone(tmp_path):
    "Two sessions, one run folder (two Colab tabs on one Drive): the second is refused while the first trains."
    import signal, time
    e = {**os.environ, 'PYTHONUNBUFFERED': '1', 'OMP_NUM_THREADS': '1'}
    args = ['train', '--output_dir', str(tmp_path), '--name', 'shared', '--data.corpus_size', '60', '--data.seq_len', '32',
            '--train.micro_batch_size', '4', '--train.progress_bar', 'false', '--checkpoint.every_steps', '5']
    first = subprocess.Popen([sys.executable, '-m', 'nbtrain.cli', *args, '--train.max_steps', '100000'],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=e)
    try:
        run, t0 = tmp_path/'shared', time.monotonic()
        while not list((run/'checkpoints').glob('step-*/manifest.json')):
            assert first.poll() is None and time.monotonic() - t0 < 120, 'the first session did not get going'
            time.sleep(0.2)
        lock = json.loads((run/'.nbtrain-lock.json').read_text())
        assert lock['pid'] == first.pid
        r = nbtrain(*args, '--train.max_steps', '10')
        assert r.returncode != 0
        assert 'is being trained by another session' in r.stderr and 'checkpoint.take_over=true' in r.stderr, r.stderr[-2000:]
        assert 'Traceback' not in r.stderr
        assert json.loads((run/'.nbtrain-lock.json').read_text())['id'] == lock['id']  # untouched
    finally:
        first.send_signal(signal.SIGKILL); first.wait()
    # the first session is gone (killed, as a runtime is): the next one takes the folder over and resumes
    step = max(int(p.name.split('-')[1]) for p in (run/'checkpoints').glob('step-*'))
    r = nbtrain(*args, '--train.max_steps', str(step + 5))
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'Took over run folder' in r.stderr and 'that session is gone' in r.stderr
    assert f'Resumed from' in r.stdout and not (run/'.nbtrain-lock.json').exists()

# `nbtrain check`: the model checks as a CI step. Tier 1 only, a quick run, one thread: a few seconds each (CHECK_QUICK, above).
def test_check_a_file_export_writes_the_report_and_exits_0(early):
    r, tmp_path = early('test_check_a_file_export_writes_the_report_and_exits_0')
    out = tmp_path/'report'
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rep = json.loads((out/'report.json').read_text())
    assert rep['ok'] and rep['model']['source']['kind'] == 'file'
    assert rep['checks'] and {c['tier'] for c in rep['checks']} == {1}
    assert (out/'report.md').read_text().startswith('# Model checks') and list(out.glob('*.png'))
    for c in rep['checks']: assert f" {c['name']} " in r.stdout  # a line per check as it ran
    assert 'summary:' in r.stdout and 'passed' in r.stdout

def test_check_a_file_export_needs_trust_code(early):
    r, tmp_path = early('test_check_a_file_export_needs_trust_code')
    assert r.returncode == 2
    assert 'pass --trust-code' in r.stderr and 'model.py' in r.stderr and 'Traceback' not in r.stderr
    assert not (tmp_path/'report').exists()  # nothing ran, nothing written

def test_check_a_faulty_model_exits_1_and_names_the_check(early):
    r, tmp_path = early('test_check_a_faulty_model_exits_1_and_names_the_check')
    out = tmp_path/'report'
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    assert 'FAILED: gradient_flow [fail]' in r.stdout and 'Traceback' not in r.stderr
    rep = json.loads((out/'report.json').read_text())
    assert not rep['ok'] and rep['model']['check_command']['exit_status'] == 1

def test_check_unknown_tier_is_a_user_error(early):
    r, _ = early('test_check_unknown_tier_is_a_user_error')
    assert r.returncode == 2 and "--tiers='1,3': there is no tier '3'" in r.stderr and 'Traceback' not in r.stderr

# `nbtrain generate` and `nbtrain eval` on a run folder written here (an untrained character GPT: no training needed)
def tiny_run(folder: Path) -> Path:
    from dataclasses import asdict
    from safetensors.torch import save_model
    from nbtrain.models import GPT
    from nbtrain.tokenizer import CharTokenizer
    tok, final = CharTokenizer('abcdefgh .'), folder/'final'
    final.mkdir(parents=True)
    gpt = GPT(n_layer=1, n_head=2, d_model=32, vocab_size=tok.vocab_size, max_seq_len=32)
    save_model(gpt, str(final/'model.safetensors'))
    (final/'nbtrain.json').write_text(json.dumps({'model': {'kind': 'reference', 'source': 'gpt', 'config': asdict(gpt.config)}, 'task': 'causal_lm'}))
    tok.save(final)
    return folder

def test_generate_prints_the_text_as_it_comes(tmp_path):
    run = tiny_run(tmp_path/'run')
    from nbtrain.generate import generate
    want = generate(run, ['abc', 'hg'], max_new_tokens=20, temperature=0)
    r = nbtrain('generate', str(run), '--prompt', 'abc', '--prompt', 'hg', '--max-new-tokens', '20', '--temperature', '0', env=ONE_THREAD)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout == f'abc{want[0]}\n\nhg{want[1]}\n'
    r = nbtrain('generate', str(run/'final'), '--prompt', 'abc', '--max-new-tokens', '20', '--temperature', '0.9', '--top-k', '5',
                '--top-p', '0.9', '--repetition-penalty', '1.2', '--stop', 'h', '--seed', '3', '--completion-only', env=ONE_THREAD)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout == generate(run, 'abc', max_new_tokens=20, temperature=0.9, top_k=5, top_p=0.9, repetition_penalty=1.2,
                                stop='h', seed=3)[0] + '\n' and 'h' not in r.stdout

def test_generate_and_eval_mistakes_are_one_line(tmp_path):
    run = tiny_run(tmp_path/'run')
    cases = [(['generate', str(run), '--prompt', 'a', '--top-p', '2'], '--top-p=2.0: expected a number in (0, 1]'),
             (['generate', str(tmp_path), '--prompt', 'a'], 'has no final model'),
             (['eval', str(tmp_path/'nope')], 'no such folder'),
             (['eval', str(run), '--splt', 'test'], "Did you mean '--split'?")]  # the rest: in-process, in nbs/12_cli.ipynb
    e = {**os.environ, 'PYTHONUNBUFFERED': '1', **ONE_THREAD}
    ps = [subprocess.Popen([sys.executable, '-m', 'nbtrain.cli', *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e)
          for argv in [a for a, _ in cases] + [['--help']]]  # all at once: on a 2-core machine one's imports overlap another's
    try: outs = [p.communicate(timeout=300) for p in ps]
    finally:
        for p in ps:
            if p.poll() is None: p.kill(); p.wait()
    for (argv, words), p, (out, err) in zip(cases, ps, outs):
        assert p.returncode == 2 and words in err and 'Traceback' not in err, (argv, err[-2000:])
        assert len(err.strip().splitlines()) == 1, err
    assert ps[-1].returncode == 0 and 'generate' in outs[-1][0] and 'eval' in outs[-1][0]
