"""A training run for the checkpoint tests: `python ckpt_run.py OUTPUT_DIR NAME BALLAST_MB [--grow-at STEP] [overrides...]`.

A registered `Ballast` object adds BALLAST_MB of state to every checkpoint, so that a write takes long enough for a
test to kill the process in the middle of it. With `--grow-at STEP` the ballast grows tenfold after that step (to
outgrow a size-limited file system). With `--fsize-limit BYTES` the process may not write files larger than that,
which is how a full disk looks to the writer.
"""
import resource, signal, sys
import torch
from nbtrain.callbacks import Callback
from nbtrain.config import load_config
from nbtrain.trainer import Trainer

class Ballast:
    def __init__(self, mb:float): self.x = torch.arange(int(mb * 2**18), dtype=torch.float32)
    def state_dict(self): return {'x': self.x}
    def load_state_dict(self, s): self.x = s['x']

class Grow(Callback):
    def __init__(self, ballast, at): self.ballast, self.at = ballast, at
    def on_step_end(self, trainer):
        if trainer.step == self.at: self.ballast.x = torch.arange(self.ballast.x.numel() * 10, dtype=torch.float32)

def main(argv):
    out, name, mb, *rest = argv
    grow_at = None
    if '--grow-at' in rest: i = rest.index('--grow-at'); grow_at = int(rest[i+1]); del rest[i:i+2]
    if '--fsize-limit' in rest:
        i = rest.index('--fsize-limit'); lim = int(rest[i+1]); del rest[i:i+2]
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # over the limit, a write fails with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (lim, lim))
    base = ['--output_dir', out, '--name', name, '--train.deterministic', 'true', '--train.max_steps', '60',
            '--train.log_every', '5', '--train.eval_every', '20', '--train.eval_batches', '2', '--train.progress_bar', 'false',
            '--data.corpus_size', '100', '--data.seq_len', '32', '--train.micro_batch_size', '8',
            '--checkpoint.every_steps', '5', '--checkpoint.every_minutes', 'none', '--checkpoint.keep_last_n', '2',
            '--checkpoint.keep_best_k', '0']
    cfg = load_config(overrides=base + rest)
    ballast = Ballast(float(mb))
    tr = Trainer(cfg, callbacks=[Grow(ballast, grow_at)] if grow_at else [])
    tr.ckpt.register('ballast', ballast)
    res = tr.fit()
    print(f'DONE step={res.step} reason={res.stop_reason}', flush=True)

if __name__ == '__main__': main(sys.argv[1:])
