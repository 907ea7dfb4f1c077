"""Memory, step time and checkpoint size of LoRA fine-tuning through nbtrain, against full fine-tuning and against peft
in a plain PyTorch loop.

One GPT-2-shaped model (`transformers.GPT2LMHeadModel` built from a `GPT2Config`, random weights, written with
`save_pretrained` into a temporary folder: nothing is downloaded), loaded by nbtrain as `model.name hf`,
`model.path <folder>`. Every arm trains it on the same batches (random token ids in nbtrain's loader order), for the
same number of optimizer steps, each in its own process so that each peak starts from a clean allocator:

  full     nbtrain, every weight trains
  lora     nbtrain with `lora.enabled` (r 8, alpha 16, dropout 0.05, `lora.target_modules auto`): the frozen base in
           the compute dtype, fp32 adapters, an optimizer over the adapters only
  qlora    as lora with `lora.quantize 4bit` (CUDA only: bitsandbytes quantizes on the GPU; on CPU one line says so)
  peft     the same adapters put in with `peft.get_peft_model` (the layers nbtrain's `auto` picks, named), the same
           dtype rules, and a hand-written loop: AdamW over the trainable parameters with nbtrain's lr, betas, weight
           decay and schedule, clip 1.0, loss read back every `--log-every` steps

Reported per arm: trainable parameters, peak memory (CUDA: `torch.cuda.max_memory_allocated` over the arm; CPU: the
process's peak resident memory above what it held before the model was loaded, allocator caches included), the step
time (median over `--rounds` rounds; CUDA synchronised at the clock), and the loss of the last window (a check that
the arms train alike). Targets: nbtrain's LoRA step time / the peft loop <= 1.05, and a LoRA checkpoint (the step
folder under run_dir/checkpoints/) < 5% of the full fine-tuning one.

Without a CUDA GPU it runs scaled down (a 4-layer, 256-wide model, batch 8 x 128 tokens, fp32) and says so on its
first line; `--quick` is a smoke test (2 layers, 128 wide, batch 4 x 64, 3 steps, one round) that runs in under a minute
on two CPU cores.

    python benchmarks/lora.py [--quick] [--layers 12] [--d-model 768] [--vocab 50257] [--batch 8] [--seq-len 512]
                              [--steps 30] [--warmup 5] [--rounds 3] [--r 8] [--threads N] [--arms full,lora,qlora,peft]
"""
import argparse, json, math, os, resource, statistics, subprocess, sys, tempfile, time, warnings
from pathlib import Path
import torch
import torch.nn.functional as F

ARMS = ('full', 'lora', 'qlora', 'peft')
NAMES = dict(full='full fine-tuning (nbtrain)', lora='LoRA (nbtrain)', qlora='QLoRA 4-bit (nbtrain)', peft='LoRA (peft + plain loop)')
LR, WD, BETAS, CLIP, SEED = 2e-4, 0.0, (0.9, 0.999), 1.0, 0
ALPHA, DROPOUT = 16, 0.05
TARGET_SPEED, TARGET_CKPT = 1.05, 0.05

def sizes(a, cuda:bool) -> dict:
    "The model and batch shape: the arguments given, else the GPU defaults (GPT-2 small) or the scaled-down CPU ones."
    if a.quick: d = dict(layers=2, d_model=128, heads=4, vocab=4096, batch=4, seq_len=64, steps=3, warmup=1, rounds=1, log_every=1)
    elif cuda: d = dict(layers=12, d_model=768, heads=12, vocab=50257, batch=8, seq_len=512, steps=30, warmup=5, rounds=3, log_every=10)
    else: d = dict(layers=4, d_model=256, heads=4, vocab=4096, batch=8, seq_len=128, steps=10, warmup=2, rounds=3, log_every=5)
    return {k: getattr(a, k) if getattr(a, k, None) is not None else v for k, v in d.items()}

# --- what every arm shares ---------------------------------------------------------------------------------------------

def rss() -> int:
    "Resident memory of this process now (bytes)."
    try: return int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
    except OSError: return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

def peak_rss() -> int: return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == 'darwin' else 1024)

class Clock:
    "Wall clock at the end of every optimizer step (CUDA synchronised); the step time is the median after `warmup` steps."
    def __init__(self, warmup:int, total:int, cuda:bool): self.warmup, self.total, self.cuda, self.t = warmup, total, cuda, {}
    def step(self, n:int):
        if self.cuda: torch.cuda.synchronize()
        self.t[n] = time.perf_counter()
    def per_step(self) -> float:
        d = [self.t[n] - self.t[n - 1] for n in range(self.warmup + 1, self.total + 1) if n in self.t and n - 1 in self.t]
        if not d: raise RuntimeError(f"the clock saw steps {sorted(self.t)}, not {self.warmup} to {self.total}")
        return statistics.median(d)  # a median: a burst of load from elsewhere on the machine moves it least

def state_bytes(model, optimizer) -> int:
    "Bytes of the weights, their gradients (one per trainable weight, in its dtype) and the optimizer's state."
    ps = {id(p): p for p in model.parameters()}.values()
    n = sum(p.numel() * p.element_size() * (2 if p.requires_grad else 1) for p in ps)
    st = getattr(optimizer, 'optimizer', optimizer).state
    return n + sum(t.numel() * t.element_size() for v in st.values() for t in v.values() if isinstance(t, torch.Tensor))

def bundle(s:dict):
    "Random token ids, exactly one epoch of the run: nbtrain's DataBundle, and the loader nbtrain's trainer builds from it."
    from nbtrain.data import DataBundle, collate_stack
    from nbtrain.processing import DictDataset
    g = torch.Generator().manual_seed(SEED)
    ids = torch.randint(0, s['vocab'], (s['batch'] * (s['warmup'] + s['steps']), s['seq_len']), generator=g)
    return DataBundle(DictDataset(input_ids=ids, labels=ids), None, collate_stack, None, s['vocab'], None,
                      dict(source='random token ids', seq_len=s['seq_len']))

def lr_at(step:int, warmup:int, total:int) -> float:
    "nbtrain's schedule, written out: linear warmup, then cosine to 0."
    if step < warmup: return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

def folder_bytes(p:Path) -> int: return sum(f.stat().st_size for f in p.rglob('*') if f.is_file())

# --- the arms (each in its own process) ------------------------------------------------------------------------------

def arm_nbtrain(a, s:dict, cuda:bool) -> dict:
    from nbtrain.callbacks import Callback
    from nbtrain.trainer import Trainer
    from nbtrain.config import load_config
    total = s['warmup'] + s['steps']
    data = bundle(s)
    class StepClock(Callback):
        critical = True  # a failing clock must fail the arm
        loss = peak = state = None
        def __init__(self, clock): self.clock = clock
        def on_step_end(self, trainer):
            self.clock.step(trainer.step)
            if trainer.step == total:  # training's peak, not that of the end's checkpoint
                self.peak = torch.cuda.max_memory_allocated() if cuda else peak_rss()
                self.state = state_bytes(trainer.raw_model, trainer.optimizer)
        def on_log(self, trainer, metrics):
            if trainer.step % s['log_every'] == 0: self.loss = metrics['loss']
    over = {'model.name': 'hf', 'model.path': a.model_dir, 'data.seq_len': s['seq_len'],
            'optim.lr': LR, 'optim.weight_decay': WD, 'optim.beta1': BETAS[0], 'optim.beta2': BETAS[1],
            'schedule.name': 'cosine', 'schedule.warmup_steps': s['warmup'], 'schedule.min_lr_ratio': 0.0,
            'train.seed': SEED, 'train.micro_batch_size': s['batch'], 'train.grad_accum': 1, 'train.max_steps': total,
            'train.eval_every': None, 'train.eval_at_start': False, 'train.log_every': s['log_every'], 'train.grad_clip': CLIP,
            'train.accelerator': 'cuda' if cuda else 'cpu', 'train.precision': 'bf16-mixed' if cuda else '32-true',
            'train.compile': False, 'train.progress_bar': False, 'monitor.every_steps': None, 'tracking.dashboard': False,
            'checkpoint.every_minutes': None, 'checkpoint.every_steps': None, 'checkpoint.at_end': True,
            'checkpoint.save_final': False, 'checkpoint.resume': 'never', 'output_dir': os.path.join(a.out, a.arm),
            'lora.enabled': a.arm != 'full'}
    if a.arm != 'full': over.update({'lora.r': s['r'], 'lora.alpha': ALPHA, 'lora.dropout': DROPOUT, 'lora.target_modules': 'auto'})
    if a.arm == 'qlora': over['lora.quantize'] = '4bit'
    cfg = load_config(preset='tiny-cpu', overrides=over)
    if cuda: torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else rss()
    sc = StepClock(Clock(s['warmup'], total, cuda))
    tr = Trainer(cfg, data=data, callbacks=[sc])
    res = tr.fit()
    peak = sc.peak - base
    ck = sorted((Path(res.run_dir) / 'checkpoints').glob('step-*'))
    e = tr.memory_estimate
    return dict(peak=peak, s=sc.clock.per_step(), loss=sc.loss, trainable=sum(p.numel() for p in tr.raw_model.parameters() if p.requires_grad),
                state=sc.state, estimate=(e.weights_gb + e.grads_gb + e.optimizer_gb) * 2**30,
                ckpt=folder_bytes(ck[-1]) if ck else None, ckpt_name=ck[-1].name if ck else None)

def arm_peft(a, s:dict, cuda:bool) -> dict:
    import peft, transformers
    dev = torch.device('cuda' if cuda else 'cpu')
    total = s['warmup'] + s['steps']
    data = bundle(s)
    from nbtrain.data import make_loader
    loader = make_loader(data.train, s['batch'], shuffle=True, seed=SEED, collate=data.collate, pin_memory=cuda)  # nbtrain's batches
    if cuda: torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else rss()
    torch.manual_seed(SEED)
    model = transformers.GPT2LMHeadModel.from_pretrained(a.model_dir, dtype=torch.bfloat16 if cuda else torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # Conv1D: peft sets fan_in_fan_out itself and says so
        model = peft.get_peft_model(model, peft.LoraConfig(r=s['r'], lora_alpha=ALPHA, lora_dropout=DROPOUT,
                                                           target_modules=['c_attn', 'c_fc', 'c_proj']))
    for p in model.parameters():  # adapters in fp32 whatever the base is held in
        if p.requires_grad: p.data = p.data.float()
    model.to(dev).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, betas=BETAS, weight_decay=WD, fused=cuda)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lr_at(i, s['warmup'], total))
    clock, N, window, last = Clock(s['warmup'], total, cuda), s['log_every'], 0., None
    for step, batch in enumerate(loader, 1):
        x = batch['input_ids'].to(dev, non_blocking=True)
        y = batch['labels'].to(dev, non_blocking=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
            logits = model(input_ids=x).logits
        targets = F.pad(y[:, 1:], (0, 1), value=-100)  # the target of position t is token t+1
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step(); opt.zero_grad(set_to_none=True); sched.step()
        window = window + loss.detach()
        clock.step(step)
        if step % N == 0: last, window = window.item() / N, 0.
        if step == total: break
    peak = (torch.cuda.max_memory_allocated() if cuda else peak_rss()) - base
    state = state_bytes(model, opt)
    out = Path(a.out) / 'peft-adapter'
    model.save_pretrained(str(out))  # peft's own adapter folder, for reference
    return dict(peak=peak, s=clock.per_step(), loss=last, trainable=sum(p.numel() for p in params), ckpt=None, state=state,
                adapter=folder_bytes(out))

def child(a) -> None:
    cuda = torch.cuda.is_available()
    s = json.loads(a.sizes)
    if s.get('threads'): torch.set_num_threads(s['threads'])
    warnings.simplefilter('ignore')
    # every arm imports what any arm imports before its memory is read, so that imports are not counted as training's
    import lightning_fabric, peft, safetensors.torch, transformers.models.gpt2.modeling_gpt2, nbtrain.trainer  # noqa: F401
    r = arm_peft(a, s, cuda) if a.arm == 'peft' else arm_nbtrain(a, s, cuda)
    print(json.dumps(dict(r, arm=a.arm, device='cuda' if cuda else 'cpu')))

# --- the parent: runs the arms, prints the report ---------------------------------------------------------------------

def run_arm(a, arm:str, s:dict, out:str) -> dict:
    cmd = [sys.executable, __file__, '--arm', arm, '--model-dir', a.model_dir, '--out', os.path.join(out, f'{arm}-{time.monotonic_ns()}'),
           '--sizes', json.dumps(s)]
    env = {**os.environ, 'TRANSFORMERS_VERBOSITY': 'error', 'HF_HUB_OFFLINE': '1', 'PYTHONWARNINGS': 'ignore'}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = next((l for l in reversed(r.stdout.splitlines()) if l.startswith('{')), None)
    if r.returncode or line is None: return dict(arm=arm, error=(r.stderr or r.stdout).strip().splitlines()[-1:] or ['no output'],
                                                 log=(r.stdout + r.stderr)[-3000:])
    return json.loads(line)

def fmt_bytes(n) -> str:
    if n is None: return '-'
    for unit, k in (('GB', 2**30), ('MB', 2**20), ('KB', 2**10)):
        if abs(n) >= k: return f"{n / k:.1f} {unit}"
    return f"{n} B"

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--quick', action='store_true', help='a smoke test: tiny model, 3 steps, one round (under a minute on 2 CPU cores)')
    for k in ('layers', 'd-model', 'heads', 'vocab', 'batch', 'seq-len', 'steps', 'warmup', 'rounds', 'log-every'):
        p.add_argument(f'--{k}', type=int, default=None)
    p.add_argument('--r', type=int, default=8, help='LoRA rank')
    p.add_argument('--threads', type=int, default=None, help="torch's CPU threads in every arm (default: torch's own choice)")
    p.add_argument('--arms', default=','.join(ARMS))
    p.add_argument('--arm', help=argparse.SUPPRESS)
    p.add_argument('--model-dir', help=argparse.SUPPRESS)
    p.add_argument('--out', help=argparse.SUPPRESS)
    p.add_argument('--sizes', help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.arm: return child(a) or 0
    arms = [x.strip() for x in a.arms.split(',') if x.strip()]
    if bad := [x for x in arms if x not in ARMS]: p.error(f"unknown {', '.join(bad)}: the arms are {', '.join(ARMS)}")
    cuda = torch.cuda.is_available()
    s = dict(sizes(a, cuda), r=a.r, threads=a.threads)
    if a.threads: torch.set_num_threads(a.threads)
    import importlib.util, transformers, peft
    has_bnb = cuda and importlib.util.find_spec('bitsandbytes') is not None
    transformers.utils.logging.set_verbosity_error(); transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = transformers.GPT2Config(vocab_size=s['vocab'], n_positions=max(1024, s['seq_len']), n_embd=s['d_model'],
                                      n_layer=s['layers'], n_head=s['heads'], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                      use_cache=False, bos_token_id=s['vocab'] - 1, eos_token_id=s['vocab'] - 1)
        torch.manual_seed(SEED)
        model = transformers.GPT2LMHeadModel(cfg)
        n_params = sum(p.numel() for p in model.parameters())
        a.model_dir = os.path.join(tmp, 'gpt2-random')
        model.save_pretrained(a.model_dir); del model
        where = (f"GPU {torch.cuda.get_device_name(0)}: bf16-mixed" if cuda else
                 f"CPU RUN, NO GPU: scaled-down check, {'--quick smoke test, ' if a.quick else ''}fp32, {torch.get_num_threads()} threads")
        print(f"{where} -- GPT-2-shaped model ({s['layers']} layers, d_model {s['d_model']}, vocabulary {s['vocab']:,}, "
              f"{n_params / 1e6:.1f}M parameters, random weights), batch {s['batch']} x {s['seq_len']} tokens, "
              f"{s['steps']} timed steps after {s['warmup']}, {s['rounds']} round{'s' * (s['rounds'] > 1)}, LoRA r {s['r']} "
              f"alpha {ALPHA} dropout {DROPOUT}; torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}",
              flush=True)
        runs = {x: [] for x in arms}
        for rnd in range(s['rounds']):  # alternating, and each round in a rotated order, so that machine noise hits the arms alike
            for arm in arms[rnd % len(arms):] + arms[:rnd % len(arms)]:
                if arm == 'qlora' and not has_bnb: continue
                runs[arm].append(run_arm(a, arm, s, tmp))
                r = runs[arm][-1]
                print(f"  round {rnd + 1} {arm}: " + (f"{r['s'] * 1e3:.1f} ms/step" if 'error' not in r else 'FAILED'), file=sys.stderr, flush=True)
    res, failed = {}, []
    for arm, rs in runs.items():
        ok = [r for r in rs if 'error' not in r]
        if len(ok) < len(rs): failed.append((arm, next(r for r in rs if 'error' in r)))
        if ok: res[arm] = dict(ok[-1], s=statistics.median(r['s'] for r in ok), peak=max(r['peak'] for r in ok))
    mem_kind = 'peak GPU memory' if cuda else 'peak RSS rise'
    print(f"{'arm':<27} {'trainable':>11} {'weights+grads+optimizer':>24} {'(estimate)':>11} {mem_kind:>15} {'step time':>11} {'vs peft':>8} {'loss':>7}")
    peer = res.get('peft')
    for arm in arms:
        if arm == 'qlora' and not has_bnb:
            print(f"{NAMES[arm]:<27} skipped: " + ("bitsandbytes is not installed (pip install 'nbtrain[qlora]')" if cuda else
                                                   "bitsandbytes quantizes on a CUDA GPU, and this run has none")); continue
        if arm not in res: print(f"{NAMES[arm]:<27} FAILED"); continue
        r = res[arm]
        vs = f"{r['s'] / peer['s']:.3f}x" if peer and arm != 'peft' else ('1.000x' if arm == 'peft' else '-')
        loss = f"{r['loss']:.3f}" if r.get('loss') is not None else '-'
        est = f"({fmt_bytes(r['estimate'])})" if r.get('estimate') else '-'
        print(f"{NAMES[arm]:<27} {r['trainable']:>11,} {fmt_bytes(r['state']):>24} {est:>11} {fmt_bytes(r['peak']):>15} {r['s'] * 1e3:>8.1f} ms {vs:>8} {loss:>7}")
    full, lora = res.get('full'), res.get('lora')
    if full and lora: print(f"LoRA / full fine-tuning: weights+grads+optimizer {lora['state'] / full['state']:.3f}, {mem_kind} "
                            f"{lora['peak'] / full['peak']:.3f}, step time {lora['s'] / full['s']:.3f}"
                            + ('' if cuda else ' (CPU, fp32: the frozen base is as big as the trained one; the peak is mostly activations)'))
    cpu_note = '' if cuda else ' (CPU check run: the target is for the GPU run)'
    if lora and peer:
        x = lora['s'] / peer['s']
        print(f"target nbtrain LoRA step time / peft plain loop <= {TARGET_SPEED}: {x:.3f} -- {'met' if x <= TARGET_SPEED else 'NOT met'}{cpu_note}")
        if lora['trainable'] != peer['trainable']: print(f"note: trainable parameters differ: nbtrain {lora['trainable']:,}, peft {peer['trainable']:,}")
    else: print(f"target nbtrain LoRA step time / peft plain loop <= {TARGET_SPEED}: n/a (an arm failed or was not run)")
    if full and lora and full.get('ckpt') and lora.get('ckpt'):
        x = lora['ckpt'] / full['ckpt']
        print(f"checkpoint ({lora['ckpt_name']}): full fine-tuning {fmt_bytes(full['ckpt'])}, LoRA {fmt_bytes(lora['ckpt'])} (weights, "
              f"optimizer and trainer state)" + (f"; peft's adapter folder {fmt_bytes(peer['adapter'])}" if peer and peer.get('adapter') else ''))
        print(f"target LoRA checkpoint / full < {TARGET_CKPT:.0%}: {x:.2%} -- {'met' if x < TARGET_CKPT else 'NOT met'}")
    else: print(f"target LoRA checkpoint / full < {TARGET_CKPT:.0%}: n/a (an arm failed or was not run)")
    for arm, r in failed:
        print(f"{arm} FAILED: {' '.join(r['error'])}", file=sys.stderr)
        print(r['log'], file=sys.stderr)
    return 1 if failed else 0

if __name__ == '__main__': sys.exit(main())
