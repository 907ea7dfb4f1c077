"""The notebooks as a person sees them: training.ipynb and template.ipynb opened in JupyterLab (ipywidgets 8) in headless
Chromium, driven by Selenium. The form renders with its tabs, every field has a label and help on hover, the Queue tab
queues the form's run and cancels it, a bad value shows its message under the field and Train stays refused, Train draws the progress bar and the live dashboard in
the page, Stop ends the run with its checkpoint, the results show the dashboard image; the template's checks table
and plots render; the browser console stays free of errors.

Needs Chromium and chromedriver (Debian: `apt-get install -y chromium chromium-driver`, which `make test` runs as root
where they are missing) and the dev extra's jupyterlab and selenium; without them the tests skip, saying what to
install. Screenshots of each stage are written to the test's temporary folder (kept by pytest after a failure)."""
import json, os, time
from pathlib import Path
import pytest
from labsession import (ENV, TABS, TEMPLATE, TRAINING, Lab, parameterised, button, cell_index, console_errors, cut_tab_titles, field, field_error, form_root, image_state, label_problems,
                        lab_browser, missing, open_notebook, progress, run_cells, shot, status, step_shown, tab, tab_titles, type_into, wait_for)

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

@pytest.fixture(scope='module')
def page(tmp_path_factory):
    "JupyterLab serving copies of the two notebooks, and a headless Chromium on it; both stopped at the end."
    why = missing()
    if why: pytest.skip(why)
    root = tmp_path_factory.mktemp('lab')
    parameterised(ROOT/'training.ipynb', root/'training.ipynb', TRAINING)
    parameterised(ROOT/'template.ipynb', root/'template.ipynb', TEMPLATE)
    lab = Lab(root, env=ENV).start()
    driver = None
    try:
        driver = lab_browser()
        yield driver, lab, root/'screenshots'
    finally:
        if driver is not None: driver.quit()
        lab.stop()

class Evidence:
    "Screenshots of each stage; on a failure, one of the page as it was, and where they are."
    def __init__(self, driver, folder:Path): self.driver, self.folder, self.n, self.t = driver, folder, 0, time.monotonic()
    def __call__(self, name:str) -> Path:
        self.n += 1
        print(f'{name}: {time.monotonic() - self.t:.1f} s ({time.strftime("%H:%M:%S")})')
        return shot(self.driver, self.folder/f'{self.n:02d}-{name}.png')
    def __enter__(self): return self
    def __exit__(self, kind, e, tb):
        if kind is not None and kind is not pytest.skip.Exception:
            p = self('failure')
            (self.folder/'failure.html').write_text(self.driver.page_source)
            print(f'screenshots and the page at the failure: {self.folder} ({p.name})')

def no_widget_errors(driver):
    text = driver.execute_script('return document.querySelector(".jp-NotebookPanel:not(.lm-mod-hidden)").innerText')
    for bad in ('Error displaying widget', 'Loading widget', 'Failed to display'):
        assert bad not in text, f'the page says {bad!r}'

def selected(driver, select) -> tuple[int, str]:
    "A dropdown as the page shows it: its selected index (-1: none) and that option's text."
    return tuple(driver.execute_script('const s = arguments[0], i = s.selectedIndex;'
                                       'return [i, i < 0 ? "" : s.options[i].text.replace(/\\u00a0/g, " ")];', select))

def test_training_form(page):
    driver, lab, shots = page
    t0 = time.monotonic()
    with Evidence(driver, shots/'training') as snap:
        open_notebook(driver, lab, 'training.ipynb')
        run_cells(driver)  # Run All: the form appears; nothing trains until Train is pressed
        form = form_root(driver)
        driver.execute_script('arguments[0].scrollIntoView()', form)
        assert tab_titles(form) == TABS
        assert not cut_tab_titles(driver, form), cut_tab_titles(driver, form)
        no_widget_errors(driver)
        runs_found = field(form, 'runs found')
        assert selected(driver, runs_found) == (0, '(no runs yet)'), selected(driver, runs_found)  # shown, not an empty list
        snap('form')

        # every field a person can see: a label, and help on hover; in every tab and its "More settings"
        from selenium.webdriver.common.by import By
        labels = []
        for title in TABS:
            tab(form, title).click()
            for head in form.find_elements(By.CSS_SELECTOR, '.widget-tab-contents .jupyter-widget-Collapse-header'):
                if head.is_displayed(): head.click()
            seen, problems = label_problems(driver, form)
            assert not problems, f'{title} tab: {problems}'
            labels += seen
        assert {'optim.lr', 'train.max_steps', 'name', 'preset', 'runs found'} <= set(labels), labels
        assert len(labels) > 100, len(labels)  # every config field, each once
        snap('labels')

        # the Queue tab (open now): the form's run queued with a priority, listed, cancelled
        queue_table = form.find_element(By.XPATH, ".//div[contains(@class,'widget-html-content')][.//table or .//i[contains(., 'No jobs')]]")
        assert 'No jobs in the queue yet' in queue_table.text
        type_into(field(form, 'priority'), '3')
        button(form, 'Add to queue').click()
        wait_for(driver, lambda d: 'my-run' in queue_table.text and 'queued' in queue_table.text, 30, 'the job did not appear in the queue')
        snap('queue')
        cancel = button(form, 'Cancel job')
        assert cancel.is_enabled() and button(form, 'Start worker').is_enabled() and not button(form, 'Stop worker').is_enabled()
        cancel.click()
        wait_for(driver, lambda d: 'cancelled' in queue_table.text and not cancel.is_enabled(), 30, 'the job was not cancelled')

        # buttons: Train can act, Stop and Resume cannot (nothing trains, no run yet)
        train, stop, resume = button(form, 'Train'), button(form, 'Stop'), button(form, 'Resume selected')
        assert train.is_enabled() and not stop.is_enabled() and not resume.is_enabled()

        # a bad learning rate: its message in words under the field, Train refused
        tab(form, 'Training').click()
        lr = field(form, 'optim.lr')
        type_into(lr, '-0.5')
        err = wait_for(driver, lambda d: field_error(form, 'optim.lr').text.strip() or False, 30, 'no message under optim.lr')
        assert err.startswith('⚠ optim.lr=-0.5') and 'out of range' in err, err
        box, line = lr.rect, field_error(form, 'optim.lr').rect
        assert line['y'] >= box['y'] + box['height'] - 1, (box, line)  # under the field
        wait_for(driver, lambda d: not train.is_enabled(), 10, 'Train stayed enabled with a bad learning rate')
        assert 'ConfigError' in status(form).text and 'Fix the field' in train.get_attribute('title')
        train.click()  # refused: nothing starts
        time.sleep(0.5)
        assert not stop.is_enabled() and not (lab.root/'runs'/'my-run').exists()
        driver.execute_script('arguments[0].scrollIntoView({block: "center"})', lr)
        snap('bad-learning-rate')

        # a good one: the message goes, Train starts the run, the progress bar and the dashboard move in the page
        type_into(lr, '0.003')
        wait_for(driver, lambda d: train.is_enabled(), 30, 'Train stayed disabled after the value was fixed')
        assert field_error(form, 'optim.lr').text.strip() == '' and status(form).text.startswith('Ready to train')
        train.click()
        wait_for(driver, lambda d: stop.is_enabled() and not train.is_enabled() and not resume.is_enabled(), 30,
                 'the buttons did not follow the run')
        img = form.find_element(By.CSS_SELECTOR, 'img.widget-image')
        def drawn(d):
            step, src = step_shown(form), image_state(d, img)
            return (step, src[0]) if step >= 2 and src[1] > 0 else False
        step, src = wait_for(driver, drawn, 120, 'no progress or no dashboard in the page')
        wait_for(driver, lambda d: step_shown(form) > step + 4 and image_state(d, img)[0] != src and progress(form)[1] > 0, 60,
                 'the progress bar or the dashboard stopped updating')
        assert 'step ' in status(form).text and '/1000' in status(form).text
        driver.execute_script('arguments[0].scrollIntoView({block: "center"})', img)
        snap('training')

        # Stop: the run ends at a step with a checkpoint, and says so
        stop.click()
        done = wait_for(driver, lambda d: status(form).text if status(form).text.startswith('Done') else False, 120,
                        'Stop did not end the run')
        assert 'interrupted by the Stop button' in done and 'Checkpoint of step' in done, done
        wait_for(driver, lambda d: train.is_enabled() and not stop.is_enabled() and resume.is_enabled(), 30,
                 'the buttons did not come back after the run')
        wait_for(driver, lambda d: selected(d, runs_found)[0] == 0 and selected(d, runs_found)[1].startswith('my-run ('), 30,
                 f'the runs found list does not show the run: {selected(driver, runs_found)}')
        at = int(done.split('Checkpoint of step ')[1].split()[0])
        assert (lab.root/'runs'/'my-run'/'checkpoints'/f'step-{at:09d}'/'manifest.json').exists()
        snap('stopped')

        # the results section, run after training: the dashboard image from the run folder
        start = cell_index(driver, 'run_dir = form.result.run_dir')
        run_cells(driver, 'notebook:run-all-below', index=start)
        out = driver.execute_script('return window.jupyterapp.shell.currentWidget.content.widgets[arguments[0]].node', start)
        pic = wait_for(driver, lambda d: (out.find_elements(By.CSS_SELECTOR, '.jp-OutputArea-output img') or [False])[0], 30,
                       'no dashboard image in the results')
        wait_for(driver, lambda d: image_state(d, pic)[1] > 300, 30, 'the dashboard image did not load')
        driver.execute_script('arguments[0].scrollIntoView()', pic)
        no_widget_errors(driver)
        snap('results')
        assert console_errors(driver) == []
    print(f'training.ipynb in the browser: {time.monotonic() - t0:.1f} s')

def test_template_report(page):
    driver, lab, shots = page
    t0 = time.monotonic()
    from selenium.webdriver.common.by import By
    with Evidence(driver, shots/'template') as snap:
        open_notebook(driver, lab, 'template.ipynb')
        run_cells(driver, timeout=300)
        report = json.loads((lab.root/'model_report'/'report.json').read_text())
        names = [c['name'] for c in report['checks']]
        cell = driver.execute_script('return window.jupyterapp.shell.currentWidget.content.widgets[arguments[0]].node',
                                     cell_index(driver, 'report = run_checks('))
        table = cell.find_element(By.CSS_SELECTOR, '.jp-OutputArea-output table')
        rows = [[td.text.strip() for td in tr.find_elements(By.TAG_NAME, 'td')] for tr in table.find_elements(By.CSS_SELECTOR, 'tbody tr')]
        assert [r[0] for r in rows] == names and all(r[2] in ('pass', 'warn', 'fail', 'skipped', 'error') for r in rows), rows
        assert table.size['height'] > 20 * len(rows) and table.is_displayed()
        driver.execute_script('arguments[0].scrollIntoView()', table)
        snap('checks')
        plots = driver.execute_script('return window.jupyterapp.shell.currentWidget.content.widgets[arguments[0]].node',
                                      cell_index(driver, 'report_folder = report.save('))
        imgs = plots.find_elements(By.CSS_SELECTOR, '.jp-OutputArea-output img')
        figures = sum(len(c['figures']) for c in report['checks'])
        assert figures >= 3 and len(imgs) == figures, (figures, len(imgs))
        for img in imgs:
            driver.execute_script('arguments[0].scrollIntoView()', img)
            wait_for(driver, lambda d: image_state(d, img)[1] > 100, 30, 'a plot did not render')
        snap('plots')
        assert console_errors(driver) == []
    print(f'template.ipynb in the browser: {time.monotonic() - t0:.1f} s')
