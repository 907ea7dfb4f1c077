"""The training form under ipywidgets 7, the generation some Colab images still render: built in a subprocess whose
`ipywidgets` is 7.x (installed by `make test` into build/ipywidgets7, beside the environment's ipywidgets 8), checked
as a person would see it: every field labelled with its help on hover (`description_tooltip`, which 7 shows on the
label), a bad learning rate answered with a message under the field and Train refused, a good one accepted, Stop and
Resume off while they cannot act, and the Queue tab there."""
import json, os, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parent.parent
W7 = ROOT/'build'/'ipywidgets7'
INSTALL = ("python -m pip install -q --target build/ipywidgets7 --no-deps 'ipywidgets>=7.8,<8' 'ipython_genutils==0.2.0'"
           "  (or: make install-dev)")

SCRIPT = r'''
import json, re, sys
import ipywidgets as W
from nbtrain.ui import TrainForm, _tip
out = {'version': W.__version__, 'file': W.__file__, 'tip': _tip()}
runs = sys.argv[1]
form = TrainForm({'preset': 'tiny-cpu', 'output_dir': runs, 'name': 'w7', 'data.corpus_size': 60, 'data.seq_len': 32,
                  'train.max_steps': 3}, background=True)
text = lambda h: re.sub('<[^>]+>', '', h)

def side_labels(w, acc):  # the HTML labels put before checkboxes: the text shown and its title (hover help)
    for c in getattr(w, 'children', ()):
        if isinstance(c, W.HBox) and len(c.children) > 1 and isinstance(c.children[0], W.HTML) and isinstance(c.children[1], W.Checkbox):
            m = re.search(r'title="([^"]*)"[^>]*>([^<]*)<', c.children[0].value)
            acc[id(c.children[1])] = (m.group(2), m.group(1)) if m else ('', '')
        side_labels(c, acc)
    return acc
checks = side_labels(form.widget, {})
problems = []
for key, w in form.fields.items():
    if isinstance(w, W.Checkbox):
        label, title = checks.get(id(w), ('', ''))
        if not label or not title: problems.append(f'{key}: checkbox without a side label and its help')
        if not w.description_tooltip: problems.append(f'{key}: checkbox without description_tooltip')
    else:
        if not w.description or '<' in w.description: problems.append(f'{key}: label {w.description!r}')
        if not w.description_tooltip: problems.append(f'{key}: no description_tooltip')
for name, w in [('name', form.name), ('preset', form.preset), ('output_dir', form.output_dir), ('runs found', form.runs_list)]:
    if w.description != name or not w.description_tooltip: problems.append(f'{name}: {w.description!r} {w.description_tooltip!r}')
out['problems'], out['fields'] = problems, len(form.fields)
out['titles'] = [form.tabs.get_title(i) for i in range(len(form.tabs.children))]
out['start'] = dict(train=form.train_button.disabled, stop=form.stop_button.disabled, resume=form.resume_button.disabled,
                    runs=form.runs_list.options[form.runs_list.index][0], status=text(form.status.value))
lr = form.fields['optim.lr']
lr.value = -0.5
out['bad'] = dict(error=text(form.errors['optim.lr'].value), train=form.train_button.disabled, tip=form.train_button.tooltip,
                  tab=form.tabs.get_title(form.tabs.selected_index), status=text(form.status.value))
lr.value = 0.003
out['good'] = dict(error=text(form.errors['optim.lr'].value), train=form.train_button.disabled, status=text(form.status.value))
print('RESULT ' + json.dumps(out))
'''

def test_form_under_ipywidgets7(tmp_path):
    if not (W7/'ipywidgets').is_dir(): pytest.skip(f'ipywidgets 7 is not installed in {W7}: run {INSTALL}')
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(W7), str(ROOT), os.environ.get('PYTHONPATH', '')]).rstrip(os.pathsep),
           'OMP_NUM_THREADS': '1'}
    p = subprocess.run([sys.executable, '-c', SCRIPT, str(tmp_path/'runs')], env=env, cwd=tmp_path, capture_output=True,
                       text=True, timeout=120)
    line = next((l for l in p.stdout.splitlines() if l.startswith('RESULT ')), None)
    assert p.returncode == 0 and line, p.stdout[-3000:] + p.stderr[-3000:]
    r = json.loads(line[len('RESULT '):])
    assert r['version'].startswith('7') and Path(r['file']).is_relative_to(W7), (r['version'], r['file'])
    assert r['tip'] == 'description_tooltip'
    assert r['problems'] == [] and r['fields'] > 100, r['problems']
    assert 'Queue' in r['titles'] and 'Training' in r['titles'], r['titles']
    s = r['start']
    assert not s['train'] and s['stop'] and s['resume'] and s['runs'] == '(no runs yet)', s  # nothing trains, no run yet
    assert s['status'].startswith('Ready to train'), s
    b = r['bad']
    assert b['error'].startswith('⚠ optim.lr=-0.5') and 'out of range' in b['error'], b
    assert b['train'] and 'Fix the field' in b['tip'] and b['tab'] == 'Training' and 'ConfigError' in b['status'], b
    g = r['good']
    assert g['error'] == '' and not g['train'] and g['status'].startswith('Ready to train'), g
