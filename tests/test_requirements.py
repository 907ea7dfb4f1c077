"""The declared requirements are true: every module imports with only the base requirements installed, an entry point
that needs an extra says which `pip install 'nbtrain[...]'` brings it, and every extra named anywhere exists.

The base-only interpreter is this one with every installed package hidden that the base requirements (and what
they require in turn) do not bring: a meta-path wrapper makes the import system answer "no such module" for them,
exactly as on a machine where they were never installed."""
import json, re, subprocess, sys, textwrap, tomllib
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT/'pyproject.toml').read_text())
EXTRAS = PYPROJECT['project']['optional-dependencies']
MODULES = sorted(f'nbtrain.{p.stem}' for p in (ROOT/'nbtrain').glob('*.py') if p.stem != '__main__')
# Modules (outside this test's reach) that import an extra at module level today; each is expected to fail until its
# import is made lazy, and then this list must shrink (strict xfail).
KNOWN_EAGER = {}  # module -> what it imports at module level that it should not (none now)

# Runs in the child: which top-level modules the base requirements bring, and a wrapper that hides the others.
HIDE = textwrap.dedent('''
    import sys, importlib.metadata as md, json
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name as canon
    base = json.loads(sys.argv[1])
    def reqs(dist, extras=()):
        out = []
        for r in md.requires(dist) or []:
            r = Requirement(r)
            if r.marker is None or any(r.marker.evaluate({'extra': e}) for e in ('', *extras)): out.append(r)
        return out
    seen, todo = set(), [Requirement(r) for r in base]
    while todo:
        r = todo.pop()
        if canon(r.name) in seen: continue
        try: md.distribution(r.name)
        except md.PackageNotFoundError: continue
        seen.add(canon(r.name))
        todo += reqs(r.name, r.extras)
    owners = md.packages_distributions()
    ALLOWED = {m for m, ds in owners.items() if any(canon(d) in seen for d in ds)} | {'nbtrain'}
    BLOCKED = {m for m in owners if m not in ALLOWED and m not in sys.stdlib_module_names and not m.startswith('_')}
    class Hide:
        "A meta-path finder's stand-in: hidden packages are not found, as if never installed."
        def __init__(self, inner): self.inner = inner
        def find_spec(self, name, path=None, target=None):
            if name.partition('.')[0] in BLOCKED: return None
            f = getattr(self.inner, 'find_spec', None)
            return f(name, path, target) if f else None
        def __getattr__(self, a): return getattr(self.inner, a)
    already = sorted({m.partition('.')[0] for m in sys.modules} & BLOCKED)  # by site hooks, before this ran: forgotten
    for m in [m for m in sys.modules if m.partition('.')[0] in BLOCKED]: del sys.modules[m]
    sys.meta_path[:] = [Hide(f) for f in sys.meta_path]
''')


def run_base_only(body:str, timeout=240) -> dict:
    "Run `body` (which sets `result`) in a child interpreter that sees only the base requirements; its `result`, as JSON."
    code = HIDE + textwrap.dedent(body) + '\nprint("RESULT=" + json.dumps(result))\n'
    r = subprocess.run([sys.executable, '-c', code, json.dumps(PYPROJECT['project']['dependencies'])], capture_output=True,
                       text=True, timeout=timeout, cwd=ROOT, env={**__import__('os').environ, 'PYTHONWARNINGS': 'ignore'})
    line = next((l for l in r.stdout.splitlines() if l.startswith('RESULT=')), None)
    assert line, f'the child failed (exit {r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}'
    return json.loads(line[len('RESULT='):])


@pytest.fixture(scope='module')
def imports() -> dict:
    "Every nbtrain module imported in one base-only interpreter: {module: None or the error}, plus what was hidden."
    return run_base_only(f'''
        import importlib, traceback
        errors = {{}}
        for m in {MODULES!r}:
            try: importlib.import_module(m); errors[m] = None
            except BaseException as e:
                tb = traceback.extract_tb(e.__traceback__)
                at = next((f'{{f.filename}}:{{f.lineno}}' for f in reversed(tb) if '/nbtrain/' in f.filename), '?')
                errors[m] = f'{{type(e).__name__}}: {{e}} (at {{at}})'
        result = dict(errors=errors, blocked=sorted(BLOCKED), already=already)
    ''')


def test_the_extras_are_hidden(imports):
    "The check means something: the extras' packages are hidden, the base requirements are not."
    blocked = set(imports['blocked'])
    assert {'transformers', 'datasets', 'tokenizers', 'wandb', 'tensorboard', 'optuna', 'onnx', 'onnxruntime',
            'huggingface_hub', 'ipywidgets', 'pandas', 'pyarrow', 'sklearn'} <= blocked
    assert not blocked & {'torch', 'numpy', 'yaml', 'tqdm', 'matplotlib', 'safetensors', 'lightning_fabric', 'fastcore'}
    assert 'PIL' not in blocked  # matplotlib requires pillow: images work with the base requirements
    assert not set(imports['already']) & {'transformers', 'wandb', 'optuna', 'huggingface_hub', 'ipywidgets'}, imports['already']


@pytest.mark.parametrize('module', [pytest.param(m, marks=pytest.mark.xfail(strict=True, reason=f'imports {KNOWN_EAGER[m]} at module level'))
                                    if m in KNOWN_EAGER else m for m in MODULES])
def test_module_imports_with_base_requirements_only(imports, module):
    assert imports['errors'][module] is None, f"{module} needs an extra to import: {imports['errors'][module]}"


def extra_packages(name:str, seen=()) -> set[str]:
    "The distribution names extra `name` installs, following nbtrain[...] self-references."
    out = set()
    for r in EXTRAS[name]:
        m = re.match(r'nbtrain\[([^\]]+)\]', r)
        if m: out |= set().union(*(extra_packages(e.strip(), (*seen, name)) for e in m.group(1).split(',') if e.strip() not in seen))
        else: out.add(re.split(r'[<>=!~;\[ ]', r, 1)[0].lower().replace('_', '-'))
    return out

# an entry point that needs an extra, the package it needs (distribution name) and the code that reaches it
ENTRY_POINTS = {
    'W&B tracker': ('wandb', "from nbtrain.tracking import WandbTracker; WandbTracker(None)"),
    'TensorBoard tracker': ('tensorboard', "from nbtrain.tracking import TensorBoardTracker; TensorBoardTracker(None)"),
    'Hugging Face model': ('transformers', "from nbtrain.loading import resolve_model; resolve_model('hf:gpt2')"),
    'nbtrain search': ('optuna', "from nbtrain.cli import main; main(['search'])"),
    'Hub download': ('huggingface-hub', "from nbtrain.hub import load_from_hub; load_from_hub('me/model')"),
    'ONNX export': ('onnxruntime', "from pathlib import Path; from nbtrain.export import export_onnx; export_onnx(None, (), [], Path('m.onnx'))"),
    'BPE tokenizer': ('tokenizers', "from nbtrain.tokenizer import BPETokenizer; BPETokenizer.train(['a b c'] * 10, vocab_size=300)"),
}

@pytest.fixture(scope='module')
def messages() -> dict:
    return run_base_only(f'''
        import contextlib, io
        result = {{}}
        for what, code in {({k: v[1] for k, v in ENTRY_POINTS.items()})!r}.items():
            out = io.StringIO()
            try:
                with contextlib.redirect_stderr(out), contextlib.redirect_stdout(out): exec(code)
                result[what] = 'no error: ' + out.getvalue()
            except BaseException as e: result[what] = f'{{type(e).__name__}}: {{e}} ' + out.getvalue()
    ''')

@pytest.mark.parametrize('what', list(ENTRY_POINTS))
def test_missing_extra_names_the_extra_that_brings_it(messages, what):
    package, _ = ENTRY_POINTS[what]
    msg = messages[what]
    named = re.findall(r"nbtrain\[([\w,-]+)\]", msg)
    assert named, f'{what} without {package}: the message names no nbtrain[...] extra: {msg}'
    extras = {e for n in named for e in n.split(',')}
    assert extras <= set(EXTRAS), f'{what}: {msg} names an extra that does not exist (extras: {sorted(EXTRAS)})'
    assert any(package in extra_packages(e) for e in extras), f"{what}: {msg} names {sorted(extras)}, which do not install {package}"


def named_extras() -> list[tuple[str, str]]:
    "(file, extra) for every nbtrain[...] install line in the package, the notebooks, the README and the templates."
    files = [*(ROOT/'nbtrain').glob('*.py'), *(ROOT/'nbs').glob('*.ipynb'), ROOT/'README.md', *ROOT.glob('*.ipynb'),
             *(ROOT/'colab_templates').glob('*.ipynb'), ROOT/'Makefile']
    out = []
    for f in files:
        if not f.is_file(): continue
        for group in re.findall(r"nbtrain\[([A-Za-z0-9_,\s-]+)\]", f.read_text(encoding='utf-8')):
            out += [(str(f.relative_to(ROOT)), e.strip()) for e in group.split(',')]
    return out

def test_every_named_extra_exists():
    found = named_extras()
    assert {e for _, e in found} >= {'train', 'tracking'}  # the scan finds the install lines
    missing = sorted({(f, e) for f, e in found if e not in EXTRAS})
    assert not missing, f'extras named but not declared in pyproject.toml ({sorted(EXTRAS)}): {missing}'

def test_extras_resolve():
    "Every extra resolves to real distributions (self-references included); train brings the trackers and the Hub client."
    for name in EXTRAS: assert extra_packages(name), name
    assert {'wandb', 'tensorboard', 'huggingface-hub', 'onnx', 'optuna', 'transformers'} <= extra_packages('train')
