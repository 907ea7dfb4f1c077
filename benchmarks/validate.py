"""Time of the tier 1 and tier 2 model checks on the reference GPT (tiny preset), check by check.

Runs `run_checks` with its default settings (batch 4, length 64, 100 overfit steps, 2 s of speed measurement,
memory at batch 1, 2, 4, 8 and the model's full length) the way template.ipynb runs it, after one untimed warm-up
run (first calls pay for lazy initialisation in torch and matplotlib). Prints the seconds of each check, the total,
and whether it meets the target: under 30 s on a 2-core CPU. Exits 1 when it does not.

    python benchmarks/validate.py [--size tiny] [--rounds 3] [--threads N] [--device cpu]
"""
import argparse, os, statistics, sys, time
import torch
from nbtrain.models import get_reference
from nbtrain.validate import run_checks

TARGET_S = 30.0

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--size', default='tiny', help='reference GPT size preset')
    ap.add_argument('--rounds', type=int, default=3, help='timed runs; the median of each check is reported')
    ap.add_argument('--threads', type=int, default=None, help='torch intra-op threads (default: torch decides)')
    ap.add_argument('--device', default=None, help='cpu or cuda (default: automatic)')
    args = ap.parse_args(argv)
    if args.threads: torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, 'getloadavg') else float('nan')
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads, load average {load:.1f}")
    model = get_reference('gpt', args.size)
    run_checks(model, device=args.device)  # warm-up
    times, totals = {}, []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        report = run_checks(model, device=args.device)
        totals.append(time.perf_counter() - t0)
        for r in report: times.setdefault(r.name, []).append(r.seconds)
    print(f"\nGPT {args.size} ({sum(p.numel() for p in model.parameters()):,} parameters) on {report.info['device']}, "
          f"median of {args.rounds} runs:")
    for name, ts in times.items():
        print(f"  {name:<17} {statistics.median(ts):6.2f} s   {report[name].status}")
    total = statistics.median(totals)
    print(f"  {'total':<17} {total:6.2f} s   (target < {TARGET_S:.0f} s: {'met' if total < TARGET_S else 'NOT met'})")
    assert report.ok, report
    return 0 if total < TARGET_S else 1

if __name__ == '__main__':
    sys.exit(main())
