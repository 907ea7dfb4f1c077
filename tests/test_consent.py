"""Consent before code: a run's `model.py` runs only when the caller says `trust_code` in that call.

A run folder can be downloaded or shared, and its `final/model.py` then is someone else's code. Here a run is
trained from a file model whose `model.py` leaves a marker file when it is executed; the marker is deleted, and
every way nbtrain has of loading a model is pointed at the run folder and at its `final/`: without consent the
marker must not appear (and the error must say how to consent), with consent it must (which proves the path
really loads the code). The run's own config says `model.trust_code: true`, as every file-model run's does: it
must not count.
"""
import shutil
from pathlib import Path

import pytest

from hubserver import HubServer

FIXTURES = Path(__file__).parent/'fixtures'
TINY = {'train.max_steps': 2, 'train.eval_every': 2, 'train.log_every': 1, 'train.micro_batch_size': 4, 'train.eval_batches': 1,
        'train.progress_bar': False, 'data.corpus_size': 40, 'data.seq_len': 16}
TOKEN = 'hf_consent_token_0123456789'


@pytest.fixture(scope='module')
def planted(tmp_path_factory):
    "(run folder, marker path): a run trained from a model.py that writes the marker when executed."
    from nbtrain.trainer import train
    root = tmp_path_factory.mktemp('consent')
    marker, src = root/'model_py_ran', root/'model'
    src.mkdir()
    shutil.copyfile(FIXTURES/'gist_gpt'/'config.json', src/'config.json')
    (src/'model.py').write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
                                + (FIXTURES/'gist_gpt'/'model.py').read_text())
    run = train(overrides={**TINY, 'output_dir': str(root/'runs'), 'name': 'planted', 'model.name': 'file',
                           'model.path': str(src), 'model.trust_code': True}).run_dir
    assert marker.exists() and (run/'final'/'model.py').is_file()
    import yaml
    assert yaml.safe_load((run/'config.yaml').read_text())['model']['trust_code'] is True  # the folder's own setting
    return run, marker


def without_consent(marker, fn, *, words=('trust_code=True',)):
    "`fn()` raises an error naming how to consent, and model.py did not run."
    marker.unlink(missing_ok=True)
    with pytest.raises(Exception) as ei: fn()
    assert not marker.exists(), f'model.py ran without consent: {fn}'
    for w in words: assert w in str(ei.value), str(ei.value)
    return ei.value


def with_consent(marker, fn):
    "`fn()` runs model.py: the marker appears."
    marker.unlink(missing_ok=True)
    out = fn()
    assert marker.exists(), f'model.py did not run with consent: {fn}'
    marker.unlink()
    return out


def test_export_run_needs_consent_in_the_call(planted, tmp_path):
    from nbtrain.export import export_run
    run, marker = planted
    e = without_consent(marker, lambda: export_run(run, 'safetensors', tmp_path/'a', log=None))
    assert 'does not count' in str(e) and '--trust-code' in str(e) and 'final/model.py' in str(e).replace('\\', '/')
    without_consent(marker, lambda: export_run(run, 'safetensors', tmp_path/'b', trust_code=None, log=None))
    without_consent(marker, lambda: export_run(run, 'safetensors', tmp_path/'c', trust_code='yes', log=None), words=("trust_code='yes'",))
    rep = with_consent(marker, lambda: export_run(run, 'safetensors', tmp_path/'d', trust_code=True, log=None))
    assert rep.formats['safetensors']['passed']


def test_export_command_needs_the_flag(planted, tmp_path, capsys):
    from nbtrain.cli import main
    run, marker = planted
    marker.unlink(missing_ok=True)
    assert main(['export', str(run), '--formats', 'safetensors', '--out', str(tmp_path/'a')]) == 2
    assert not marker.exists()
    err = capsys.readouterr().err
    assert '--trust-code' in err and 'Traceback' not in err
    assert with_consent(marker, lambda: main(['export', str(run), '--formats', 'safetensors', '--out', str(tmp_path/'b'),
                                              '--trust-code'])) == 0


@pytest.mark.parametrize('where', ['run', 'final'])
def test_loaders_need_consent(planted, where):
    from nbtrain.hub import load_final
    from nbtrain.loading import load_model, resolve_model, load_final_folder
    run, marker = planted
    path = run if where == 'run' else run/'final'
    for fn in (load_final, load_model, resolve_model, load_final_folder):
        without_consent(marker, lambda: fn(path))
        without_consent(marker, lambda: fn(str(path)))
        with_consent(marker, lambda: fn(path, trust_code=True))


def test_checks_need_consent(planted, tmp_path, capsys):
    from nbtrain.cli import main
    from nbtrain.validate import run_checks
    run, marker = planted
    for path in (run, run/'final'):
        without_consent(marker, lambda: run_checks(str(path), checks=['shapes']))
    rep = with_consent(marker, lambda: run_checks(str(run/'final'), checks=['shapes'], trust_code=True))
    assert rep['shapes'].status in ('pass', 'warn')

    for path in (run, run/'final'):
        marker.unlink(missing_ok=True)
        assert main(['check', str(path), '--checks', 'shapes', '--out', str(tmp_path/'r')]) == 2
        assert not marker.exists()
        assert '--trust-code' in capsys.readouterr().err
    assert with_consent(marker, lambda: main(['check', str(run/'final'), '--checks', 'shapes', '--out', str(tmp_path/'r'),
                                              '--trust-code'])) == 0


def test_publishing_ships_the_code_without_running_it(planted, tmp_path, monkeypatch):
    from nbtrain.hub import load_from_hub, push_run, stage_repo
    run, marker = planted
    marker.unlink(missing_ok=True)
    folder = stage_repo(run, 'acme/planted', folder=tmp_path/'staged')
    assert (folder/'model.py').is_file() and not marker.exists()
    monkeypatch.setenv('HF_TOKEN', TOKEN)
    monkeypatch.setenv('HF_HUB_DISABLE_PROGRESS_BARS', '1')
    with HubServer(tokens={TOKEN: 'tester'}, orgs={'tester': ['acme']}) as hub:
        push_run(run, 'acme/planted', endpoint=hub.url, log=None)
        assert not marker.exists()
        without_consent(marker, lambda: load_from_hub('acme/planted', endpoint=hub.url, cache_dir=tmp_path/'c1'))
        with_consent(marker, lambda: load_from_hub('acme/planted', endpoint=hub.url, cache_dir=tmp_path/'c2', trust_code=True))


def test_legacy_functions_take_models_not_paths(planted):
    from nbtrain import legacy
    run, marker = planted
    marker.unlink(missing_ok=True)
    for path in (str(run), str(run/'final'), run/'final'):
        with pytest.raises(legacy.LegacyArgumentError, match='give a torch nn.Module'):
            legacy.test_shape_robustness(path, {'vocab_size': 96, 'max_seq_len': 64})
    with pytest.raises(Exception):
        legacy.load_baseline(str(run/'final'))  # a Hugging Face name or folder: transformers runs no model.py of ours
    assert not marker.exists()


def test_training_from_a_runs_config_needs_consent_in_the_call(planted, tmp_path):
    "A run folder's config.yaml (or any config file) cannot grant trust_code: `--config RUN/config.yaml` alone does not run model.py."
    from nbtrain.config import load_config
    from nbtrain.trainer import Trainer
    run, marker = planted
    over = {'output_dir': str(tmp_path/'runs'), 'name': 'again', 'train.max_steps': 1}
    with pytest.warns(UserWarning, match='is not taken from a file'):
        cfg = load_config(run/'config.yaml', overrides=over)
    without_consent(marker, lambda: Trainer(cfg))
    cfg = load_config(run/'config.yaml', overrides={**over, 'model.trust_code': True})
    with_consent(marker, lambda: Trainer(cfg))
