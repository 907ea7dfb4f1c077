"""Step-time overhead of nbtrain's trainer against a plain, hand-written PyTorch loop.

Both train the same reference GPT on the same batches (the embedded corpus, one DataLoader recipe), alternating in one
process so that machine noise hits both alike. The plain loop does what a careful person writes by hand: forward,
cross-entropy, backward, clip, AdamW step, schedule step, loss read back every `log_every` steps. nbtrain runs its
full loop: Fabric, task loss normalised over the accumulated batch, callbacks (metrics.jsonl, progress bar), logging.
Evaluation is off in both. Prints the median step time of each and the ratio. Target on CPU: ratio <= 1.05.

A third arm runs nbtrain with the gradient/loss monitor checking every step (`monitor.every_steps=1`) and a fourth
with the monitor off, and prints the ratio of the two. Target: every-step checks at most 3 % slower.

    python benchmarks/overhead.py [--rounds 5] [--steps 60] [--size tiny] [--seq-len 128] [--batch 32]
"""
import argparse, statistics, sys, tempfile, time, warnings
import torch
import torch.nn.functional as F
from nbtrain.callbacks import Callback
from nbtrain.config import load_config
from nbtrain.data import build_data, make_loader, set_epoch
from nbtrain.models import get_reference
from nbtrain.trainer import Trainer

class StepClock(Callback):
    "Records the wall clock at the end of every optimizer step."
    def __init__(self): self.times = []
    def on_step_end(self, trainer): self.times.append(time.perf_counter())

def per_step(times, warmup):
    t = times[warmup:]
    return (t[-1] - t[0]) / (len(t) - 1)

def plain_loop(cfg, data, steps, warmup):
    torch.manual_seed(cfg.train.seed)
    model = get_reference('gpt', cfg.model.size, vocab_size=data.vocab_size, max_seq_len=cfg.data.seq_len)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                            weight_decay=cfg.optim.weight_decay)
    total = steps + warmup
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))
    loader = make_loader(data.train, cfg.train.micro_batch_size, shuffle=True, seed=cfg.train.seed, collate=data.collate)
    set_epoch(loader, 0)
    model.train()
    times, it, running = [], iter(loader), 0.
    for step in range(total):
        b = next(it)
        x, y = b['input_ids'], b['labels']
        logits = model(x).logits
        loss = F.cross_entropy(logits.flatten(0, 1), y[:, 1:].flatten(), ignore_index=-100)  # packed labels run one token past x
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step(); opt.zero_grad(set_to_none=True); sched.step()
        running = running + loss.detach()
        if (step + 1) % cfg.train.log_every == 0: running.item(); running = 0.
        times.append(time.perf_counter())
    return per_step(times, warmup)

def nbtrain_loop(cfg, data, steps, warmup, **over):
    if over:
        from nbtrain.config import RunConfig, deep_merge, dotted_to_nested
        cfg = RunConfig.from_dict(deep_merge(cfg.to_dict(), dotted_to_nested(over)))
    clock = StepClock()
    tr = Trainer(cfg, data=data, callbacks=[clock])
    tr.fit()
    return per_step(clock.times, warmup)

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--rounds', type=int, default=5)
    p.add_argument('--steps', type=int, default=60, help='timed steps per round')
    p.add_argument('--warmup', type=int, default=5)
    p.add_argument('--size', default='tiny')
    p.add_argument('--seq-len', type=int, default=128)
    p.add_argument('--batch', type=int, default=32)
    a = p.parse_args(argv)
    out = tempfile.mkdtemp()
    cfg = load_config(preset='tiny-cpu', overrides={
        'model.size': a.size, 'data.seq_len': a.seq_len, 'train.micro_batch_size': a.batch,
        'train.max_steps': a.steps + a.warmup, 'train.eval_every': None, 'train.eval_at_start': False,
        'checkpoint.save_final': False, 'output_dir': out, 'data.corpus_size': 1000})
    data = build_data(cfg.data, cfg.task.name, cfg.train.seed)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads | GPT {a.size}, batch {a.batch} x {a.seq_len} "
          f"tokens | {a.rounds} rounds of {a.steps} timed steps, alternating", flush=True)
    plain, ours, every, off = [], [], [], []
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        for r in range(a.rounds):
            plain.append(plain_loop(cfg, data, a.steps, a.warmup))
            ours.append(nbtrain_loop(cfg, data, a.steps, a.warmup))
            every.append(nbtrain_loop(cfg, data, a.steps, a.warmup, **{'monitor.every_steps': 1}))
            off.append(nbtrain_loop(cfg, data, a.steps, a.warmup, **{'monitor.every_steps': None}))
            print(f"round {r+1}: plain {plain[-1]*1e3:7.2f} | nbtrain {ours[-1]*1e3:7.2f} | monitor every step "
                  f"{every[-1]*1e3:7.2f} | monitor off {off[-1]*1e3:7.2f} ms/step", file=sys.stderr, flush=True)
    mp, mo, me, mf = (statistics.median(x) for x in (plain, ours, every, off))
    ratio, mon = mo / mp, me / mf
    print(f"median step time: plain loop {mp*1e3:.2f} ms, nbtrain {mo*1e3:.2f} ms (monitor every "
          f"{cfg.monitor.every_steps} steps), monitor every step {me*1e3:.2f} ms, monitor off {mf*1e3:.2f} ms")
    print(f"step-time ratio nbtrain / plain: {ratio:.3f} (target <= 1.05: {'met' if ratio <= 1.05 else 'NOT met'})")
    print(f"step-time ratio monitor every step / off: {mon:.3f} (target <= 1.03: {'met' if mon <= 1.03 else 'NOT met'})")
    return ratio

if __name__ == '__main__': main()
