"""The README's pictures of the notebooks, taken in JupyterLab with headless Chromium: the training form while a run
trains, its live dashboard, and the template's checks report. Run it again when the form or the report changes:

    python tools/screenshots.py            # writes nbs/images/{form-training,dashboard,checks-report}.png

It drives the same session as the browser test (tests/labsession.py: JupyterLab on 127.0.0.1 with a token, the
notebooks parameterised for a tiny run, Chromium off the network) and needs what that test needs: Chromium and
chromedriver (apt-get install -y chromium chromium-driver) and the dev extra (jupyterlab, selenium). Each PNG is
cropped to the part of the page it shows and optimised to stay under 150 KB."""
import argparse, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT/'tests'))
from labsession import (ENV, TEMPLATE, TRAINING, Lab, button, cell_index, form_root, image_state, lab_browser, missing,  # noqa: E402
                        open_notebook, parameterised, progress, region_shot, run_cells, status, step_shown, tab, wait_for)

# a longer look than the test's: enough steps and evaluations for curves worth showing
RUN = {**TRAINING, 'overrides': {**TRAINING['overrides'], 'train.eval_every': 20, 'train.eval_batches': 2,
                                 'tracking.live_plot_every': 10}}
STEPS = 200  # the form is pictured once the run has come this far

def versions() -> str:
    from importlib.metadata import version
    return ', '.join(f'{p} {version(p)}' for p in ('jupyterlab', 'ipywidgets', 'selenium'))

def training(driver, lab, out:Path) -> list[Path]:
    from selenium.webdriver.common.by import By
    open_notebook(driver, lab, 'training.ipynb')
    run_cells(driver)
    form = form_root(driver)
    tab(form, 'Training').click()
    button(form, 'Train').click()
    img = form.find_element(By.CSS_SELECTOR, 'img.widget-image')
    wait_for(driver, lambda d: step_shown(form) >= STEPS and image_state(d, img)[1] > 0, 600, f'the run did not reach step {STEPS}')
    time.sleep(1)  # the dashboard drawn at that step
    bar = form.find_element(By.CSS_SELECTOR, '.widget-hprogress, .widget-progress')
    top = form.find_element(By.CSS_SELECTOR, '.widget-vbox')
    shots = [region_shot(driver, out/'form-training.png', top, bar), region_shot(driver, out/'dashboard.png', img)]
    button(form, 'Stop').click()
    wait_for(driver, lambda d: status(form).text.startswith('Done'), 120, 'Stop did not end the run')
    return shots

def template(driver, lab, out:Path) -> list[Path]:
    from selenium.webdriver.common.by import By
    open_notebook(driver, lab, 'template.ipynb')
    run_cells(driver, timeout=600)
    cell = driver.execute_script('return window.jupyterapp.shell.currentWidget.content.widgets[arguments[0]].node',
                                 cell_index(driver, 'report = run_checks('))
    table = cell.find_element(By.CSS_SELECTOR, '.jp-OutputArea-output table')
    return [region_shot(driver, out/'checks-report.png', table.find_element(By.XPATH, './preceding-sibling::p[1]'), table)]

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--out', default=str(ROOT/'nbs'/'images'), help='folder for the PNGs (default: nbs/images)')
    args = p.parse_args(argv)
    if (why := missing()): sys.exit(why)
    out = Path(args.out); out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)/'lab'; root.mkdir()
        parameterised(ROOT/'training.ipynb', root/'training.ipynb', RUN)
        parameterised(ROOT/'template.ipynb', root/'template.ipynb', TEMPLATE)
        with Lab(root, env=ENV) as lab:
            driver = lab_browser(1280, 2000)
            try: shots = training(driver, lab, out) + template(driver, lab, out)
            finally: driver.quit()
    for s in shots: print(f'{s.relative_to(ROOT) if s.is_relative_to(ROOT) else s}: {s.stat().st_size / 1024:.0f} KB')
    print(f'taken with {versions()}')
    return 0

if __name__ == '__main__': sys.exit(main())
