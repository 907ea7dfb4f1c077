"""benchmarks/gpu_throughput.py at its smallest CPU size: every arm runs and the report has its lines (no timing checks)."""
import os, re, subprocess, sys
from pathlib import Path
import pytest

BENCH = Path(__file__).resolve().parents[1] / 'benchmarks' / 'gpu_throughput.py'
LOSS_BENCH = Path(__file__).resolve().parents[1] / 'benchmarks' / 'loss_memory.py'
LORA_BENCH = Path(__file__).resolve().parents[1] / 'benchmarks' / 'lora.py'
GENERATE_BENCH = Path(__file__).resolve().parents[1] / 'benchmarks' / 'generate.py'
ROWS = ('plain loop', 'nbtrain', 'transformers.Trainer', 'Lightning Trainer', 'nbtrain reference GPT')

# The smoke runs, each a subprocess (a benchmark sets process-wide state: torch threads, warning filters, compiler
# caches): (the modules it needs, its arguments, whether it runs in a folder of its own, its extra environment).
SMOKE = {'gpu_throughput': (('transformers', 'accelerate', 'lightning'),
                            [BENCH, '--size', 'cpu-tiny', '--steps', '2', '--warmup', '1', '--log-every', '1'], True, {}),
         'loss_memory': ((), [LOSS_BENCH, '--tokens', '1024', '--steps', '1', '--cpu'], False, {}),
         'lora': (('transformers', 'peft'), [LORA_BENCH, '--quick'], True, {}),
         'generate': (('transformers',), [GENERATE_BENCH, '--quick', '--threads', '1'], False, {'PYTHONUNBUFFERED': '1'})}

@pytest.fixture(scope='module')
def smoke(request, tmp_path_factory):
    """The smoke runs of the tests selected in this module, all started at once (on a 2-core machine one's imports and
    single-threaded phases overlap another's); `smoke(name)` waits for one and returns its result."""
    import importlib.util
    wanted = {n for item in request.session.items if item.module is request.module for n in SMOKE if item.name == f'test_{n}_cpu_smoke'}
    procs = {}
    for name in wanted:
        needs, argv, own_dir, extra = SMOKE[name]
        if not all(importlib.util.find_spec(m) for m in needs): continue  # the test skips itself
        env = {**os.environ, 'CUDA_VISIBLE_DEVICES': '', **extra}
        cwd = None
        if own_dir:
            cwd = tmp_path_factory.mktemp(name)
            env.update(PYTHONUNBUFFERED='1', TMPDIR=str(cwd))
        procs[name] = subprocess.Popen([sys.executable, *map(str, argv)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True, env=env, cwd=cwd)
    def result(name):
        p = procs[name]
        out, err = p.communicate(timeout=300)
        return subprocess.CompletedProcess(p.args, p.returncode, out, err)
    yield result
    for p in procs.values():
        if p.poll() is None: p.kill(); p.communicate()

@pytest.mark.slow
def test_gpu_throughput_cpu_smoke(smoke):
    pytest.importorskip('transformers'); pytest.importorskip('accelerate'); pytest.importorskip('lightning')
    r = smoke('gpu_throughput')
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    lines = out.splitlines()
    assert lines[0].startswith('CPU RUN, NO GPU'), lines[0]
    assert 'MFU n/a' in lines[0] and 'batch 4 x 64 tokens' in lines[0] and 'fp32' in lines[0]
    assert 'FAILED' not in out, out
    for name in ROWS:  # every arm ran and reports tokens/s, n/a MFU and memory on CPU, and a finite loss
        row = next((l for l in lines if re.match(rf'{re.escape(name)}\s+eager\s', l)), None)
        assert row is not None, f'no row for {name}:\n{out}'
        m = re.match(rf'{re.escape(name)}\s+eager\s+([\d,]+)\s+([\d.]+)\s+n/a\s+n/a\s+([\d.]+)\s+(\S+)$', row)
        assert m, row
        assert int(m.group(1).replace(',', '')) > 0 and float(m.group(2)) > 0
        assert 1.0 < float(m.group(3)) < 20.0  # about ln(1024) = 6.9 on random tokens
        assert m.group(4) == ('-' if name == 'nbtrain reference GPT' else '1.000x' if name == 'nbtrain' else m.group(4))
        if name not in ('nbtrain', 'nbtrain reference GPT'): assert re.fullmatch(r'[\d.]+x', m.group(4)), row
    assert 'compiled' not in out.split('FLOPs per token')[1]  # no compiled arms on CPU without --compile
    assert re.search(r'FLOPs per token \(6N \+ 12\*L\*d\*T\): [\d.]+ M with N = [\d.]+ M', out), out
    for goal in ('>= 0.98x the plain loop', 'ahead of transformers.Trainer', 'ahead of Lightning'):
        assert re.search(rf'target nbtrain {re.escape(goal)} \(eager\): [\d.]+x -- (met|NOT met) \(CPU check run', out), goal
    assert 'target reference GPT >= 45% MFU on an H100 (eager): n/a' in out

def test_gpu_throughput_rejects_unknown_arm():
    r = subprocess.run([sys.executable, str(BENCH), '--arms', 'plain,deepspeed'], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and 'unknown deepspeed' in r.stderr, r.stderr[-2000:]

@pytest.mark.slow
def test_loss_memory_cpu_smoke(smoke):
    "The chunked loss over 51M bf16 logits (2 chunks) against the textbook one: same loss and gradient, less memory."
    r = smoke('loss_memory')
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    assert out.startswith('CPU RUN, NO GPU: head 768 -> 50,304 over 1,024 tokens = 52M logits, bf16 autocast'), out
    m = re.search(r'loss agrees to ([\d.e+-]+) \(relative\), head gradient to ([\d.e+-]+)', out)
    assert m and float(m.group(1)) < 1e-5 and float(m.group(2)) < 1e-2, out
    ratio = float(re.search(r'target peak memory nbtrain / textbook <= 0.5: ([\d.]+)', out).group(1))
    assert ratio < 1, out  # at this small size the fixed chunk takes part of the gain; the 8,192-token default shows 0.44
    assert 'target step time nbtrain / textbook <= 1.05: ' in out and 'not judged on CPU' in out

@pytest.mark.slow
def test_lora_cpu_smoke(smoke):
    "Full fine-tuning, LoRA through nbtrain and LoRA with peft in a plain loop, at --quick size: every arm runs and reports."
    pytest.importorskip('transformers'); pytest.importorskip('peft')
    r = smoke('lora')
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    assert out.startswith('CPU RUN, NO GPU: scaled-down check, --quick smoke test'), out
    assert 'FAILED' not in out, out
    rows, size = {}, r'[\d.]+ [KMG]?B'
    for name in ('full fine-tuning (nbtrain)', 'LoRA (nbtrain)', 'LoRA (peft + plain loop)'):
        m = re.search(rf'^{re.escape(name)}\s+([\d,]+)\s+({size})\s+(\({size}\)|-)\s+({size})\s+([\d.]+) ms\s+([\d.]+)x\s+([\d.]+)$', out, re.M)
        assert m, f'no row for {name}:\n{out}'
        rows[name] = int(m.group(1).replace(',', '')), m.group(2)
        assert float(m.group(5)) > 0 and 1.0 < float(m.group(7)) < 20.0  # about ln(4096) = 8.3 on random tokens
        if 'nbtrain' in name: assert m.group(3) == f'({m.group(2)})', m.group(0)  # nbtrain.memory's estimate is what the run held
    assert rows['LoRA (nbtrain)'] == rows['LoRA (peft + plain loop)']  # the same adapters: parameters and bytes held
    assert rows['LoRA (nbtrain)'][0] < rows['full fine-tuning (nbtrain)'][0] / 10
    assert re.search(r'^QLoRA 4-bit \(nbtrain\)\s+skipped: bitsandbytes quantizes on a CUDA GPU', out, re.M), out
    assert re.search(r'target nbtrain LoRA step time / peft plain loop <= 1.05: [\d.]+ -- (met|NOT met) \(CPU check run', out), out
    ck = re.search(r'target LoRA checkpoint / full < 5%: ([\d.]+)% -- (met|NOT met)', out)
    assert ck and float(ck.group(1)) < 5, out

@pytest.mark.slow
def test_generate_cpu_smoke(smoke):
    "The reference GPT with and without its KV cache, and a transformers GPT-2, at --quick size: every arm runs and reports."
    pytest.importorskip('transformers')
    r = smoke('generate')
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    assert out.startswith("CPU RUN, NO GPU: --quick smoke test, 1 threads -- reference GPT 'tiny'"), out
    for name in ('nbtrain GPT, KV cache', 'nbtrain GPT, no cache', 'transformers GPT-2, its own cache'):
        m = re.search(rf'^{re.escape(name)}\s+([\d,.]+)\s+([\d.]+)\s+([\d.]+)x$', out, re.M)
        assert m and float(m.group(1).replace(',', '')) > 0, f'no row for {name}:\n{out}'
    assert 'same tokens with and without the cache: yes' in out
    assert re.search(r'KV-cache speed-up \(tokens/s with / without, 8 \+ 24 tokens\): [\d.]+x', out), out
