"""Checkpoint cost for a GPT-2-small-sized model (about 124M parameters) with its AdamW state.

Prints, measured in one run on the same disk:
- the training stall per save with nbtrain's asynchronous writer (the time `save` blocks: copying state to host
  memory) as a ratio of a synchronous `torch.save` of the same state (target < 0.10);
- the background write throughput (MB/s, including the sha256 manifest);
- the load time (verify, read, and restore into the model and optimizer).

    python benchmarks/checkpoint.py [--size gpt2-small] [--saves 3] [--dir DIR]
"""
import argparse, os, shutil, statistics, tempfile, time
import torch
from nbtrain.checkpoint import CheckpointManager, model_state
from nbtrain.models import get_reference

def dir_bytes(p):
    return sum(f.stat().st_size for f in os.scandir(p) if f.is_file())

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--size', default='gpt2-small')
    ap.add_argument('--vocab', type=int, default=50304)
    ap.add_argument('--saves', type=int, default=3)
    ap.add_argument('--dir', default=None, help='where to write (default: a temporary folder)')
    a = ap.parse_args(argv)
    root = tempfile.mkdtemp(dir=a.dir)
    try:
        model = get_reference('gpt', a.size, vocab_size=a.vocab, max_seq_len=1024)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        for p in model.parameters(): p.grad = torch.randn_like(p) * 1e-3
        opt.step()  # creates the AdamW moments: the checkpoint holds 3x the weights
        n = sum(p.numel() for p in model.parameters())
        parts = lambda: dict(model=model_state(model), optimizer=opt.state_dict())
        print(f"model: GPT {a.size}, {n/1e6:.1f}M parameters; state with AdamW moments ~{3*n*4/2**20:,.0f} MB; torch {torch.__version__}, {torch.get_num_threads()} threads")

        sync, durable = [], []  # plain torch.save (into the page cache), and with the data flushed to disk
        for i in range(a.saves):
            f = os.path.join(root, f'sync-{i}.pt')
            t0 = time.perf_counter()
            torch.save(parts(), f)
            sync.append(time.perf_counter() - t0)
            os.sync()
            durable.append(time.perf_counter() - t0)
            os.remove(f)

        cm = CheckpointManager(os.path.join(root, 'ck'), keep_last_n=1, keep_best_k=0, async_save=True)
        stalls, writes, sizes = [], [], []
        for i in range(a.saves + 1):  # the first save allocates the host buffers; later saves reuse them
            t0 = time.perf_counter()
            path = cm.save(parts(), step=i + 1)
            stalls.append(time.perf_counter() - t0)
            cm.wait(); cm.check()
            writes.append(time.perf_counter() - t0 - stalls[-1])
            sizes.append(dir_bytes(path))
        steady, first = statistics.median(stalls[1:]), stalls[0]
        t_sync = statistics.median(sync)

        t0 = time.perf_counter()
        ck = cm.load('latest')
        model.load_state_dict(ck['model']); opt.load_state_dict(ck['state']['optimizer'])
        t_load = time.perf_counter() - t0

        mb = statistics.median(sizes) / 2**20
        print(f"synchronous torch.save:        {t_sync:6.2f} s per save (median of {a.saves}); "
              f"{statistics.median(durable):.2f} s flushed to disk")
        print(f"asynchronous save, loop stall: {steady:6.3f} s per save (first save, allocating buffers: {first:.3f} s)")
        print(f"stall ratio async / sync:      {steady / t_sync:6.3f} (target < 0.10: {'met' if steady / t_sync < 0.10 else 'NOT met'}); "
              f"{steady / statistics.median(durable):.3f} against the flushed save")
        print(f"background write:              {mb:,.0f} MB in {statistics.median(writes[1:]):.2f} s = "
              f"{mb / statistics.median(writes[1:]):,.0f} MB/s (safetensors + torch.save + sha256 + fsync)")
        print(f"load (verify + read + restore): {t_load:.2f} s")
        return steady / t_sync
    finally:
        shutil.rmtree(root, ignore_errors=True)

if __name__ == '__main__': main()
