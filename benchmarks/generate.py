"""Tokens per second of `nbtrain.generate` on the reference GPT with its KV cache and without it, and of a Hugging Face
GPT-2 of the same shape decoding with its own cache, measured in the same run on the same machine.

The model is nbtrain's reference GPT at its `small` size (6 layers, 6 heads, d_model 384, max_seq_len 256) with random
weights and a byte-level vocabulary (260 ids); the prompt is `--prompt-tokens` random bytes. Every arm decodes greedily
with `generate(..., temperature=0)` through the same code (tokenizer, text assembly, stop checks), one prompt at a time:

  cache      `generate(model, ...)`: the prompt in one forward pass, then one position per token (`nbtrain.models.KVCache`)
  no cache   `generate(model, ..., use_cache=False)`: every token runs the model on the whole text so far (the sliding
             window any `model.py` export gets), which is what the cache saves
  hf         `transformers.GPT2LMHeadModel` with the same layers, width, heads and vocabulary (random weights, built from a
             config: nothing is downloaded), through `generate`, which runs its own `generate` and KV cache

The end-of-text token is switched off, so every arm writes exactly `--new-tokens` tokens; the cache and no-cache arms
must write the same ones (a check that the cache changes nothing but the speed). Each arm runs `--rounds` times after
one warm-up generation, the rounds alternating between arms; tokens/s is the median. The speed-up of the cache grows
with the length of the text (without it, token n costs n positions): prompt plus new tokens default to the model's 256.

Without a CUDA GPU it runs on the CPU and says so on its first line; `--quick` is a smoke test (the `tiny` size, a short
text, one round) that runs in seconds.

    python benchmarks/generate.py [--quick] [--size small] [--prompt-tokens 32] [--new-tokens 224] [--rounds 3]
                                  [--threads N] [--arms cache,nocache,hf] [--device cpu|cuda]
"""
import argparse, statistics, sys, time
import torch

ARMS = ('cache', 'nocache', 'hf')
NAMES = {'cache': 'nbtrain GPT, KV cache', 'nocache': 'nbtrain GPT, no cache', 'hf': 'transformers GPT-2, its own cache'}
SEED = 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--quick', action='store_true', help='a smoke test: the tiny size, 8 + 24 tokens, one round')
    p.add_argument('--size', default=None, help="reference GPT size preset (default small; tiny with --quick)")
    p.add_argument('--prompt-tokens', type=int, default=None)
    p.add_argument('--new-tokens', type=int, default=None)
    p.add_argument('--rounds', type=int, default=None)
    p.add_argument('--threads', type=int, default=None, help="torch's CPU threads (default: torch's own choice)")
    p.add_argument('--arms', default=','.join(ARMS))
    p.add_argument('--device', choices=['cpu', 'cuda'], default=None, help='default: cuda when there is a GPU')
    a = p.parse_args(argv)
    arms = [x.strip() for x in a.arms.split(',') if x.strip()]
    if bad := [x for x in arms if x not in ARMS]: p.error(f"unknown {', '.join(bad)}: the arms are {', '.join(ARMS)}")
    size = a.size or ('tiny' if a.quick else 'small')
    n_prompt = a.prompt_tokens or (8 if a.quick else 32)
    n_new = a.new_tokens or (24 if a.quick else 224)
    rounds = a.rounds or (1 if a.quick else 3)
    if a.threads: torch.set_num_threads(a.threads)
    device = torch.device(a.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    if device.type == 'cuda' and not torch.cuda.is_available(): p.error('--device cuda: torch sees no GPU')

    from nbtrain.generate import generate
    from nbtrain.models import GPT, SIZES
    from nbtrain.tokenizer import ByteTokenizer

    class Bytes(ByteTokenizer):
        eos_id = None  # no end-of-text: every arm writes exactly n_new tokens

    tok = Bytes()
    torch.manual_seed(SEED)
    gpt = GPT(size=size, vocab_size=tok.vocab_size).to(device).eval()
    c = gpt.config
    if n_prompt + n_new > c.max_seq_len:
        print(f"note: {n_prompt} + {n_new} tokens pass max_seq_len {c.max_seq_len}: past it the cache gives way to the sliding window",
              file=sys.stderr)
    prompt = tok.decode(torch.randint(len(tok.specials) + 32, len(tok.specials) + 127, (n_prompt,), generator=torch.Generator().manual_seed(SEED)).tolist())
    models = {'cache': gpt, 'nocache': gpt}
    if 'hf' in arms:
        import transformers
        transformers.utils.logging.set_verbosity_error()
        cfg = transformers.GPT2Config(vocab_size=c.vocab_size, n_positions=c.max_seq_len, n_embd=c.d_model, n_layer=c.n_layer,
                                      n_head=c.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=None,
                                      pad_token_id=0)
        torch.manual_seed(SEED)
        models['hf'] = transformers.GPT2LMHeadModel(cfg).to(device).eval()
        models['hf'].generation_config.eos_token_id = None

    def run(arm: str, n: int) -> tuple[float, str]:
        if device.type == 'cuda': torch.cuda.synchronize()
        t0 = time.perf_counter()
        text = generate(models[arm], prompt, tokenizer=tok, max_new_tokens=n, temperature=0, use_cache=arm != 'nocache')[0]
        if device.type == 'cuda': torch.cuda.synchronize()
        return time.perf_counter() - t0, text

    where = (f"GPU {torch.cuda.get_device_name(device)}" if device.type == 'cuda' else
             f"CPU RUN, NO GPU: {'--quick smoke test, ' if a.quick else ''}{torch.get_num_threads()} threads")
    n_params = sum(q.numel() for q in gpt.parameters())
    print(f"{where} -- reference GPT '{size}' ({c.n_layer} layers, {c.n_head} heads, d_model {c.d_model}, {n_params / 1e6:.1f}M "
          f"parameters, random weights, vocabulary {c.vocab_size}, max_seq_len {c.max_seq_len}), fp32, prompt {n_prompt} tokens, "
          f"{n_new} new tokens, greedy, one prompt at a time, median of {rounds} round{'s' * (rounds > 1)}; torch {torch.__version__}",
          flush=True)
    times, texts, failed = {x: [] for x in arms}, {}, {}
    for arm in arms:  # warm-up: kernels, allocator, the first call's imports
        try: run(arm, min(4, n_new))
        except Exception as e: failed[arm] = f"{type(e).__name__}: {e}"
    for rnd in range(rounds):
        order = [x for x in arms if x not in failed]
        for arm in order[rnd % max(len(order), 1):] + order[:rnd % max(len(order), 1)]:
            try:
                s, texts[arm] = run(arm, n_new)
                times[arm].append(s)
                print(f"  round {rnd + 1} {arm}: {n_new / s:,.1f} tokens/s", file=sys.stderr, flush=True)
            except Exception as e: failed[arm] = f"{type(e).__name__}: {e}"
    tps = {arm: n_new / statistics.median(ts) for arm, ts in times.items() if ts and arm not in failed}
    base = tps.get('nocache')
    print(f"{'arm':<34} {'tokens/s':>10} {'ms/token':>9} {'vs no cache':>12}")
    for arm in arms:
        if arm not in tps: print(f"{NAMES[arm]:<34} FAILED"); continue
        vs = f"{tps[arm] / base:.2f}x" if base else '-'
        print(f"{NAMES[arm]:<34} {tps[arm]:>10,.1f} {1e3 / tps[arm]:>9.2f} {vs:>12}")
    if 'cache' in texts and 'nocache' in texts:
        same = texts['cache'] == texts['nocache']
        print(f"same tokens with and without the cache: {'yes' if same else 'NO'}")
        if not same: failed['check'] = 'the cache changed the greedy tokens'
    if 'cache' in tps and base:
        print(f"KV-cache speed-up (tokens/s with / without, {n_prompt} + {n_new} tokens): {tps['cache'] / base:.2f}x")
    if 'cache' in tps and 'hf' in tps:
        print(f"nbtrain GPT with its cache / transformers GPT-2 with its cache: {tps['cache'] / tps['hf']:.2f}x")
    for arm, why in failed.items(): print(f"{arm} FAILED: {why}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == '__main__': sys.exit(main())
