"""What pruning saves: the same search run without a pruner and with one, compared by total optimizer steps.

Every arm is the same search (the same space, sampler seed, number of trials and run config), in its own study
folder, so that the only difference is the pruner. The space is deliberately wide (the learning rate over three
orders of magnitude) so that some trials are poor, as in a real first search. Prints, per arm: trials completed
and pruned, the total optimizer steps of all trials, the best value reached and the wall time; then the steps of
each pruned arm as a fraction of the unpruned one. Target: every pruner uses fewer steps than none, with a best
value close to the unpruned search's.

    python benchmarks/hpo.py [--trials 12] [--steps 60] [--eval-every 10] [--pruners none,median,hyperband]
                             [--size tiny] [--threads 1]
"""
import argparse, sys, tempfile, time
from pathlib import Path
import optuna
from optuna.trial import TrialState
from nbtrain.hpo import search

def arm(pruner, args, root:Path) -> dict:
    over = {'data.corpus_size': args.corpus, 'data.seq_len': args.seq_len, 'model.size': args.size,
            'train.max_steps': args.steps, 'train.eval_every': args.eval_every, 'train.eval_batches': 4,
            'train.log_every': args.eval_every, 'train.progress_bar': False, 'train.micro_batch_size': 16,
            'checkpoint.every_minutes': None, 'output_dir': str(root)}
    if args.layers: over.update({'model.n_layer': args.layers, 'model.d_model': args.d_model, 'model.n_head': 2})
    pruners = {'none': 'none', 'median': {'type': 'median', 'n_startup_trials': 3},  # waits for the first quarter of a run
               'hyperband': {'type': 'hyperband', 'min_resource': args.eval_every, 'max_resource': args.steps}}
    spec = {'trials': args.trials, 'seed': args.seed, 'pruner': pruners[pruner],
            'space': {'optim.lr': {'type': 'float', 'low': 1e-4, 'high': 1e-1, 'log': True},
                      'schedule.warmup_ratio': {'type': 'float', 'low': 0.0, 'high': 0.3},
                      'optim.weight_decay': {'type': 'float', 'low': 0.0, 'high': 0.3}}}
    t0 = time.perf_counter()
    res = search({'search': spec}, overrides=over, name=f'bench-{pruner}')
    trials = res.study.trials
    return dict(pruner=pruner, wall_s=time.perf_counter() - t0, best=res.best_value,
                steps=sum(t.user_attrs.get('steps', 0) for t in trials),
                complete=sum(t.state == TrialState.COMPLETE for t in trials),
                pruned=sum(t.state == TrialState.PRUNED for t in trials))

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--trials', type=int, default=12)
    p.add_argument('--steps', type=int, default=60, help='optimizer steps of a trial that is not pruned')
    p.add_argument('--eval-every', type=int, default=10)
    p.add_argument('--pruners', default='none,median,hyperband')
    p.add_argument('--size', default='tiny', help='reference GPT size')
    p.add_argument('--layers', type=int, default=2, help='override the size: layers (0 keeps the preset size)')
    p.add_argument('--d-model', type=int, default=64)
    p.add_argument('--seq-len', type=int, default=64)
    p.add_argument('--corpus', type=int, default=300, help='stories in the embedded corpus')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--threads', type=int, default=None, help='torch intra-op threads (1 is fastest for tiny models on a busy CPU)')
    args = p.parse_args(argv)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    import lightning_fabric  # its one-time import (seconds) is not charged to the first arm's wall time
    names = [n.strip() for n in args.pruners.split(',') if n.strip()]
    if 'none' not in names: names.insert(0, 'none')
    with tempfile.TemporaryDirectory() as tmp:
        rows = [arm(n, args, Path(tmp)) for n in names]
    print(f"\n{args.trials} trials of up to {args.steps} steps (evaluation every {args.eval_every}), seed {args.seed}")
    print(f"{'pruner':<10} {'complete':>8} {'pruned':>6} {'total steps':>11} {'best val_loss':>13} {'wall s':>7}")
    for r in rows:
        print(f"{r['pruner']:<10} {r['complete']:>8} {r['pruned']:>6} {r['steps']:>11} {r['best']:>13.4f} {r['wall_s']:>7.1f}")
    base, ok = rows[0], True
    for r in rows[1:]:
        frac = r['steps'] / base['steps']
        fewer = r['steps'] < base['steps']
        ok &= fewer
        print(f"{r['pruner']}: {frac:.0%} of the unpruned search's optimizer steps ({'fewer' if fewer else 'NOT fewer'}); "
              f"best {r['best']:.4f} vs {base['best']:.4f} ({r['best'] - base['best']:+.4f})")
    return 0 if ok else 1

if __name__ == '__main__': sys.exit(main())
