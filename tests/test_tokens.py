"""Token shards (nbtrain.tokens): a preparation killed with SIGKILL and run again, the `prepare` command, and the
source kinds (jsonl, parquet, csv, folders with splits, hf: datasets read as a stream)."""
import argparse, contextlib, io, json, os, signal, subprocess, sys, time
from pathlib import Path
import numpy as np
import pytest
from nbtrain.embedded import embedded_corpus
from nbtrain.errors import DataError
from nbtrain.tokens import MANIFEST, PrepareCommand, TokenCorpus, TextSource, is_token_corpus, prepare_tokens

ROOT = Path(__file__).resolve().parents[1]

def shard_bytes(corpus: TokenCorpus) -> dict:
    return {f.relative_to(corpus.path).as_posix(): f.read_bytes() for s in corpus.splits for f, _ in corpus.shards(s)}

def test_sigkill_then_resume(tmp_path):
    "A preparation killed (with its workers) once some shards exist finishes on the next call, keeps those shards, and equals an uninterrupted one."
    corpus = tmp_path / 'corpus.txt'
    text = embedded_corpus(3000)
    corpus.write_text(text)  # 1.4 MB
    kw = dict(workers=2, shard_mb=0.08, vocab_size=1000, sample_mb=1, progress=False)
    out = tmp_path / 'killed'
    code = (f"from nbtrain.tokens import prepare_tokens; "
            f"prepare_tokens({str(corpus)!r}, 'bpe', {str(out)!r}, **{kw!r})")
    p = subprocess.Popen([sys.executable, '-c', code], cwd=ROOT, start_new_session=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    done, deadline = [], time.monotonic() + 120
    while time.monotonic() < deadline:  # poll until a few shards are finished
        done = sorted((out / '.done').glob('train-*.json')) if (out / '.done').is_dir() else []
        if len(done) >= 3 or p.poll() is not None: break
        time.sleep(0.02)
    os.killpg(p.pid, signal.SIGKILL)  # the process and its tokenising workers, as a lost machine would
    p.wait(timeout=30)
    assert len(done) >= 3, p.stderr.read().decode()[-2000:]
    assert not (out / MANIFEST).exists(), 'the preparation finished before the kill: make the corpus bigger'
    with pytest.raises(DataError, match='did not finish'): TokenCorpus(out)
    kept = {json.loads(m.read_text())['file'] for m in done}
    mtimes = {f: (out / f).stat().st_mtime_ns for f in kept}

    resumed = prepare_tokens(corpus, 'bpe', out, **kw)
    assert resumed.stats['reused'] >= len(kept) and resumed.stats['written'] >= 1, resumed.stats
    for f, t in mtimes.items(): assert (out / f).stat().st_mtime_ns == t, f'{f} was rewritten'
    assert not list(out.rglob('.*.tmp')), 'a killed worker left a temporary file behind'

    whole = prepare_tokens(corpus, 'bpe', tmp_path / 'whole', **kw)
    assert whole.stats['reused'] == 0
    a, b = shard_bytes(resumed), shard_bytes(whole)
    assert sorted(a) == sorted(b) and len(a) > 10
    assert all(a[k] == b[k] for k in a), [k for k in a if a[k] != b[k]]
    assert resumed.manifest['splits'] == whole.manifest['splits']
    assert resumed.tokenizer.fingerprint() == whole.tokenizer.fingerprint()
    assert resumed.verify()

def run_prepare(*argv):
    cmd = PrepareCommand(); p = argparse.ArgumentParser(); cmd.add_arguments(p)
    args, rest = p.parse_known_args([str(a) for a in argv])
    out = io.StringIO()
    with contextlib.redirect_stdout(out): rc = cmd.run(args, rest)
    return rc, out.getvalue()

def test_prepare_command(tmp_path, monkeypatch):
    (tmp_path / 'c.txt').write_text(embedded_corpus(500))
    rc, out = run_prepare(tmp_path / 'c.txt', '--tokenizer', 'char', '--out', tmp_path / 'tok', '--workers', '2',
                          '--shard-mb', '0.05', '--quiet')
    assert rc == 0, out
    c = TokenCorpus(tmp_path / 'tok')
    shards = sum(len(s['shards']) for s in c.manifest['splits'].values())
    assert f"{shards} shard(s)" in out and f"train {c.num_tokens('train'):,} tokens" in out and 'MB/s of source' in out, out
    assert shards > 3 and c.manifest['tokenizer']['type'] == 'char' and c.manifest['dtype'] == 'uint16'
    assert 'already prepared' in run_prepare(tmp_path / 'c.txt', '--tokenizer', 'char', '--out', tmp_path / 'tok',
                                             '--shard-mb', '0.05', '--quiet')[1]
    # another source into the same folder: both named, and what to do
    (tmp_path / 'd.txt').write_text(embedded_corpus(50))
    with pytest.raises(DataError, match=r"holds a token corpus prepared from the source .*c\.txt.*you asked for the source .*d\.txt.*another output folder"):
        run_prepare(tmp_path / 'd.txt', '--tokenizer', 'char', '--out', tmp_path / 'tok', '--shard-mb', '0.05', '--quiet')
    # without --out: the data cache
    monkeypatch.setenv('NBTRAIN_CACHE_DIR', str(tmp_path / 'cache'))
    rc, out = run_prepare(tmp_path / 'd.txt', '--tokenizer', 'byte', '--quiet')
    assert rc == 0 and str(tmp_path / 'cache' / 'tokens') in out, out

def test_sources_jsonl_parquet_csv_folder(tmp_path):
    pa = pytest.importorskip('pyarrow'); pq = pytest.importorskip('pyarrow.parquet')
    docs = embedded_corpus(120).split('\n\n')
    data = tmp_path / 'data'
    (data / 'train').mkdir(parents=True); (data / 'validation').mkdir()
    (data / 'train' / 'a.jsonl').write_text('\n'.join(json.dumps({'content': d, 'id': i}) for i, d in enumerate(docs[:50])) + '\n\n')
    pq.write_table(pa.table({'text': docs[50:100], 'n': list(range(50))}), data / 'train' / 'b.parquet')
    with open(data / 'validation' / 'v.csv', 'w', newline='') as f:
        import csv
        w = csv.writer(f); w.writerow(['label', 'sentence']); w.writerows([[1, d] for d in docs[100:]])
    c = prepare_tokens(data, 'byte', tmp_path / 'tok', workers=2, progress=False)
    assert c.manifest['validation'] == {'from': 'source'}
    assert (c.num_documents('train'), c.num_documents('validation')) == (100, len(docs) - 100)
    tok = c.tokenizer
    ids = np.concatenate([np.fromfile(f, '<u2') for f, _ in c.shards('train')])
    assert tok.decode(ids, skip_special=False).split('<eos>')[:-1] == docs[:100]  # files in name order, rows in order
    vids = np.fromfile(c.shards('validation')[0][0], '<u2')
    assert tok.decode(vids, skip_special=False).split('<eos>')[:-1] == docs[100:]
    assert is_token_corpus(c.path) and not is_token_corpus(data)
    ds = c.dataset('validation', 32)
    assert len(ds) == (c.num_tokens('validation') - 1) // 32

    # a jsonl file whose text column must be named; a row with a number in it is an error naming the line
    (tmp_path / 'two.jsonl').write_text('\n'.join(json.dumps({'title': 'x', 'body': d}) for d in docs[:5]))
    with pytest.raises(DataError, match='Set data.text_column'): prepare_tokens(tmp_path / 'two.jsonl', 'byte', tmp_path / 'x', progress=False)
    (tmp_path / 'bad.jsonl').write_text(json.dumps({'text': 'fine'}) + '\n' + json.dumps({'text': 3}) + '\n')
    with pytest.raises(DataError, match=r'bad\.jsonl, line 2: column .text. holds int'):
        prepare_tokens(tmp_path / 'bad.jsonl', 'byte', tmp_path / 'y', workers=1, progress=False)
    with pytest.raises(DataError, match='not a token corpus|is not a prepared token corpus'): TokenCorpus(tmp_path)

def test_hf_source_streaming(tmp_path, monkeypatch):
    "hf:NAME reads the dataset with streaming=True; here a local dataset folder, so nothing reaches the network."
    pytest.importorskip('datasets')
    monkeypatch.setenv('HF_DATASETS_OFFLINE', '1'); monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    docs = embedded_corpus(60).split('\n\n')
    (tmp_path / 'ds').mkdir()
    (tmp_path / 'ds' / 'train.jsonl').write_text('\n'.join(json.dumps({'story': d}) for d in docs[:50]))
    (tmp_path / 'ds' / 'validation.jsonl').write_text('\n'.join(json.dumps({'story': d}) for d in docs[50:]))
    src = TextSource(f"hf:{tmp_path / 'ds'}")
    assert src.splits == ['train', 'validation'] and src.columns == {'train': 'story', 'validation': 'story'}
    c = prepare_tokens(src, 'byte', tmp_path / 'tok', workers=1, progress=False)
    assert (c.num_documents('train'), c.num_documents('validation')) == (50, len(docs) - 50)
    assert c.tokenizer.decode(c.dataset('train', 16)[0]['input_ids']) == docs[0][:16]
