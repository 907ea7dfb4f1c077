"""Training throughput of nbtrain on GPT-2 124M against a plain PyTorch loop, transformers.Trainer and Lightning.

Every arm trains a fresh Hugging Face `GPT2LMHeadModel` (SDPA attention, vocabulary 50304, dropout 0, built from a
`GPT2Config`: nothing is downloaded) from the same seed, on the same batches of random token ids in the same order,
for the same number of optimizer steps, in one process, eager and then compiled (`torch.compile`):

  plain      a careful hand-written loop: bf16 autocast, TF32, fused AdamW, clip 1.0, warmup + cosine schedule,
             pinned non-blocking copies, loss read back every `--log-every` steps; loss = cross-entropy on the logits
  nbtrain    `nbtrain.trainer.Trainer(cfg, model=hf_model, data=bundle)`, bf16-mixed, checkpoints, evaluation and the
             gradient monitor off (nothing but the loop is timed); compiled with `train.compile`
  hf         `transformers.Trainer` (bf16, tf32, optim adamw_torch_fused, logging every `--log-every` steps,
             `logging_nan_inf_filter=False` so it does not read the loss every step); compiled with `torch_compile=True`
  lightning  `lightning.Trainer` around a LightningModule wrapping the model (precision bf16-mixed, clip 1.0);
             compiled by passing `torch.compile(module)` to `fit` (Lightning compiles forward and training_step)
  gpt        nbtrain's own reference GPT (`nbtrain.models.GPT`, size gpt2-small, same shapes) with its fastest
             default config (the `a100` preset: bf16-mixed, compiled), run once

(hf and lightning use the model's own loss, `labels=`; plain and nbtrain compute it from the logits.) The `loss`
column, the mean training loss of the last full window of `--log-every` steps, checks that the arms train alike:
transformers divides the summed loss by B*T labels rather than the B*(T-1) real targets, so its value is (T-1)/T of
the others'; the reference GPT is another implementation (same shapes, its own initialisation).

Timing: a callback (or the loop itself) synchronises CUDA and reads the clock after the last warmup step and after the
last step; steps before that (compilation included) are not timed. Peak memory is `torch.cuda.max_memory_allocated`
over the whole arm; memory is freed and the peak statistics and the compiler caches are reset between arms.
MFU = tokens/s x (6N + 12 L d T) / peak FLOP/s (N: parameters without the position embeddings; peak from
`nbtrain.hardware.peak_flops`). Targets: nbtrain >= 0.98x the plain loop and ahead of transformers.Trainer and
Lightning (each mode); the reference GPT >= 45 % MFU on an H100.

Without a CUDA GPU it runs a scaled-down CPU version (a 2-layer, 128-wide GPT-2, vocabulary 1024, batch 4 x 64,
fp32, eager only unless --compile) that checks the arms run; its numbers say nothing about GPU throughput.

    python benchmarks/gpu_throughput.py [--size gpt2-small|cpu-tiny] [--steps 50] [--warmup 10] [--batch 16]
        [--seq-len 1024] [--arms plain,nbtrain,hf,lightning,gpt] [--no-compile | --compile] [--rounds 1]
        [--log-every 10] [--seed 1337] [--threads N]
"""
import argparse, dataclasses, gc, logging, math, os, statistics, sys, tempfile, time, traceback, warnings
import torch
import torch.nn.functional as F

SIZES = {  # model shape and the default run for each --size
    'gpt2-small': dict(n_layer=12, n_head=12, n_embd=768, vocab=50304, n_positions=1024, ref_size='gpt2-small',
                       batch=16, seq_len=1024, steps=50, warmup=10),
    'cpu-tiny':   dict(n_layer=2, n_head=4, n_embd=128, vocab=1024, n_positions=64, ref_size='tiny',
                       batch=4, seq_len=64, steps=8, warmup=2),
}
ARMS = ('plain', 'nbtrain', 'hf', 'lightning', 'gpt')
LABELS = dict(plain='plain loop', nbtrain='nbtrain', hf='transformers.Trainer', lightning='Lightning Trainer',
              gpt='nbtrain reference GPT')
ALIASES = dict(transformers='hf', pl='lightning', reference='gpt', torch='plain')
LR, WD, BETAS, EPS, CLIP = 6e-4, 0.1, (0.9, 0.95), 1e-8, 1.0
TARGET_PLAIN, TARGET_MFU = 0.98, 0.45

@dataclasses.dataclass
class Result:
    arm: str
    mode: str
    tok_s: float|None = None
    step_ms: float|None = None
    mfu: float|None = None
    peak_gb: float|None = None
    loss: float|None = None
    error: str|None = None

class Clock:
    "Wall clock after optimizer step `warmup` and after step `total`, with CUDA synchronised at both."
    def __init__(self, warmup:int, total:int, cuda:bool):
        self.warmup, self.total, self.cuda, self.t0, self.t1 = warmup, total, cuda, None, None
    def step(self, n:int):
        if n != self.warmup and n != self.total: return
        if self.cuda: torch.cuda.synchronize()
        t = time.perf_counter()
        if n == self.warmup: self.t0 = t
        if n == self.total: self.t1 = t
    def seconds(self) -> float:
        if self.t0 is None or self.t1 is None:
            raise RuntimeError(f"the timing hook did not see steps {self.warmup} and {self.total} (the arm ran fewer steps)")
        return self.t1 - self.t0

class OrderedSamples(torch.utils.data.Dataset):
    "The samples of `dataset` in a fixed order: read sequentially, transformers.Trainer gets nbtrain's batches."
    def __init__(self, dataset, order): self.dataset, self.order = dataset, list(order)
    def __len__(self): return len(self.order)
    def __getitem__(self, i): return self.dataset[self.order[i]]

class Bench:
    "What every arm shares: the model shape, the data, the device, the settings."
    def __init__(self, a, spec, cuda:bool, out:str):
        from nbtrain.data import DataBundle, make_loader, loader_sampler, collate_stack
        from nbtrain.processing import DictDataset
        from nbtrain.hardware import device_info, peak_flops
        self.a, self.spec, self.cuda, self.out = a, spec, cuda, out
        self.device = torch.device('cuda' if cuda else 'cpu')
        self.precision = 'bf16-mixed' if cuda else '32-true'
        self.total = a.warmup + a.steps
        self.tokens_per_step = a.batch * a.seq_len
        self.info = device_info()
        self.peak = peak_flops(self.info, self.precision)
        n = a.batch * self.total  # exactly one epoch: every arm sees each sample once
        g = torch.Generator().manual_seed(a.seed)
        ids = torch.randint(0, spec['vocab'], (n, a.seq_len), generator=g)
        self.bundle = DataBundle(DictDataset(input_ids=ids, labels=ids), None, collate_stack, None, spec['vocab'], None,
                                 dict(source='random token ids', seq_len=a.seq_len))
        self._make_loader = make_loader
        self.order = loader_sampler(self.loader())[0].order(0)  # nbtrain's order of epoch 0, for the arms that shuffle
        self.flops_per_token = self.n_params = None

    def loader(self):
        "The batches nbtrain's trainer sees: its loader recipe, seed and epoch 0 (pinned on CUDA)."
        return self._make_loader(self.bundle.train, self.a.batch, shuffle=True, seed=self.a.seed,
                                 collate=self.bundle.collate, pin_memory=self.cuda)

    def hf_config(self):
        from transformers import GPT2Config
        s = self.spec
        return GPT2Config(vocab_size=s['vocab'], n_positions=max(s['n_positions'], self.a.seq_len), n_embd=s['n_embd'],
                          n_layer=s['n_layer'], n_head=s['n_head'], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                          use_cache=False, bos_token_id=min(50256, s['vocab'] - 1), eos_token_id=min(50256, s['vocab'] - 1),
                          loss_type='ForCausalLM',
                          attn_implementation='sdpa')

    def new_model(self):
        "A fresh GPT2LMHeadModel on the CPU, initialised from the run's seed."
        from transformers import GPT2LMHeadModel
        torch.manual_seed(self.a.seed)
        m = GPT2LMHeadModel(self.hf_config())
        if m.config._attn_implementation != 'sdpa': raise RuntimeError(f"attention is {m.config._attn_implementation}, not sdpa")
        if self.flops_per_token is None:
            c = m.config
            self.n_params = sum(p.numel() for p in m.parameters()) - m.transformer.wpe.weight.numel()  # tied wte once
            self.flops_per_token = 6 * self.n_params + 12 * c.n_layer * c.n_embd * self.a.seq_len
        return m

    def lr_lambda(self, step:int) -> float:
        "Linear warmup then cosine to 0 (transformers' `cosine` schedule), for the hand-written arms."
        w = self.a.warmup
        if step < w: return step / max(1, w)
        return 0.5 * (1 + math.cos(math.pi * (step - w) / max(1, self.total - w)))

    def clock(self) -> Clock: return Clock(self.a.warmup, self.total, self.cuda)

    def result(self, arm:str, mode:str, clock:Clock, loss=None, flops_per_token=None) -> Result:
        s = clock.seconds()
        tok_s = self.tokens_per_step * self.a.steps / s
        fpt = flops_per_token or self.flops_per_token
        return Result(arm, mode, tok_s, s / self.a.steps * 1e3, tok_s * fpt / self.peak if self.peak else None,
                      torch.cuda.max_memory_allocated() / 2**30 if self.cuda else None, loss)

def free(cuda:bool):
    "Drop what the last arm left behind: garbage, compiled graphs, cached CUDA blocks, the peak-memory counter."
    gc.collect()
    torch._dynamo.reset()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

def decay_groups(model) -> list[dict]:
    "nanoGPT's split: weight decay on matrices (and embeddings), none on biases and norms."
    ps = [p for p in model.parameters() if p.requires_grad]
    return [dict(params=[p for p in ps if p.dim() >= 2], weight_decay=WD),
            dict(params=[p for p in ps if p.dim() < 2], weight_decay=0.0)]

# --- the arms ---------------------------------------------------------------------------------------------------------

def arm_plain(b:Bench, compiled:bool) -> Result:
    model = b.new_model().to(b.device)
    model.train()
    opt = torch.optim.AdamW(decay_groups(model), lr=LR, betas=BETAS, eps=EPS, fused=b.cuda)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, b.lr_lambda)
    fwd = torch.compile(model) if compiled else model
    clock, N, window, last = b.clock(), b.a.log_every, 0., None
    for step, batch in enumerate(b.loader(), 1):
        x = batch['input_ids'].to(b.device, non_blocking=True)
        y = batch['labels'].to(b.device, non_blocking=True)
        with torch.autocast('cuda', dtype=torch.bfloat16, enabled=b.cuda):
            logits = fwd(input_ids=x).logits
        targets = F.pad(y[:, 1:], (0, 1), value=-100)  # the target of position t is token t+1
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        window = window + loss.detach()
        clock.step(step)
        if step % N == 0: last, window = window.item() / N, 0.
    return b.result('plain', 'compiled' if compiled else 'eager', clock, last)

def nbtrain_config(b:Bench, compiled:bool):
    from nbtrain.config import load_config
    s = b.spec
    return load_config(preset='a100', overrides={  # the fastest preset; every timing-irrelevant extra off
        'model.name': 'gpt', 'model.size': s['ref_size'], 'model.max_seq_len': max(s['n_positions'], b.a.seq_len),
        'data.seq_len': b.a.seq_len,
        'optim.lr': LR, 'optim.weight_decay': WD, 'optim.beta1': BETAS[0], 'optim.beta2': BETAS[1], 'optim.eps': EPS,
        'schedule.name': 'cosine', 'schedule.warmup_steps': b.a.warmup, 'schedule.min_lr_ratio': 0.0,
        'train.seed': b.a.seed, 'train.micro_batch_size': b.a.batch, 'train.grad_accum': 1, 'train.max_steps': b.total,
        'train.eval_every': None, 'train.eval_at_start': False, 'train.log_every': b.a.log_every,
        'train.grad_clip': CLIP, 'train.precision': b.precision, 'train.compile': compiled, 'train.progress_bar': False,
        'checkpoint.every_minutes': None, 'checkpoint.every_steps': None, 'checkpoint.at_end': False,
        'checkpoint.save_final': False, 'checkpoint.resume': 'never',
        'monitor.every_steps': None, 'output_dir': os.path.join(b.out, 'nbtrain')})

def arm_nbtrain(b:Bench, compiled:bool, reference:bool=False) -> Result:
    from nbtrain.callbacks import Callback
    from nbtrain.trainer import Trainer
    class StepClock(Callback):
        critical = True  # a failing clock must fail the arm, not be disabled quietly
        loss = None
        def __init__(self, clock): self.clock = clock
        def on_step_end(self, trainer): self.clock.step(trainer.step)
        def on_log(self, trainer, metrics):  # the loss of each full window of log_every steps, as the other arms
            if trainer.step % b.a.log_every == 0: self.loss = metrics['loss']
    sc = StepClock(b.clock())
    tr = Trainer(nbtrain_config(b, compiled), model=None if reference else b.new_model(), data=b.bundle, callbacks=[sc])
    tr.fit()
    fpt = tr.raw_model.flops_per_token(b.a.seq_len) if reference else None
    return b.result('gpt' if reference else 'nbtrain', 'compiled' if compiled else 'eager', sc.clock, sc.loss, fpt)

def arm_gpt(b:Bench, compiled:bool) -> Result: return arm_nbtrain(b, compiled, reference=True)

def arm_hf(b:Bench, compiled:bool) -> Result:
    from transformers import Trainer as HFTrainer, TrainingArguments, TrainerCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    clock = b.clock()
    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs): clock.step(state.global_step)
    known = {f.name for f in dataclasses.fields(TrainingArguments)}
    extra = dict(train_sampling_strategy='sequential') if 'train_sampling_strategy' in known else {}  # else its shuffle
    args = TrainingArguments(**extra,
        output_dir=os.path.join(b.out, 'hf'), max_steps=b.total, per_device_train_batch_size=b.a.batch,
        gradient_accumulation_steps=1, learning_rate=LR, weight_decay=WD, adam_beta1=BETAS[0], adam_beta2=BETAS[1],
        adam_epsilon=EPS, max_grad_norm=CLIP, lr_scheduler_type='cosine', warmup_steps=b.a.warmup,
        optim='adamw_torch_fused', bf16=b.cuda, tf32=True if b.cuda else None, torch_compile=compiled,
        use_cpu=not b.cuda, dataloader_pin_memory=b.cuda, dataloader_num_workers=0, dataloader_drop_last=True,
        remove_unused_columns=False, logging_strategy='steps', logging_steps=b.a.log_every, logging_nan_inf_filter=False,
        accelerator_config=dict(non_blocking=True),  # pinned batches copied without blocking, as in the other arms
        save_strategy='no', eval_strategy='no', report_to='none', disable_tqdm=True, seed=b.a.seed)
    tr = HFTrainer(model=b.new_model(), args=args, train_dataset=OrderedSamples(b.bundle.train, b.order),
                   callbacks=[StepClock()])
    for cb in (PrinterCallback, ProgressCallback): tr.remove_callback(cb)  # no printing of every log
    tr.train()
    losses = [h['loss'] for h in tr.state.log_history if 'loss' in h]
    return b.result('hf', 'compiled' if compiled else 'eager', clock, losses[-1] if losses else None)

def arm_lightning(b:Bench, compiled:bool) -> Result:
    import lightning as L
    clock, N = b.clock(), b.a.log_every
    class LitLM(L.LightningModule):
        def __init__(self, model):
            super().__init__()
            self.model = model
        def forward(self, input_ids, labels): return self.model(input_ids=input_ids, labels=labels).loss
        def training_step(self, batch, batch_idx): return self(batch['input_ids'], batch['labels'])
        def configure_optimizers(self):
            opt = torch.optim.AdamW(decay_groups(self), lr=LR, betas=BETAS, eps=EPS, fused=b.cuda)
            return dict(optimizer=opt, lr_scheduler=dict(scheduler=torch.optim.lr_scheduler.LambdaLR(opt, b.lr_lambda),
                                                         interval='step'))
    class StepClock(L.Callback):
        window, last = 0., None
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            n = trainer.global_step
            self.window = self.window + outputs['loss'].detach()
            clock.step(n)
            if n % N == 0: self.last, self.window = self.window.item() / N, 0.  # the loss read every N steps
    sc = StepClock()
    lit = LitLM(b.new_model())
    trainer = L.Trainer(accelerator='gpu' if b.cuda else 'cpu', devices=1, precision=b.precision, max_steps=b.total,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        gradient_clip_val=CLIP, num_sanity_val_steps=0, limit_val_batches=0, use_distributed_sampler=False,
                        callbacks=[sc], default_root_dir=os.path.join(b.out, 'lightning'))
    trainer.fit(torch.compile(lit) if compiled else lit, train_dataloaders=b.loader())
    return b.result('lightning', 'compiled' if compiled else 'eager', clock, sc.last)

RUNNERS = dict(plain=arm_plain, nbtrain=arm_nbtrain, hf=arm_hf, lightning=arm_lightning, gpt=arm_gpt)

def run_arm(b:Bench, arm:str, compiled:bool) -> Result:
    mode = 'compiled' if compiled else 'eager'
    free(b.cuda)
    t = time.perf_counter()
    try: r = RUNNERS[arm](b, compiled)
    except Exception as e:
        traceback.print_exc(file=sys.stderr)
        r = Result(arm, mode, error=f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'[:200])
    free(b.cuda)
    what = (f"{r.step_ms:8.2f} ms/step, {r.tok_s:,.0f} tokens/s" if r.error is None else f"FAILED: {r.error}")
    print(f"  {LABELS[arm]:<22} {mode:<8} {what} ({time.perf_counter() - t:.1f} s in all)", file=sys.stderr, flush=True)
    return r

# --- the report -------------------------------------------------------------------------------------------------------

def median_result(rs:list[Result]) -> Result:
    ok = [r for r in rs if r.error is None]
    if not ok: return rs[-1]
    med = lambda k: statistics.median(getattr(r, k) for r in ok) if all(getattr(r, k) is not None for r in ok) else None
    return Result(ok[0].arm, ok[0].mode, med('tok_s'), med('step_ms'), med('mfu'), max((r.peak_gb or 0) for r in ok) or None,
                  ok[-1].loss)

def fmt(v, f, na='n/a'): return na if v is None else format(v, f)

def report(b:Bench, results:dict, modes:list[str], gpt_mode:str|None) -> dict:
    ratios = {}
    print(f"{'arm':<24}{'mode':<10}{'tokens/s':>12}{'ms/step':>10}{'MFU':>8}{'peak mem':>11}{'loss':>9}{'nbtrain/arm':>13}")
    for mode in modes:
        ours = results.get(('nbtrain', mode))
        for arm in ARMS:
            r = results.get((arm, mode))
            if r is None: continue
            ratio = None
            if arm != 'gpt' and ours is not None and ours.error is None and r.error is None: ratio = ours.tok_s / r.tok_s
            ratios[(arm, mode)] = ratio
            if r.error is not None:
                print(f"{LABELS[arm]:<24}{mode:<10}  FAILED: {r.error}")
                continue
            print(f"{LABELS[arm]:<24}{mode:<10}{r.tok_s:>12,.0f}{r.step_ms:>10.2f}{fmt(r.mfu and 100 * r.mfu, '7.1f') + ('%' if r.mfu else ''):>8}"
                  f"{fmt(r.peak_gb, '.2f') + (' GB' if r.peak_gb else ''):>11}{fmt(r.loss, '.3f'):>9}"
                  f"{(fmt(ratio, '.3f') + 'x') if ratio else ('-' if arm == 'gpt' else 'n/a'):>13}")
    # targets
    cpu_note = '' if b.cuda else ' (CPU check run: the targets are for the GPU run)'
    verdict = lambda ok: ('met' if ok else 'NOT met') + cpu_note
    for mode in modes:
        for arm, goal, test in (('plain', f'>= {TARGET_PLAIN}x the plain loop', lambda x: x >= TARGET_PLAIN),
                                ('hf', 'ahead of transformers.Trainer', lambda x: x > 1.0),
                                ('lightning', 'ahead of Lightning', lambda x: x > 1.0)):
            if (arm, mode) not in results or ('nbtrain', mode) not in results: continue
            x = ratios.get((arm, mode))
            print(f"target nbtrain {goal} ({mode}): " + (f"{x:.3f}x -- {verdict(test(x))}" if x else 'n/a (an arm failed)'))
    if gpt_mode is not None and ('gpt', gpt_mode) in results:
        r = results[('gpt', gpt_mode)]
        h100 = b.cuda and 'H100' in b.info.name
        if r.error is not None: s = 'n/a (the arm failed)'
        elif r.mfu is None: s = f"n/a (MFU is not measured on {'CPU' if not b.cuda else b.info.name})"
        elif not h100: s = f"{100 * r.mfu:.1f}% -- n/a here (the target is for an H100; this is {b.info.name})"
        else: s = f"{100 * r.mfu:.1f}% -- {verdict(r.mfu >= TARGET_MFU)}"
        print(f"target reference GPT >= {TARGET_MFU:.0%} MFU on an H100 ({gpt_mode}): {s}")
    return ratios

def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--size', choices=list(SIZES), default=None, help='model and run size (default: gpt2-small on a GPU, cpu-tiny without)')
    p.add_argument('--steps', type=int, default=None, help='timed optimizer steps per arm')
    p.add_argument('--warmup', type=int, default=None, help='untimed steps before them (compilation happens here)')
    p.add_argument('--batch', type=int, default=None)
    p.add_argument('--seq-len', type=int, default=None)
    p.add_argument('--arms', default=','.join(ARMS), help=f"comma list of {', '.join(ARMS)}")
    c = p.add_mutually_exclusive_group()
    c.add_argument('--no-compile', action='store_true', help='eager arms only')
    c.add_argument('--compile', action='store_true', help='also the compiled arms on CPU (always on with a GPU)')
    p.add_argument('--rounds', type=int, default=1, help='rounds over all arms; the median is reported')
    p.add_argument('--log-every', type=int, default=10, help='read the loss back every N steps (all arms)')
    p.add_argument('--seed', type=int, default=1337)
    p.add_argument('--threads', type=int, default=None,
                   help='CPU threads of torch (default: 1 without a GPU, so a busy machine does not stall the tiny run)')
    a = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    a.size = a.size or ('gpt2-small' if cuda else 'cpu-tiny')
    spec = SIZES[a.size]
    for k in ('steps', 'warmup', 'batch', 'seq_len'):
        if getattr(a, k) is None: setattr(a, k, spec[k])
    arms = [ALIASES.get(x.strip().lower(), x.strip().lower()) for x in a.arms.split(',') if x.strip()]
    bad = [x for x in arms if x not in ARMS]
    if bad or not arms: p.error(f"--arms: unknown {', '.join(bad) or '(none)'}; choose from {', '.join(ARMS)}")
    a.arms = [x for x in ARMS if x in arms]
    if a.warmup < 1 or a.steps < 1: p.error('--warmup and --steps must be at least 1')
    if a.seq_len < 2 or a.batch < 1 or a.rounds < 1 or a.log_every < 1: p.error('--seq-len >= 2, --batch, --rounds, --log-every >= 1')
    return a, spec, cuda

def quiet():
    "Keep the frameworks' banners and advice out of the report."
    warnings.simplefilter('ignore')
    os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
    for mod in ('lightning_fabric', 'lightning'):  # imported first: importing them sets their loggers to INFO
        try: __import__(mod)
        except ImportError: pass
    for name in ('lightning', 'lightning.pytorch', 'lightning.fabric', 'lightning_fabric', 'pytorch_lightning'):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import transformers
        transformers.logging.set_verbosity_error()
    except ImportError: pass

def main(argv=None) -> dict:
    a, spec, cuda = parse(argv)
    modes = ['eager'] + (['compiled'] if (cuda and not a.no_compile) or a.compile else [])
    import transformers
    from nbtrain.hardware import device_info
    info = device_info()
    if cuda and not info.bf16:
        raise SystemExit(f"{info.name} has no fast bf16; this benchmark compares bf16 training (Ampere or newer)")
    shape = f"{spec['n_layer']} layers, {spec['n_embd']} wide, {spec['n_head']} heads, vocabulary {spec['vocab']}"
    if cuda:
        print(f"GPU run on {info.name}: GPT-2 {'124M' if a.size == 'gpt2-small' else a.size} (transformers "
              f"GPT2LMHeadModel, sdpa; {shape}), batch {a.batch} x {a.seq_len} tokens, bf16-mixed, {' and '.join(modes)}")
    else:
        print(f"CPU RUN, NO GPU: scaled-down check that every arm runs, not a GPU throughput measurement -- {a.size} GPT-2 "
              f"({shape}), batch {a.batch} x {a.seq_len} tokens, fp32, {' and '.join(modes)}"
              f"{'' if a.compile else ' (compiled arms skipped: --compile to add them)'}; MFU n/a")
    sys.stdout.flush()
    quiet()
    threads = a.threads or (None if cuda else 1)
    if threads: torch.set_num_threads(threads)
    torch.backends.cuda.matmul.allow_tf32 = True  # TF32 on for every arm (the plain loop's setting)
    torch.backends.cudnn.allow_tf32 = True
    versions = [f"torch {torch.__version__} ({torch.get_num_threads()} CPU threads)", f"transformers {transformers.__version__}"]
    try:
        import lightning
        versions.append(f"lightning {lightning.__version__}")
    except ImportError: pass
    try:
        import accelerate
        versions.append(f"accelerate {accelerate.__version__}")
    except ImportError: pass
    out = tempfile.mkdtemp(prefix='nbtrain-gpu-throughput-')
    b = Bench(a, spec, cuda, out)
    gpt_mode = 'compiled' if 'compiled' in modes else 'eager'
    plan = [(arm, mode) for mode in modes for arm in a.arms if arm != 'gpt'] + ([('gpt', gpt_mode)] if 'gpt' in a.arms else [])
    print(f"{a.warmup} warmup + {a.steps} timed steps per arm ({b.tokens_per_step:,} tokens/step), {a.rounds} round(s) "
          f"of {len(plan)} runs in one process; loss read every {a.log_every} steps | {', '.join(versions)}", flush=True)
    runs = {k: [] for k in plan}
    for r in range(a.rounds):
        print(f"round {r + 1}/{a.rounds}", file=sys.stderr, flush=True)
        for arm, mode in plan: runs[(arm, mode)].append(run_arm(b, arm, mode == 'compiled'))
    results = {k: median_result(v) for k, v in runs.items()}
    if b.flops_per_token:
        peak = f"{b.peak / 1e12:,.0f} TFLOP/s peak ({b.precision})" if b.peak else 'peak FLOP/s unknown here, MFU n/a'
        print(f"FLOPs per token (6N + 12*L*d*T): {b.flops_per_token / 1e6:,.1f} M with N = {b.n_params / 1e6:,.2f} M "
              f"parameters (without position embeddings); {peak}")
    ratios = report(b, results, modes, gpt_mode if 'gpt' in a.arms else None)
    failed = [f"{LABELS[k[0]]} ({k[1]})" for k, r in results.items() if r.error is not None]
    if failed: print(f"FAILED arms: {', '.join(failed)}")
    return dict(results=results, ratios=ratios, failed=failed)

if __name__ == '__main__':
    sys.exit(1 if main()['failed'] else 0)
