"""Data pipeline speed: nbtrain against the obvious alternatives, measured in the same run.

1. Tokenizing a corpus: the character tokenizer's vectorised `encode_flat` against a per-text Python loop, and the BPE's
   batch encoding against Hugging Face `datasets.map(batched=True)` with the same `tokenizers` tokenizer.
2. The token cache: building the data a second time (ids and BPE from the cache) against the first time.
3. Resuming mid-epoch: the first batch after `set_epoch(loader, epoch, skip)` against reading and dropping the skipped
   batches (what a loop without a resumable sampler does).
4. Masked-LM collation: `MLMCollator` against transformers' `DataCollatorForLanguageModeling`.
5. With --big-gb N (off by default: it writes N GB and takes minutes): token shards (nbtrain.tokens) of a generated
   N GB text corpus. Preparation speed with 1 and 2 processes (MB/s of text); windows read through a DataLoader
   (tokens/s) against the training speed of the reference GPT at size `small` on this CPU (target >= 5x); the RSS of
   a read loop over the windows (os.pread, as TokenWindows reads) against a kept-open np.memmap, at start, middle and
   end (target: flat, < 1.5 GB); and a short nbtrain training run of the reference GPT on the corpus with its RSS.

Prints one line per comparison with the ratio (> 1: nbtrain is faster).

    python benchmarks/data.py [--stories 5000] [--seq-len 256] [--skip 400] [--rounds 3] [--big-gb 2 [--big-dir DIR]]
"""
import argparse, os, statistics, sys, tempfile, time, warnings
from pathlib import Path
import torch

def best(fn, rounds):
    "Fastest of `rounds` timed calls of `fn` (seconds) and its last result."
    times, out = [], None
    for _ in range(rounds):
        t0 = time.perf_counter(); out = fn(); times.append(time.perf_counter() - t0)
    return min(times), out

def report(name, ours, peer, peer_name):
    print(f'{name:<34} nbtrain {ours * 1e3:9.2f} ms | {peer_name:<38} {peer * 1e3:9.2f} ms | ratio {peer / ours:7.1f}x')
    return peer / ours

def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--stories', type=int, default=5000)
    p.add_argument('--seq-len', type=int, default=256)
    p.add_argument('--skip', type=int, default=400, help='batches to skip when resuming')
    p.add_argument('--batch', type=int, default=16)
    p.add_argument('--rounds', type=int, default=3)
    p.add_argument('--big-gb', type=float, default=0, help='run the token-shard section on a generated corpus of this many GB (0: skip)')
    p.add_argument('--big-dir', help='where the big corpus and its shards go (default: a temporary folder, removed after)')
    p.add_argument('--big-tokenizer', default='bpe', help='tokenizer of the big corpus (bpe, byte, char)')
    p.add_argument('--big-steps', type=int, default=8, help='optimizer steps of the training run on the big corpus (0: no run)')
    a = p.parse_args(argv)
    from nbtrain.data import (embedded_corpus, CharTokenizer, BPETokenizer, build_data, data_settings, make_loader,
                              set_epoch)
    docs = embedded_corpus(a.stories).split('\n\n')
    print(f'{len(docs)} stories, {sum(map(len, docs)):,} characters; best of {a.rounds} rounds')
    ratios = {}

    char = CharTokenizer(docs)
    ours, _ = best(lambda: char.encode_flat(docs, add_eos=True), a.rounds)
    peer, _ = best(lambda: [char.encode(d, add_eos=True) for d in docs], a.rounds)
    ratios['char_encode'] = report('char tokenize', ours, peer, 'per-text Python loop')

    bpe = BPETokenizer.train(docs, vocab_size=4096)
    ours, _ = best(lambda: bpe.encode_flat(docs, add_eos=True), a.rounds)
    try:
        import datasets
        datasets.disable_progress_bars(); datasets.disable_caching()
        ds = datasets.Dataset.from_dict({'text': docs})
        enc = lambda b: {'input_ids': [e.ids + [bpe.eos_id] for e in bpe.tok.encode_batch(b['text'])]}
        peer, _ = best(lambda: ds.map(enc, batched=True, remove_columns=['text']), a.rounds)
        ratios['bpe_encode'] = report('BPE tokenize', ours, peer, 'datasets.map(batched=True)')
    except ImportError: print('BPE tokenize: datasets is not installed, no peer')

    with tempfile.TemporaryDirectory() as cache:
        cfg = data_settings(None, tokenizer='bpe', vocab_size=4096, corpus_size=a.stories, seq_len=a.seq_len, cache_dir=cache)
        t0 = time.perf_counter(); build_data(cfg, 'causal_lm', 0); cold = time.perf_counter() - t0
        warm, b = best(lambda: build_data(cfg, 'causal_lm', 0), a.rounds)
        assert b.info['cache']['tokens'] == 'hit'
        ratios['cache'] = report('build_data, BPE (cache)', warm, cold, 'first build (train BPE, tokenize)')
        print(f"{'':<34} packing efficiency {b.info['packing_efficiency']:.4f} vs one story per row "
              f"{b.info['padded_efficiency']:.4f}")

    data = build_data(data_settings(None, corpus_size=a.stories, seq_len=a.seq_len, cache=False), 'causal_lm', 0)
    skip = min(a.skip, len(data.train) // a.batch - 1)
    def resumed():
        loader = make_loader(data.train, a.batch, shuffle=True, seed=0, collate=data.collate)
        set_epoch(loader, 1, skip=skip)
        return next(iter(loader))
    def dropped():
        loader = make_loader(data.train, a.batch, shuffle=True, seed=0, collate=data.collate)
        set_epoch(loader, 1)
        it = iter(loader)
        for _ in range(skip): next(it)
        return next(it)
    ours, x = best(resumed, a.rounds)
    peer, y = best(dropped, a.rounds)
    assert torch.equal(x['input_ids'], y['input_ids'])  # the same batch either way
    ratios['resume'] = report(f'resume after {skip} batches', ours, peer, 'read and drop the skipped batches')

    mlm = build_data(data_settings(None, corpus_size=min(a.stories, 2000), seq_len=a.seq_len, tokenizer='bpe',
                                   vocab_size=4096, cache=False), 'masked_lm', 0)
    items = [mlm.train[i] for i in range(a.batch)]
    ours, _ = best(lambda: [mlm.collate(items, seeds=list(range(a.batch))) for _ in range(20)], a.rounds)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerFast
            hf_tok = PreTrainedTokenizerFast(tokenizer_object=mlm.tokenizer.tok, pad_token='<pad>', mask_token='<mask>',
                                             unk_token='<unk>', eos_token='<eos>')
            hf = DataCollatorForLanguageModeling(hf_tok, mlm_probability=0.15)
            hf_items = [{'input_ids': it['input_ids'].tolist()} for it in items]
            peer, _ = best(lambda: [hf(hf_items) for _ in range(20)], a.rounds)
        ratios['mlm_collate'] = report('MLM collate (20 batches)', ours, peer, 'DataCollatorForLanguageModeling')
    except ImportError: print('MLM collate: transformers is not installed, no peer')
    if a.big_gb > 0: ratios.update(big_corpus(a))
    return ratios

def rss() -> int:
    "This process's resident memory, bytes."
    try:
        with open('/proc/self/status') as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith('VmRSS:'))
    except OSError:
        import psutil
        return psutil.Process().memory_info().rss

def gb(n): return f'{n / 2**30:.2f} GB'

def write_corpus(path, size_gb, seed=0):
    "About `size_gb` GB of stories: the embedded ones in a new order each round, each with a number and a count, so the text does not repeat."
    import numpy as np
    from nbtrain.embedded import embedded_corpus
    base = embedded_corpus(20000).split('\n\n')
    rng, target, n, k = np.random.default_rng(seed), int(size_gb * 2**30), 0, 0
    with open(path, 'w', encoding='utf-8') as f:
        while n < target:
            order, nums = rng.permutation(len(base)), rng.integers(0, 10**9, len(base))
            block = '\n\n'.join(f'Story {k + j}, page {nums[j]}. {base[i]}' for j, i in enumerate(order.tolist())) + '\n\n'
            f.write(block); n += len(block.encode()); k += len(base)
    return n

def big_corpus(a) -> dict:
    "Section 5: token shards of a big generated corpus."
    import shutil, numpy as np
    from torch.utils.data import DataLoader
    from nbtrain.tokens import prepare_tokens, TokenWindows
    from nbtrain.models import get_reference
    out, own = {}, a.big_dir is None
    root = Path(a.big_dir or tempfile.mkdtemp(prefix='nbtrain-big-'))
    root.mkdir(parents=True, exist_ok=True)
    try:
        text = root / 'corpus.txt'
        t0 = time.perf_counter()
        if not text.is_file() or text.stat().st_size < a.big_gb * 2**30 * 0.99: write_corpus(text, a.big_gb)
        size = text.stat().st_size
        print(f'\n== token shards: {gb(size)} of text ({text}), written in {time.perf_counter() - t0:.0f} s; {os.cpu_count()} CPU cores')
        rows, corpus = [], None
        for w in (1, 2):
            d = root / f'tokens-{w}'
            if d.exists(): shutil.rmtree(d)
            t0 = time.perf_counter()
            c = prepare_tokens(text, a.big_tokenizer, d, workers=w, vocab_size=8192, sample_mb=16, progress=False)
            dt = time.perf_counter() - t0
            rows.append((w, dt, size / 1e6 / dt, c))
            out[f'prepare_{w}_mb_s'] = size / 1e6 / dt
            print(f'prepare, {w} process{"es" if w > 1 else ""}: {dt:7.1f} s, {size / 1e6 / dt:6.1f} MB/s of text, '
                  f'{c.num_tokens("train"):,} train + {c.num_tokens("validation"):,} validation tokens, '
                  f'{sum(len(s["shards"]) for s in c.manifest["splits"].values())} shards of {c.manifest["dtype"]}')
            corpus = c
        same = all(open(f1, 'rb').read() == open(f2, 'rb').read() for (f1, _), (f2, _) in zip(rows[0][3].shards(), rows[1][3].shards()))
        print(f'1 and 2 processes wrote the same shards: {same}; speed-up {rows[0][1] / rows[1][1]:.2f}x')
        if len(rows) > 1 and w > 1: shutil.rmtree(rows[0][3].path)  # keep one copy
        seq, bs = a.seq_len, 16
        ds = corpus.dataset('train', seq)
        loader = DataLoader(ds, batch_size=bs, shuffle=True, num_workers=0, generator=torch.Generator().manual_seed(0))
        it, n = iter(loader), 300
        next(it)
        t0 = time.perf_counter()
        for _ in range(n): next(it)
        data_tps = n * bs * seq / (time.perf_counter() - t0)
        torch.manual_seed(0)
        model = get_reference('gpt', 'small', vocab_size=corpus.vocab_size, max_seq_len=seq)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        batch = next(iter(DataLoader(ds, batch_size=8, shuffle=True)))
        def step():
            logits = model(input_ids=batch['input_ids'])
            logits = logits.logits if hasattr(logits, 'logits') else logits['logits'] if isinstance(logits, dict) else logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch['labels'][:, 1:].flatten())
            loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
        step()
        t0 = time.perf_counter(); steps = 3
        for _ in range(steps): step()
        train_tps = steps * 8 * seq / (time.perf_counter() - t0)
        out['data_vs_train'] = data_tps / train_tps
        print(f'windows through a DataLoader (1 process, batch {bs} x {seq}): {data_tps:12,.0f} tokens/s')
        print(f'reference GPT small training on this CPU (batch 8 x {seq}):   {train_tps:12,.0f} tokens/s')
        print(f'target data / training >= 5x: {data_tps / train_tps:.0f}x -- {"met" if data_tps / train_tps >= 5 else "NOT met"}')
        del model, opt

        # RSS of a read loop over many windows: os.pread (TokenWindows) against one np.memmap kept open per shard
        class MemmapWindows(TokenWindows):
            def window(self, i):
                k = int(np.searchsorted(self.starts, i, side='right')) - 1
                if not hasattr(self, '_maps'): self._maps = {}
                m = self._maps.get(k)
                if m is None: m = self._maps[k] = np.memmap(self.files[k], dtype=self.dtype, mode='r')
                j = int(i - self.starts[k]) * self.seq_len
                return np.asarray(m[j:j + self.span], dtype=np.int64)
        files = corpus.shards('train')
        reads = min(len(ds), 600_000)
        order = np.random.default_rng(0).permutation(len(ds))[:reads]
        res = {}
        for name, cls in (('os.pread (TokenWindows)', TokenWindows), ('np.memmap kept open', MemmapWindows)):
            w = cls([f for f, _ in files], [t for _, t in files], corpus.dtype, seq)
            marks, base, t0 = [], rss(), time.perf_counter()
            for j, i in enumerate(order.tolist()):
                w[i]
                if j in (0, reads // 2, reads - 1): marks.append(rss() - base)
            res[name] = marks
            print(f'read loop, {reads:,} random windows of {seq}, {name:<24}: RSS above start {" / ".join(gb(m) for m in marks)} '
                  f'(start / middle / end), {reads / (time.perf_counter() - t0):,.0f} windows/s')
            del w
        peak = max(res['os.pread (TokenWindows)'])
        out['read_loop_rss_gb'] = peak / 2**30
        print(f'target read-loop RSS growth < 1.5 GB and flat: {gb(peak)} -- {"met" if peak < 1.5 * 2**30 else "NOT met"}; '
              f'a kept-open memmap grew by {gb(max(res["np.memmap kept open"]))} of the {gb(corpus.nbytes)} of shards')
        if a.big_steps > 0: out.update(train_run(a, corpus, seq))
        table = [('prepare, 1 process (MB/s of text)', f"{out['prepare_1_mb_s']:.1f}", '-'),
                 ('prepare, 2 processes (MB/s of text)', f"{out['prepare_2_mb_s']:.1f}", '-'),
                 ('window reads / GPT small training (tokens/s)', f"{out['data_vs_train']:.0f}x", '>= 5x'),
                 ('read loop RSS growth, os.pread', gb(peak), '< 1.5 GB, flat'),
                 ('read loop RSS growth, kept-open memmap', gb(max(res['np.memmap kept open'])), '(for comparison)')]
        if 'train_rss_growth_gb' in out: table.append(('nbtrain training run RSS growth', f"{out['train_rss_growth_gb']:.2f} GB", 'flat'))
        print(f"\n{'token shards, ' + gb(size) + ' of text':<48} {'measured':>10}  target")
        for name, v, goal in table: print(f'{name:<48} {v:>10}  {goal}')
    finally:
        if own: shutil.rmtree(root, ignore_errors=True)
    return out

def train_run(a, corpus, seq) -> dict:
    "A short nbtrain training run of the reference GPT (size small) on the windows of the corpus, its RSS at each step."
    from nbtrain.callbacks import Callback
    from nbtrain.data import DataBundle
    from nbtrain.processing import collate_stack
    from nbtrain.trainer import train
    marks = []
    class RSS(Callback):
        def on_step_end(self, trainer): marks.append(rss())
    bundle = DataBundle(corpus.dataset('train', seq), corpus.dataset('validation', seq), collate_stack, corpus.tokenizer,
                        corpus.vocab_size, info={'source': str(corpus.path)})
    with tempfile.TemporaryDirectory() as runs:
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter('ignore')
                res = train(preset='tiny-cpu', data=bundle, callbacks=[RSS()], overrides={
                    'model.size': 'small', 'data.seq_len': seq, 'train.max_steps': a.big_steps, 'train.micro_batch_size': 8,
                    'train.eval_every': a.big_steps, 'train.eval_batches': 1, 'train.log_every': 10,
                    'checkpoint.every_steps': a.big_steps, 'output_dir': runs})
        except Exception as e:
            print(f'nbtrain training run FAILED: {type(e).__name__}: {str(e)[:300]}')
            return {}
        dt = time.perf_counter() - t0
    if not marks: return {}
    m = [marks[0], marks[len(marks) // 2], marks[-1]]
    print(f'nbtrain training run, GPT small, {res.step} steps of 8 x {seq} in {dt:.0f} s: RSS {" / ".join(gb(x) for x in m)} '
          f'(first / middle / last step), growth {gb(max(marks) - marks[0])}')
    return {'train_rss_growth_gb': (max(marks) - marks[0]) / 2**30}

if __name__ == '__main__':
    main(sys.argv[1:])
