"""What watching a run costs: evaluation metrics, the live dashboard, and the trackers' per-log cost.

Prints, measured in one run on this machine:
- TaskMetrics' extra work per validation batch (top-k, confidence, entropy, distributions) as a ratio of the work the
  trainer already does on the same logits (`Task.eval_stats`: loss and accuracy), for a character vocabulary and a
  GPT-2-sized one;
- the time of one dashboard draw (the live figure with fixed margins, and the saved PNG with constrained layout) for
  runs of 100, 1,000 and 10,000 logged rows; the live plot spends at most 5% of the run on drawing by construction;
- the cost per logged row of the CSV, TensorBoard and (offline) W&B trackers, as a ratio of the JSONL logger's.

    python benchmarks/insight.py [--batch 8] [--seq 256] [--repeat 5]
"""
import argparse, math, os, random, tempfile, time
from types import SimpleNamespace
import torch
from nbtrain.callbacks import JSONLLogger
from nbtrain.dashboard import plot_dashboard, render_png
from nbtrain.metrics import EvalStats
from nbtrain.tasks import build_task

def best(fn, repeat):
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter(); fn(); ts.append(time.perf_counter() - t0)
    return min(ts)

def eval_metrics(a):
    task = build_task('causal_lm')
    print(f"evaluation metrics, one batch of {a.batch}x{a.seq} tokens (CPU, {torch.get_num_threads()} threads):")
    for V in (64, 50304):
        logits, ids = torch.randn(a.batch, a.seq, V), torch.randint(0, V, (a.batch, a.seq))
        batch = dict(input_ids=ids, labels=ids)
        base = best(lambda: task.eval_stats(logits, batch), a.repeat)
        st = EvalStats(top_k=5)
        extra = best(lambda: st.update(*task.pair(logits, batch)), a.repeat)
        print(f"  vocabulary {V:>6}: eval_stats {base * 1e3:7.1f} ms, TaskMetrics {extra * 1e3:7.1f} ms  ratio {extra / base:.2f}")

def dashboard(a):
    print("dashboard draw (PNG at 80 dpi for the live plot, 110 dpi for the file):")
    rng = random.Random(0)
    for n in (100, 1000, 10000):
        rows = []
        for s in range(1, n + 1):
            rows.append(dict(step=s, loss=3 * math.exp(-s / n) + rng.gauss(0, .05), lr=1e-3, grad_norm=1 + rng.random(),
                             tokens_per_s=5e4 + rng.gauss(0, 2e3), ppl=20.))
            if s % max(1, n // 20) == 0: rows.append(dict(step=s, val_loss=2., val_ppl=7., val_acc=.5, val_top5_acc=.8))
        fig = plot_dashboard(rows, fast=True)
        live = best(lambda: render_png(plot_dashboard(rows, fig, fast=True), 80), a.repeat)
        final = best(lambda: render_png(plot_dashboard(rows), 110), max(1, a.repeat // 2))
        print(f"  {n:>6} rows: live {live * 1e3:6.0f} ms, saved PNG {final * 1e3:6.0f} ms")

def trackers(a):
    os.environ.setdefault('WANDB_SILENT', 'true')
    from nbtrain.tracking import CSVLogger, TensorBoardTracker, WandbTracker
    from nbtrain.config import load_config
    cfg = load_config()
    m = dict(loss=1.2345, lr=3e-4, grad_norm=0.9, tokens_per_s=51234.5, samples_per_s=400.1)
    n = 500
    print(f"trackers, cost per logged row ({n} rows; ratio to the JSONL logger):")
    with tempfile.TemporaryDirectory() as d:
        for k in ('WANDB_DATA_DIR', 'WANDB_CACHE_DIR', 'WANDB_CONFIG_DIR'): os.environ[k] = os.path.join(d, k)
        tr = SimpleNamespace(run_dir=d, is_global_zero=True, step=0, epoch=0.0, cfg=cfg, total_steps=n)
        cbs = dict(jsonl=JSONLLogger(), csv=CSVLogger(cfg), tensorboard=TensorBoardTracker(cfg),
                   wandb=WandbTracker(cfg, mode='offline', log_artifacts='none', settings=dict(x_disable_stats=True, console='off')))
        cost = {}
        for name, cb in cbs.items():
            cb.on_fit_start(tr)
            t0 = time.perf_counter()
            for tr.step in range(1, n + 1): cb.on_log(tr, dict(m))
            cost[name] = (time.perf_counter() - t0) / n
            cb.on_fit_end(tr)
        for name, c in cost.items(): print(f"  {name:<12} {c * 1e6:8.0f} us  ratio {c / cost['jsonl']:6.1f}")

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--batch', type=int, default=8)
    ap.add_argument('--seq', type=int, default=256)
    ap.add_argument('--repeat', type=int, default=5)
    a = ap.parse_args(argv)
    eval_metrics(a); dashboard(a); trackers(a)

if __name__ == '__main__': main()
