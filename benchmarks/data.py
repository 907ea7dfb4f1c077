"""Data pipeline speed: nbtrain against the obvious alternatives, measured in the same run.

1. Tokenizing a corpus: the character tokenizer's vectorised `encode_flat` against a per-text Python loop, and the BPE's
   batch encoding against Hugging Face `datasets.map(batched=True)` with the same `tokenizers` tokenizer.
2. The token cache: building the data a second time (ids and BPE from the cache) against the first time.
3. Resuming mid-epoch: the first batch after `set_epoch(loader, epoch, skip)` against reading and dropping the skipped
   batches (what a loop without a resumable sampler does).
4. Masked-LM collation: `MLMCollator` against transformers' `DataCollatorForLanguageModeling`.

Prints one line per comparison with the ratio (> 1: nbtrain is faster).

    python benchmarks/data.py [--stories 5000] [--seq-len 256] [--skip 400] [--rounds 3]
"""
import argparse, os, statistics, sys, tempfile, time, warnings
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
    return ratios

if __name__ == '__main__':
    main(sys.argv[1:])
