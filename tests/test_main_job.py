"""The README's main job, `nbtrain train` with the default config, kept small: fewer steps, same everything else."""
import re, subprocess, sys, os
import pytest

@pytest.mark.slow
def test_main_job_learns(tmp_path):
    r = subprocess.run([sys.executable, '-m', 'nbtrain.cli', 'train', '--train.max_steps', '100', '--train.eval_every', '50'],
                       capture_output=True, text=True, cwd=tmp_path, timeout=600, env={**os.environ, 'PYTHONUNBUFFERED': '1'})
    assert r.returncode == 0, r.stderr[-3000:]
    start = float(re.search(r'validation loss at start: ([\d.]+)', r.stdout).group(1))
    end = float(re.search(r'validation loss at end:\s+([\d.]+)', r.stdout).group(1))
    assert end < 0.7 * start, (start, end)
    assert (tmp_path/'runs').is_dir()

def test_overhead_benchmark_runs(capsys):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'benchmarks'))
    try:
        import overhead
        ratio = overhead.main(['--rounds', '1', '--steps', '4', '--warmup', '1', '--seq-len', '32', '--batch', '4'])
    finally: sys.path.pop(0)
    assert ratio > 0
    assert 'step-time ratio nbtrain / plain' in capsys.readouterr().out
