"""Memory and time of the language-model loss: nbtrain's chunked cross-entropy against the textbook one.

One step of a GPT-2-sized head (hidden states [tokens, 768] -> logits over 50,304 tokens) under 16-bit autocast:
forward, `loss_sum / n`, backward. Each way runs in its own process, measured in the same run, and the report gives
nbtrain's ratio to the textbook `F.cross_entropy(logits.float(), ...)`:

- peak memory of the step above what was allocated before it (CUDA: `max_memory_allocated`; CPU: the process's peak
  resident memory), target <= 0.5;
- step time, target <= 1.05 (on a GPU; on CPU the times are reported, not judged);
- the loss and the head's gradient agree (relative difference).

    python benchmarks/loss_memory.py [--tokens 8192] [--vocab 50304] [--d-model 768] [--dtype bf16|fp16] [--steps 3]
"""
import argparse, json, os, resource, subprocess, sys, time
import torch
import torch.nn.functional as F

def step(head, h, lab, way, dtype, dev):
    from nbtrain.tasks import cross_entropy_sum
    with torch.autocast(dev.type, dtype=dtype):
        logits = head(h)
        if way == 'textbook': loss = F.cross_entropy(logits.float(), lab, reduction='sum')
        else: loss = cross_entropy_sum(logits, lab)
    del logits  # what a training loop keeps: the loss and its graph
    (loss / len(lab)).backward()
    return loss.detach()

def child(a):
    "One way, in this process: prints a JSON line with peak memory, seconds per step, the loss and the gradient's norm."
    dev = torch.device('cuda' if torch.cuda.is_available() and not a.cpu else 'cpu')
    dtype = dict(bf16=torch.bfloat16, fp16=torch.float16)[a.dtype]
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(a.d_model, a.vocab, bias=False).to(dev)
    h = torch.randn(a.tokens, a.d_model, generator=g).to(dev)
    lab = torch.randint(0, a.vocab, (a.tokens,), generator=g).to(dev)
    sync = torch.cuda.synchronize if dev.type == 'cuda' else (lambda: None)
    if dev.type == 'cuda':
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else: base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    for i in range(a.steps):
        head.weight.grad = None
        sync(); t0 = time.perf_counter()
        loss = step(head, h, lab, a.way, dtype, dev)
        sync(); times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() if dev.type == 'cuda' else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) - base
    grad = head.weight.grad.float()
    print(json.dumps(dict(way=a.way, device=dev.type, peak=peak, s=sorted(times)[len(times) // 2], loss=loss.item(),
                          grad=grad.cpu()[:64].flatten().tolist(), grad_norm=grad.norm().item())))

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--tokens', type=int, default=8192, help='batch x sequence length')
    ap.add_argument('--vocab', type=int, default=50304)
    ap.add_argument('--d-model', type=int, default=768)
    ap.add_argument('--dtype', default='bf16', choices=['bf16', 'fp16'])
    ap.add_argument('--steps', type=int, default=3)
    ap.add_argument('--cpu', action='store_true', help='stay on the CPU even where a GPU is present')
    ap.add_argument('--way', default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.way: return child(a)
    res = {}
    for way in ('textbook', 'nbtrain'):  # separate processes: each peak starts from a clean allocator
        r = subprocess.run([sys.executable, __file__, *sys.argv[1:], '--way', way], capture_output=True, text=True)
        if r.returncode: sys.exit(f"{way} failed:\n{r.stderr[-3000:]}")
        res[way] = json.loads(r.stdout.strip().splitlines()[-1])
    t, n = res['textbook'], res['nbtrain']
    dev = t['device']
    GB, logits = 2**30, a.tokens * a.vocab
    print(f"{'GPU' if dev == 'cuda' else 'CPU RUN, NO GPU'}: head {a.d_model} -> {a.vocab:,} over {a.tokens:,} tokens = "
          f"{logits/1e6:,.0f}M logits, {a.dtype} autocast; torch {torch.__version__}")
    for name, r in res.items():
        print(f"{name:<9} peak {r['peak']/GB:6.2f} GB ({r['peak']/logits:4.1f} bytes per logit)  step {r['s']*1e3:8.1f} ms  loss {r['loss']:.4f}")
    mem, speed = n['peak'] / t['peak'], n['s'] / t['s']
    dl = abs(n['loss'] - t['loss']) / abs(t['loss'])
    dg = max(abs(x - y) for x, y in zip(n['grad'], t['grad'])) / max(abs(y) for y in t['grad'])
    print(f"loss agrees to {dl:.1e} (relative), head gradient to {dg:.1e} (max difference / max value), norms "
          f"{n['grad_norm']:.4g} vs {t['grad_norm']:.4g}")
    print(f"target peak memory nbtrain / textbook <= 0.5: {mem:.3f} -- {'met' if mem <= 0.5 else 'NOT met'}")
    verdict = ('met' if speed <= 1.05 else 'NOT met') if dev == 'cuda' else 'not judged on CPU'
    print(f"target step time nbtrain / textbook <= 1.05: {speed:.3f} -- {verdict}")

if __name__ == '__main__': main()
