"""The install cells of template.ipynb and training.ipynb, taken from the notebooks as they are, run in a fresh virtual
environment where nbtrain is absent, as in a new Colab runtime: from the package index when nbtrain is there (a stand-in
index on 127.0.0.1 holding a wheel built from this checkout), else from the project's repository at the release tag
(a local clone standing in for GitHub) or from the source the environment names. Nothing leaves this machine."""
import functools, http.server, importlib.metadata, json, os, shutil, subprocess, sys, threading, zipfile
from pathlib import Path
import pytest
import nbtrain

ROOT = Path(__file__).resolve().parent.parent
REPO_URL = 'https://github.com/nbtrain/nbtrain'

def install_code(nb_path:Path) -> str:
    "The notebook's code cells before its parameters, up to and including the one that calls pip: what a user runs first."
    cells = [c for c in json.loads(nb_path.read_text())['cells'] if c['cell_type'] == 'code']
    code = []
    for c in cells:
        src = ''.join(c['source'])
        assert 'parameters' not in c['metadata'].get('tags', []), f'no pip install before the parameters of {nb_path.name}'
        code.append(src)
        if "'pip'" in src: return '\n'.join(code)

def _py(venv:Path) -> Path: return venv/'bin'/'python'

@pytest.fixture(scope='module')
def wheel(tmp_path_factory) -> Path:
    "A wheel of nbtrain built from a copy of this checkout (`pip wheel --no-deps .`), offline."
    tmp = tmp_path_factory.mktemp('wheel')
    src = tmp/'src'
    shutil.copytree(ROOT/'nbtrain', src/'nbtrain', ignore=shutil.ignore_patterns('__pycache__'))
    for f in ('pyproject.toml', 'README.md', 'LICENSE'):
        if (ROOT/f).exists(): shutil.copy(ROOT/f, src/f)
    out = tmp/'wheels'
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', '-q', '--no-deps', '--no-build-isolation', '-w', str(out), str(src)],
                   env={**_clean_env(), 'PIP_NO_INDEX': '1'}, check=True, capture_output=True)
    (whl,) = out.glob('nbtrain-*.whl')
    return whl

def _clean_env() -> dict:
    "This environment without pip settings of its own (config files, indexes, find-links, constraints)."
    env = {k: v for k, v in os.environ.items() if not k.startswith(('PIP_', 'NBTRAIN_', 'GIT_CONFIG', 'VIRTUAL_ENV', 'PYTHON'))}
    return {**env, 'PIP_CONFIG_FILE': os.devnull, 'PIP_DISABLE_PIP_VERSION_CHECK': '1', 'PYTHONNOUSERSITE': '1'}

@pytest.fixture
def venv(tmp_path) -> Path:
    "A fresh virtual environment (pip only): no nbtrain, as in a new Colab runtime."
    v = tmp_path/'venv'
    subprocess.run([sys.executable, '-m', 'venv', str(v)], check=True, capture_output=True)
    r = subprocess.run([_py(v), '-c', 'import importlib.util; print(importlib.util.find_spec("nbtrain"))'],
                       capture_output=True, text=True, env=_clean_env(), cwd=tmp_path)
    assert r.stdout.strip() == 'None', r.stdout
    return v

class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args): pass

@pytest.fixture
def index(tmp_path):
    "A stand-in package index (PEP 503 folders served by http.server on 127.0.0.1): yields (its /simple/ folder, its URL)."
    simple = tmp_path/'index'/'simple'
    simple.mkdir(parents=True)
    handler = functools.partial(_QuietHandler, directory=str(simple.parent))
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield simple, f'http://127.0.0.1:{server.server_address[1]}/simple/'
    server.shutdown(); server.server_close()

def publish(simple:Path, whl:Path):
    "Put `whl` on the stand-in index (a project folder per name, as PyPI's simple API lists them)."
    d = simple/whl.name.split('-')[0].lower().replace('_', '-')
    d.mkdir(exist_ok=True)
    shutil.copy(whl, d/whl.name)

def run_cell(nb:str, venv:Path, index_url:str, tmp_path:Path, **env) -> str:
    "Run `nb`'s install code with the venv's python against the stand-in index; return what it printed."
    full = {**_clean_env(), 'PIP_INDEX_URL': index_url, 'PIP_CACHE_DIR': str(tmp_path/'pip-cache'), 'PIP_DEFAULT_TIMEOUT': '20',
            'PIP_RETRIES': '0', **env}
    r = subprocess.run([_py(venv), '-c', install_code(ROOT/nb)], env=full, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout

def installed(venv:Path, cwd:Path) -> str:
    "The nbtrain version installed in `venv`, after checking its stdlib-only gist module imports there."
    r = subprocess.run([_py(venv), '-c', 'import importlib.metadata, nbtrain.gist; print(importlib.metadata.version("nbtrain"))'],
                       capture_output=True, text=True, env=_clean_env(), cwd=cwd)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()

@pytest.mark.parametrize('nb', ['template.ipynb', 'training.ipynb'])
def test_install_cells_name_the_release_of_this_checkout(nb):
    code = install_code(ROOT/nb)
    ns = {}
    exec(code.split('\ndef ')[0].split('\nif ')[0], ns)  # the imports and the variables at the top of the cell
    assert ns['nbtrain_version'] == nbtrain.__version__, 'bump the version in the install cell with the release'
    assert ns['nbtrain_repo'] == REPO_URL and ns['nbtrain_tag'] == f'v{nbtrain.__version__}'
    assert not any(w in code for w in ('torch', 'numpy', '--upgrade', '-U', '--force'))  # never replaces Colab's packages

@pytest.mark.slow
@pytest.mark.parametrize('nb', ['template.ipynb', 'training.ipynb'])
def test_from_the_package_index(nb, venv, index, wheel, tmp_path):
    simple, url = index
    publish(simple, wheel)
    # the template installs without dependencies, which the index does not have; training's dependencies would be
    # many downloads: left out here (PIP_NO_DEPS) since they are lower bounds that Colab's packages satisfy
    out = run_cell(nb, venv, url, tmp_path, **({'PIP_NO_DEPS': '1'} if nb == 'training.ipynb' else {}))
    assert f'nbtrain {nbtrain.__version__} installed from PyPI' in out, out
    assert len(out.strip().splitlines()) == 1, out
    assert installed(venv, tmp_path) == nbtrain.__version__

@pytest.mark.slow
def test_not_on_the_index_falls_back_to_the_source_given(venv, index, wheel, tmp_path):
    simple, url = index  # nbtrain is not on it
    out = run_cell('template.ipynb', venv, url, tmp_path, NBTRAIN_PIP_SOURCE=str(wheel))
    assert out.strip() == f'nbtrain {nbtrain.__version__} installed from {wheel} (not on PyPI yet)', out
    assert installed(venv, tmp_path) == nbtrain.__version__

def _wheel_of_installed(dist:str, dest:Path) -> Path:
    "A wheel of a distribution installed here, packed from its files (to build nbtrain from source offline)."
    d = importlib.metadata.distribution(dist)
    whl = dest/f"{d.metadata['Name'].replace('-', '_')}-{d.version}-py3-none-any.whl"
    with zipfile.ZipFile(whl, 'w') as z:
        for f in d.files:
            p = Path(d.locate_file(f))
            if not str(f).startswith('..') and '__pycache__' not in f.parts and p.is_file(): z.write(p, str(f))
    return whl

@pytest.mark.slow
def test_not_on_the_index_falls_back_to_the_release_tag(venv, index, tmp_path):
    "The default fallback, git+https://github.com/nbtrain/nbtrain@v<version>, built from source by pip; git is told to read a local clone for that URL."
    simple, url = index  # no nbtrain; the build backend (setuptools) only, as pip needs it to build from source
    publish(simple, _wheel_of_installed('setuptools', tmp_path))
    clone = tmp_path/'nbtrain-repo'
    subprocess.run(['git', 'clone', '-q', str(ROOT), str(clone)], check=True, capture_output=True)
    subprocess.run(['git', '-C', str(clone), 'tag', '-f', f'v{nbtrain.__version__}'], check=True, capture_output=True)
    git = {'GIT_CONFIG_COUNT': '1', 'GIT_CONFIG_KEY_0': f'url.{clone.as_uri()}.insteadOf', 'GIT_CONFIG_VALUE_0': REPO_URL,
           'GIT_TERMINAL_PROMPT': '0'}
    out = run_cell('training.ipynb', venv, url, tmp_path, PIP_NO_DEPS='1', **git)
    assert out.strip() == (f'nbtrain {nbtrain.__version__} installed from git+{REPO_URL}@v{nbtrain.__version__} (not on PyPI yet), '
                           f'with its training extras'), out
    r = subprocess.run([_py(venv), '-m', 'pip', 'show', 'nbtrain'], capture_output=True, text=True, env=_clean_env(), cwd=tmp_path)
    assert f'Version: {nbtrain.__version__}' in r.stdout
