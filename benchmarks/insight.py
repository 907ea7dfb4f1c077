"""What watching a run costs: evaluation metrics, the live dashboard, and the trackers' per-log cost.

Prints, measured in one run on this machine:
- TaskMetrics' extra work per validation batch (top-k, confidence, entropy, distributions) as a ratio of the work the
  trainer already does on the same logits (`Task.eval_stats`: loss and accuracy), for a character vocabulary and a
  GPT-2-sized one;
- the time of one dashboard draw (the live figure with fixed margins, and the saved PNG with constrained layout) for
  runs of 100, 1,000 and 10,000 logged rows; the live plot spends at most 5% of the run on drawing by construction;
- the cost per logged row of the CSV, TensorBoard and (offline) W&B trackers, as a ratio of the JSONL logger's;
- the samples decoded at every evaluation (`nbtrain.samples`, `eval.*` at their defaults) as a share of the training
  time of the same run, a run of the default preset (or `--preset`) cut to `--sample-steps` optimizer steps, and
  projected to the preset's whole run (its evaluations over its steps); the target is at most 3%.

    python benchmarks/insight.py [--batch 8] [--seq 256] [--repeat 5] [--preset tiny-cpu] [--sample-steps 200]
    python benchmarks/insight.py --only samples
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

def _evaluation_steps(n:int, every:int|None, per_epoch:int, at_start:bool) -> list[int]:
    "The steps a run of `n` steps evaluates at: every `every` steps, at epoch ends, at the start and at the end."
    steps = {n} | ({0} if at_start else set()) | set(range(per_epoch, n + 1, per_epoch))
    if every: steps |= set(range(every, n + 1, every))
    return sorted(steps)

def samples(a):
    from nbtrain.config import DEFAULT_PRESET, load_config
    from nbtrain.samples import SampleCallback
    from nbtrain.trainer import Trainer
    preset = a.preset or DEFAULT_PRESET
    whole = load_config(preset=preset)
    n = a.sample_steps or whole.train.max_steps
    with tempfile.TemporaryDirectory() as d:
        cfg = load_config(preset=preset, overrides={'output_dir': d, 'name': 'samples', 'train.max_steps': n, 'train.progress_bar': False})
        sc = SampleCallback(cfg, print_samples=False)  # the trainer's own, with the run's eval settings
        tr = Trainer(cfg, callbacks=[sc])
        res = tr.fit()
        per_epoch, dev = tr.steps_per_epoch, tr.fabric.device
    e, t = cfg.eval, cfg.train
    m = cfg.model
    print(f"samples at every evaluation, preset {preset} ({m.name} {m.size}, {len(sc.prompts)} prompts x {e.sample_max_new_tokens} "
          f"new tokens, {dev.type}{'' if dev.type != 'cpu' else f', {torch.get_num_threads()} threads'}):")
    if not sc.evaluations: print("  no samples were decoded (not a causal language model?)"); return
    each = sc.seconds / sc.evaluations
    share = sc.seconds / res.elapsed_s
    print(f"  this run: {res.step} steps in {res.elapsed_s:.1f} s, {sc.evaluations} evaluations with samples, {sc.seconds:.2f} s "
          f"of sampling ({each:.2f} s each): {100 * share:.2f}% of the run")
    N = whole.train.max_steps or n
    evals = _evaluation_steps(N, t.eval_every, per_epoch, t.eval_at_start)
    step_s = (res.elapsed_s - sc.seconds) / max(res.step, 1)  # training, evaluation and the rest, per step
    projected = len(evals) * each / (N * step_s + len(evals) * each)
    print(f"  the whole {preset} run ({N} steps, {len(evals)} evaluations), projected: {100 * projected:.2f}% of its time "
          f"-- target <= 3%: {'met' if max(share, projected) <= 0.03 else 'NOT met'}")

PARTS = dict(metrics=eval_metrics, dashboard=dashboard, trackers=trackers, samples=samples)

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--batch', type=int, default=8)
    ap.add_argument('--seq', type=int, default=256)
    ap.add_argument('--repeat', type=int, default=5)
    ap.add_argument('--preset', default=None, help='the preset whose run the samples are measured in (default: the default preset)')
    ap.add_argument('--sample-steps', type=int, default=200, help="optimizer steps of that run (0: the preset's whole run)")
    ap.add_argument('--only', default=','.join(PARTS), help=f"the parts to run, comma-separated: {', '.join(PARTS)}")
    a = ap.parse_args(argv)
    for name in a.only.split(','):
        if name.strip() not in PARTS: ap.error(f"--only: unknown part {name.strip()!r}; choose from {', '.join(PARTS)}")
        PARTS[name.strip()](a)

if __name__ == '__main__': main()
