"""The release path: CI runs the README's test command, a version tag publishes to PyPI by trusted publishing, and
every place that names the repository (pyproject's URLs, the Colab badges, the install cells) names the same one."""
import json, os, re, subprocess, tomllib
from pathlib import Path
import yaml

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = ROOT/'.github'/'workflows'
PROJECT = tomllib.loads((ROOT/'pyproject.toml').read_text())['project']

def workflow(name:str) -> dict:
    wf = yaml.safe_load((WORKFLOWS/name).read_text())
    wf['on'] = wf.pop(True, None) or wf.get('on')  # YAML 1.1 reads the key `on` as True
    return wf

def steps(job:dict) -> list[dict]: return job.get('steps', [])
def runs(wf:dict) -> list[str]: return [s['run'].strip() for j in wf['jobs'].values() for s in steps(j) if 'run' in s]

def test_ci_runs_the_readme_test_command_on_push_and_pull_request():
    wf = workflow('test.yaml')
    assert {'push', 'pull_request', 'workflow_call'} <= set(wf['on'])
    assert 'make test' in runs(wf)  # the README's command, as .ci/run runs it
    assert re.search(r'(?m)^make test$', (ROOT/'.ci'/'run').read_text()) and 'make test' in (ROOT/'README.md').read_text()
    job, = wf['jobs'].values()
    setup = next(s for s in steps(job) if s.get('uses', '').startswith('actions/setup-python@'))
    assert str(setup['with']['python-version']) == '3.11' and setup['with']['cache'] == 'pip'
    assert steps(job)[0]['uses'].startswith('actions/checkout@')
    pin = re.search(r'(?m)^TORCH_PIN \?= (\S+)$', (ROOT/'Makefile').read_text()).group(1)
    assert any(r.startswith(f'python -m pip install {pin} ') and '/whl/cpu' in r for r in runs(wf)), 'torch: the Makefile pin, CPU build'

def test_a_version_tag_tests_builds_and_publishes_by_trusted_publishing():
    wf = workflow('release.yaml')
    assert wf['on'] == {'push': {'tags': ['v*']}}
    jobs = wf['jobs']
    assert jobs['test']['uses'] == './.github/workflows/test.yaml'
    publishing = [n for n, j in jobs.items() if any(s.get('uses', '').startswith('pypa/gh-action-pypi-publish@') for s in steps(j))]
    assert publishing == ['publish']
    pub = jobs['publish']
    assert pub['permissions'] == {'id-token': 'write'} and pub['environment']['name'] == 'pypi'
    assert 'id-token' not in wf.get('permissions', {}) and all('id-token' not in j.get('permissions', {}) for n, j in jobs.items() if n != 'publish')
    text = (WORKFLOWS/'release.yaml').read_text()
    assert 'secrets.' not in text and 'password:' not in text  # no API token: PyPI trusts the workflow
    assert pub['needs'] == 'build' and jobs['build']['needs'] == 'test'  # nothing is published untested
    assert any('python -m build' in r for r in runs(wf)) and any('twine check' in r for r in runs(wf))

def _tag_check() -> str:
    job = workflow('release.yaml')['jobs']['build']
    return next(s['run'] for s in steps(job) if 'nbtrain.__version__' in s.get('run', ''))

def test_the_release_refuses_a_tag_that_is_not_the_version():
    from nbtrain import __version__
    check = lambda tag: subprocess.run(['bash', '-c', _tag_check()], cwd=ROOT, capture_output=True, text=True,
                                       env={**os.environ, 'GITHUB_REF_NAME': tag})
    r = check(f'v{__version__}')
    assert r.returncode == 0 and f'releasing nbtrain {__version__}' in r.stdout, r.stdout + r.stderr
    r = check('v99.0.0')
    assert r.returncode == 1 and f'does not match nbtrain.__version__ ({__version__})' in r.stdout

def _notebook_text(path:Path) -> str: return '\n'.join(''.join(c['source']) for c in json.loads(path.read_text())['cells'])

def test_one_repository_everywhere():
    url = PROJECT['urls']['Repository']
    owner, name = re.fullmatch(r'https://github\.com/([\w.-]+)/([\w.-]+)', url).groups()
    assert PROJECT['urls']['Documentation'] == f'https://{owner}.github.io/{name}/'
    assert f'repo-url: "{url}"' in (ROOT/'nbs'/'nbdev.yml').read_text()
    assert f'github.com/{owner}/{name}' in (WORKFLOWS/'release.yaml').read_text()
    for nb in [ROOT/'template.ipynb', ROOT/'training.ipynb', *sorted((ROOT/'colab_templates').glob('*.ipynb'))]:
        text = _notebook_text(nb)
        badges = re.findall(r'colab\.research\.google\.com/github/([\w.-]+/[\w.-]+)/blob/[\w.-]+/([\w./-]+\.ipynb)', text)
        assert badges, f'{nb.name}: no Colab badge'
        for repo, path in badges:
            assert repo == f'{owner}/{name}', f'{nb.name}: the Colab badge opens {repo}, pyproject says {owner}/{name}'
            assert (ROOT/path).resolve() == nb.resolve(), f'{nb.name}: its badge opens {path}'
        for owner_name in re.findall(r'(?<![\w.])github\.com/([\w.-]+/[\w.-]+)', text):  # install cells, links
            assert owner_name.removesuffix('.git') == f'{owner}/{name}', f'{nb.name} names github.com/{owner_name}'

def test_install_cells_install_what_the_release_publishes():
    for nb in (ROOT/'template.ipynb', ROOT/'training.ipynb'):
        cells = [''.join(c['source']) for c in json.loads(nb.read_text())['cells'] if c['cell_type'] == 'code']
        installs = [c for c in cells if re.search(r"'pip',\s*'install'", c)]
        assert installs, f'{nb.name}: no install cell'
        for c in installs:  # 'nbtrain', 'nbtrain[train]', f'nbtrain>={version}', "nbtrain @ {source}": the project on PyPI
            assert re.search(rf"""['"]{re.escape(PROJECT['name'])}(\[[\w,]+\])?(['"]|\s*(>=|==|~=|@))""", c), (nb.name, c)
