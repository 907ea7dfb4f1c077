"""How long the runs index takes over many runs: cold (no index), warm (the index, nothing changed) and warm with a
few runs still writing rows.

Writes N synthetic run folders shaped as the trainer writes them (the full config.yaml of the default preset,
metrics.jsonl with a few hundred rows, an evaluation every tenth, status.json, model.json, data.json, env.json, two
checkpoint manifests, final/manifest.json; no weights: the index never reads them), then times `runs_records` (the
rows `nbtrain runs` prints) and `runs_table` (the same as a pandas DataFrame, with the varying settings as columns):

- cold: no `.runs-index.json`, every folder read
- warm: the index there, nothing changed (every run's files stat'ed, none read)
- warm, K runs growing: K runs each appended a few metrics rows (read from where they were left)
- a filtered, sorted query on a warm index (`--where val_loss<3 --sort val_loss`)

Target: warm under 2 s for 1,000 runs. Each timing is the best of `--repeat` tries (the machine is shared).

    python benchmarks/runs.py [--runs 1000] [--rows 300] [--changed 10] [--repeat 3] [--dir DIR]
"""
import argparse, json, os, random, shutil, tempfile, time
from pathlib import Path
import yaml
from nbtrain.config import load_config
from nbtrain.runs import INDEX, runs_records, runs_table


def write_runs(root:Path, n:int, rows:int, seed:int=0):
    "N run folders: most finished, some interrupted, failed at setup or running (a status without a live lock)."
    rng = random.Random(seed)
    base = load_config().to_dict()
    t_start = 1.79e9
    for i in range(n):
        d = root/f'run-{i:04d}'
        cfg = json.loads(json.dumps(base))
        lr = 10 ** rng.uniform(-4, -2)
        cfg['optim']['lr'], cfg['train']['max_steps'], cfg['name'], cfg['output_dir'] = lr, rows * 10, d.name, str(root)
        cfg['model']['size'] = rng.choice(['tiny', 'mini', 'small'])
        (d/'checkpoints').mkdir(parents=True)
        (d/'config.yaml').write_text(yaml.safe_dump(cfg, sort_keys=False))
        t0 = t_start + i * 600
        started = time.strftime('%Y-%m-%dT%H:%M:%S+00:00', time.gmtime(t0))
        (d/'env.json').write_text(json.dumps(dict(created=started, python='3.11.7', packages={'torch': '2.13.0'}), indent=2))
        kind = rng.choices(['finished', 'interrupted', 'failed', 'running'], [80, 10, 5, 5])[0]
        if kind == 'failed':
            (d/'status.json').write_text(json.dumps(dict(state='failed', started=started, updated=started, ended=started, step=0,
                                                         stop_reason='', error=dict(type='DataError', message='no text column'))))
            continue
        (d/'model.json').write_text(json.dumps({'kind': 'reference', 'class': 'GPT', 'source': 'gpt', 'n_params': 421376,
                                                'config': {'n_layer': 2, 'n_head': 4, 'd_model': 128}}, indent=2))
        (d/'data.json').write_text(json.dumps(dict(source='embedded', n_train=6422, n_val=721, vocab_size=56), indent=1))
        n_rows = rows if kind == 'finished' else rng.randint(rows // 4, rows - 1)
        loss, lines = 4.0, []
        for r in range(n_rows):
            step = (r + 1) * 10
            loss *= 0.995 + rng.uniform(-0.002, 0.002)
            lines.append(json.dumps(dict(step=step, epoch=step / 200, time=t0 + step, loss=loss, lr=lr, samples_per_s=34.6,
                                         tokens_per_s=4429.5, grad_norm=1.97, ppl=2.718 ** loss)))
            if step % 100 == 0:
                lines.append(json.dumps(dict(step=step, epoch=step / 200, time=t0 + step + 1, val_loss=loss - 0.1, val_acc=0.3,
                                             val_ppl=2.718 ** (loss - 0.1), val_top5_acc=0.65, val_conf_top1=0.25, val_entropy=2.9)))
        (d/'metrics.jsonl').write_text('\n'.join(lines) + '\n')
        last = n_rows * 10
        for s in (last - 100, last):
            ck = d/'checkpoints'/f'step-{s:09d}'
            ck.mkdir()
            (ck/'manifest.json').write_text(json.dumps(dict(step=s, epoch=s / 200, metrics=dict(val_loss=loss), pinned=False,
                                                            reason='interrupt' if kind == 'interrupted' and s == last else 'every_steps',
                                                            files={'model.safetensors': dict(sha256='0' * 64, bytes=1688104),
                                                                   'state.pt': dict(sha256='0' * 64, bytes=3411998)},
                                                            written_at=t0 + s + 2), indent=1))
        if kind != 'running':
            (d/'final').mkdir()
            (d/'final'/'manifest.json').write_text(json.dumps(dict(folder='final', step=last, weights_step=last, written_at=t0 + last + 3,
                                                                    files={'model.safetensors': dict(sha256='0' * 64, bytes=1688120)}), indent=1))
        end = time.strftime('%Y-%m-%dT%H:%M:%S+00:00', time.gmtime(t0 + last + 5))
        (d/'status.json').write_text(json.dumps(dict(state=kind, started=started, updated=end, ended=None if kind == 'running' else end,
                                                     step=last, stop_reason=f'{kind} at step {last}', error=None)))


def best_of(f, repeat:int, before=None) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        if before: before()
        t = time.perf_counter()
        out = f()
        times.append(time.perf_counter() - t)
    return min(times), out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--runs', type=int, default=1000)
    p.add_argument('--rows', type=int, default=300, help='training rows per finished run (plus an evaluation every tenth)')
    p.add_argument('--changed', type=int, default=10, help='runs that append rows between the warm calls')
    p.add_argument('--repeat', type=int, default=3)
    p.add_argument('--dir', help='where to write the runs (default: a temporary folder, removed at the end)')
    a = p.parse_args(argv)
    import pandas  # imported once before any timing: runs_table's times are the index's, not pandas' import
    root = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix='nbtrain-runs-bench-'))
    try:
        t = time.perf_counter()
        write_runs(root, a.runs, a.rows)
        size = sum(f.stat().st_size for f in root.rglob('*') if f.is_file())
        print(f"{a.runs} run folders, {size / 1e6:.0f} MB, written in {time.perf_counter() - t:.1f} s ({root})")
        drop = lambda: (root/INDEX).unlink(missing_ok=True)
        cold, rows = best_of(lambda: runs_records(root), a.repeat, before=drop)
        say = lambda what, secs, note='': print(f"{what:<48} {secs:6.2f} s" + (f"  ({note})" if note else ''))
        say('cold  runs_records (no index, every folder read)', cold, f"{len(rows)} runs; index {(root/INDEX).stat().st_size / 1e6:.1f} MB")
        warm, _ = best_of(lambda: runs_records(root), a.repeat)
        say('warm  runs_records (index, nothing changed)', warm)
        names = sorted(r['name'] for r in rows if (root/r['name']/'metrics.jsonl').exists())[:a.changed]
        def grow():
            for n in names:
                with open(root/n/'metrics.jsonl', 'a') as f: f.write(json.dumps(dict(step=10**6, time=2e9, loss=1.0)) + '\n')
        grown, _ = best_of(lambda: runs_records(root), a.repeat, before=grow)
        say(f'warm  runs_records, {len(names)} runs growing', grown)
        table, df = best_of(lambda: runs_table(root), a.repeat)
        say(f'warm  runs_table (DataFrame, {df.shape[0]} x {df.shape[1]})', table)
        query, hits = best_of(lambda: runs_records(root, where='val_loss<3', sort='val_loss', limit=20), a.repeat)
        say('warm  --where val_loss<3 --sort val_loss', query, f'{len(hits)} shown')
        print(f"target: warm under 2 s per 1,000 runs ({2 * a.runs / 1000:.2f} s here): "
              f"{'met' if max(warm, grown, table) < 2 * a.runs / 1000 else 'NOT met'}")
    finally:
        if not a.dir: shutil.rmtree(root, ignore_errors=True)


if __name__ == '__main__':
    main()
