"""Exports of a real run: every format loaded back and compared with PyTorch on held-out data, int8 quantization, metadata,
the error that names a blocking operation, and the `nbtrain export` command."""
import json
import numpy as np
import pytest
import torch
from torch import nn

from nbtrain.cli import main
from nbtrain.export import ExportError, LogitsModule, export_onnx, export_run, export_torchscript, file_sha256
from nbtrain.hub import load_final

QUICK = {'train.max_steps': 6, 'train.eval_every': 3, 'train.log_every': 2, 'train.micro_batch_size': 4, 'train.eval_batches': 2,
         'train.progress_bar': False, 'data.corpus_size': 60, 'data.seq_len': 32}
SECRET = 'hf_ExportSecret_0123456789abcdef'


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
    from nbtrain.trainer import train
    return train(overrides={**QUICK, 'output_dir': str(tmp_path_factory.mktemp('runs')), 'name': 'tiny'}).run_dir


def test_every_format_matches_pytorch_and_metadata_records_it(run_dir, tmp_path, monkeypatch):
    monkeypatch.setenv('HF_TOKEN', SECRET)
    rep = export_run(run_dir, out_dir=tmp_path/'exp', quantize=True, log=None)
    out = tmp_path/'exp'
    assert {f: v['passed'] for f, v in rep.formats.items()} == {'safetensors': True, 'torchscript': True, 'onnx': True}
    assert rep.formats['safetensors']['max_abs_diff'] == 0.0
    for f in ('torchscript', 'onnx'): assert rep.formats[f]['max_abs_diff'] < 1e-4
    assert rep.held_out.startswith('validation split')

    # each file, loaded back here, gives the PyTorch model's logits on a fresh held-out-like input
    fm = load_final(run_dir)
    x = torch.tensor([fm.tokenizer.encode(t)[:24] for t in ('The little dog ran to the park', 'She found a red ball in the yard')])
    with torch.no_grad(): want = fm.module(x).logits.numpy()
    import onnxruntime as ort
    got_onnx = ort.InferenceSession(str(out/'model.onnx'), providers=['CPUExecutionProvider']).run(None, {'input_ids': x.numpy()})[0]
    got_ts = torch.jit.load(str(out/'model.pt'))(x).detach().numpy()
    got_st = load_final(out).module(x).logits.detach().numpy()
    assert np.abs(got_onnx - want).max() < 1e-4 and np.abs(got_ts - want).max() < 1e-4 and np.array_equal(got_st, want)

    meta = json.loads((out/'metadata.json').read_text())
    assert meta['checksums'] == {p.name: file_sha256(p) for p in sorted(out.iterdir()) if p.name != 'metadata.json'}
    assert meta['config']['train']['max_steps'] == 6 and meta['task'] == 'causal_lm'
    assert meta['metrics'] and all(k.startswith('val_') for k in meta['metrics'])
    assert meta['environment']['export']['onnxruntime'] and meta['environment']['training']['packages']['torch']
    assert meta['inputs'] == [{'name': 'input_ids', 'dtype': 'int64', 'shape': ['batch', 'sequence']}]
    assert SECRET not in (out/'metadata.json').read_text()

    q = meta['quantization']
    assert q['passed'] and q['file'] == 'model_int8.pt' and q['size_mb_int8'] < q['size_mb_fp32']
    assert 0.8 <= q['argmax_agreement'] <= 1 and abs(q['loss_change']) < 0.1
    assert np.isclose(q['loss_change'], q['loss_int8'] - q['loss_fp32'])


def test_tolerance_failure_keeps_the_formats_that_pass(run_dir, tmp_path):
    with pytest.raises(ExportError) as ei:
        export_run(run_dir, 'safetensors,onnx', tmp_path/'strict', atol=0, rtol=0, exporter='torchscript', log=None)
    e = ei.value
    assert e.format == 'onnx' and 'tolerance 0' in str(e)
    assert e.report.formats['safetensors']['passed'] and not e.report.formats['onnx']['passed']
    assert (tmp_path/'strict'/'model.safetensors').is_file() and not (tmp_path/'strict'/'model.onnx').exists()


class WithSVD(nn.Module):
    "A model using an operation ONNX has no equivalent for."
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
    def forward(self, input_ids): return torch.linalg.svd(self.emb(input_ids), full_matrices=False)[0]


@pytest.mark.parametrize('exporter', ['torchscript', 'auto'])
def test_blocking_operation_is_named(tmp_path, exporter):
    m = LogitsModule(WithSVD().eval(), ['input_ids'], 'input_ids')
    x = (torch.randint(0, 10, (2, 4)),)
    with pytest.raises(ExportError) as ei: export_onnx(m, x, [x], tmp_path/'m.onnx', exporter=exporter)
    assert ei.value.op in ('aten::linalg_svd', 'aten._linalg_svd', 'aten.linalg_svd')
    assert f'operation {ei.value.op} has no ONNX equivalent' in str(ei.value)
    assert not list(tmp_path.iterdir())


class Branchy(nn.Module):
    "Python control flow on tensor values: a trace freezes one branch."
    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(10, 8), nn.Linear(8, 10)
    def forward(self, input_ids):
        h = self.emb(input_ids)
        if input_ids.sum() > 20: h = h * 2
        return self.head(h)


def test_torchscript_scripts_what_tracing_gets_wrong(tmp_path):
    m = LogitsModule(Branchy().eval(), ['input_ids'], 'input_ids')
    lo, hi = torch.zeros(2, 4, dtype=torch.long), torch.full((2, 4), 9)
    method, p, notes = export_torchscript(m, (lo,), [(lo,), (hi,)], tmp_path/'b.pt')
    assert method == 'script' and p.passed and notes
    loaded = torch.jit.load(str(tmp_path/'b.pt'))
    assert torch.allclose(loaded(hi), m(hi)) and torch.allclose(loaded(lo), m(lo))


def test_export_command(run_dir, tmp_path, capsys):
    assert main(['export', str(run_dir), '--formats', 'onnx,torchscript', '--out', str(tmp_path/'cli'), '--quantize',
                 '--exporter', 'torchscript']) == 0
    out = capsys.readouterr().out
    assert 'onnx' in out and 'torchscript' in out and 'argmax agreement' in out and 'metadata:' in out
    assert {'model.onnx', 'model.pt', 'model_int8.pt', 'metadata.json'} <= {p.name for p in (tmp_path/'cli').iterdir()}
    assert main(['export', str(run_dir), '--formats', 'onnx,tflite']) == 2
    assert "Unknown export format 'tflite'" in capsys.readouterr().err
    assert main(['export', str(run_dir), '--formats', 'onnx', '--out', str(tmp_path/'x'), '--atol', '0', '--rtol', '0',
                 '--exporter', 'torchscript']) == 1
    assert 'outputs differ' in capsys.readouterr().err
