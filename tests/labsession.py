"""JupyterLab on 127.0.0.1 and headless Chromium driven by Selenium: the page a person sees, for the browser test
(tests/test_browser.py) and the README's screenshots (tools/screenshots.py).

Each part is real: the Lab server, its kernel (this Python), Chromium and chromedriver from the system's packages.
`Lab` starts the server in a folder of its own (settings, workspaces and kernelspec there too, so nothing of the
machine's own Jupyter setup is read or written); `lab_browser` opens Chromium on it; the helpers below run a
notebook's cells and wait for what a person would wait for. Timeouts are generous but bounded: a slow machine
makes the test slower, not flaky."""
from __future__ import annotations
import base64, contextlib, io, json, os, secrets, shutil, socket, subprocess, sys, time, urllib.request
from pathlib import Path

INSTALL = 'apt-get install -y chromium chromium-driver'  # Debian's packages (the README's test command runs it as root)
PIP = 'pip install jupyterlab selenium'  # in the dev extra

# a tiny run that would go on for long (Stop ends it), drawing the live dashboard every other step
TRAINING = {'use_drive': False, 'max_steps': 1000, 'generate_tokens': 12,
            'overrides': {'data.corpus_size': 60, 'data.seq_len': 32, 'train.micro_batch_size': 4, 'train.eval_every': 8,
                          'train.eval_batches': 1, 'train.log_every': 2, 'checkpoint.every_steps': 500,
                          'tracking.live_plot_every': 2, 'tracking.live_plot_min_interval_s': 0.0}}
TEMPLATE = {'source': 'reference', 'reference': 'gpt', 'size': 'tiny', 'batch_size': 2, 'seq_len': 32, 'overfit_steps': 20,
            'speed_seconds': 0.2}
# the kernel: one intra-op thread (tiny models, busy machines), nothing from the network, no Drive
ENV = {'OMP_NUM_THREADS': '1', 'HF_HUB_OFFLINE': '1', 'WANDB_MODE': 'offline', 'WANDB_SILENT': 'true', 'NBTRAIN_DRIVE': ''}
TABS = ['Model', 'Task', 'Data', 'Training', 'Checkpoints', 'Tracking', 'LoRA', 'Evaluation', 'Queue']

def parameterised(src:Path, dest:Path, params:dict) -> Path:
    "A copy of the notebook `src` with `params` injected after its parameters cell, as papermill does."
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook
    import nbformat
    nb = parameterize_notebook(load_notebook_node(str(src)), params)
    nbformat.write(nb, str(dest))
    return dest

def chromium_paths() -> tuple[str|None, str|None]:
    "Chromium and its chromedriver, from PATH (Debian: /usr/bin/chromium, /usr/bin/chromedriver)."
    browser = next((p for p in map(shutil.which, ('chromium', 'chromium-browser', 'google-chrome')) if p), None)
    return browser, shutil.which('chromedriver')

def missing() -> str|None:
    "What this machine lacks for a browser session, as the command that installs it; None when nothing is missing."
    browser, driver = chromium_paths()
    if not (browser and driver): return f'Chromium and chromedriver are not installed: {INSTALL}'
    import importlib.util
    lacking = [m for m in ('selenium', 'jupyterlab') if importlib.util.find_spec(m) is None]
    if lacking: return f"{' and '.join(lacking)} not installed: {PIP} (or pip install -e '.[dev]')"
    return None

def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]

# JupyterLab's own chatter, off: no news or update notices over the page, no "what's new" panels
SETTINGS = {'@jupyterlab/apputils-extension/notification.jupyterlab-settings': {'fetchNews': 'false', 'checkForUpdates': False},
            '@jupyterlab/notebook-extension/tracker.jupyterlab-settings': {'windowingMode': 'none'}}

class Lab:
    "JupyterLab serving `root` on 127.0.0.1 with a token; its kernel is this Python. A context manager: stopped on exit."
    def __init__(self, root, env:dict|None=None, timeout:float=120):
        self.root, self.timeout = Path(root), timeout
        self.port, self.token = free_port(), secrets.token_hex(16)
        self.home = self.root.parent/f'.{self.root.name}-jupyter'
        self.env = {**os.environ, **(env or {})}
        self.proc, self.log = None, None

    @property
    def url(self) -> str: return f'http://127.0.0.1:{self.port}'

    def _prepare(self):
        data = self.home/'data'
        spec = data/'kernels'/'python3'
        spec.mkdir(parents=True, exist_ok=True)  # the first kernelspec Jupyter finds: this Python, whatever else is installed
        (spec/'kernel.json').write_text(json.dumps({'argv': [sys.executable, '-m', 'ipykernel_launcher', '-f', '{connection_file}'],
                                                    'display_name': 'python3', 'language': 'python'}))
        for name, value in SETTINGS.items():
            f = self.home/'settings'/name
            f.parent.mkdir(parents=True, exist_ok=True); f.write_text(json.dumps(value))
        (self.home/'workspaces').mkdir(exist_ok=True)
        (self.home/'runtime').mkdir(exist_ok=True)
        self.env.update(JUPYTER_DATA_DIR=str(data), JUPYTER_CONFIG_DIR=str(self.home/'config'), JUPYTER_RUNTIME_DIR=str(self.home/'runtime'),
                        JUPYTERLAB_SETTINGS_DIR=str(self.home/'settings'), JUPYTERLAB_WORKSPACES_DIR=str(self.home/'workspaces'),
                        JUPYTER_PLATFORM_DIRS='1', PYDEVD_DISABLE_FILE_VALIDATION='1')
        self.env.pop('JUPYTER_PATH', None)

    def start(self) -> 'Lab':
        self._prepare()
        self.log = open(self.home/'server.log', 'wb')
        cmd = [sys.executable, '-m', 'jupyterlab', '--no-browser', f'--ServerApp.port={self.port}', '--ServerApp.port_retries=0',
               '--ServerApp.ip=127.0.0.1', f'--IdentityProvider.token={self.token}', f'--ServerApp.root_dir={self.root}',
               '--ServerApp.open_browser=False', '--LabApp.expose_app_in_browser=True', '--LabApp.news_url=None',
               '--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate', '--ServerApp.terminals_enabled=False']
        if hasattr(os, 'geteuid') and os.geteuid() == 0: cmd.append('--allow-root')  # CI and containers run as root
        self.proc = subprocess.Popen(cmd, cwd=self.root, env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.timeout
        while True:
            if self.proc.poll() is not None: raise RuntimeError(f'JupyterLab exited ({self.proc.returncode}):\n{self.server_log()[-3000:]}')
            try:
                with urllib.request.urlopen(f'{self.url}/api/status?token={self.token}', timeout=5) as r:
                    if r.status == 200: return self
            except OSError: pass
            if time.monotonic() > deadline: raise TimeoutError(f'JupyterLab did not answer in {self.timeout:.0f} s:\n{self.server_log()[-3000:]}')
            time.sleep(0.2)

    def server_log(self) -> str:
        try: return (self.home/'server.log').read_text(errors='replace')
        except OSError: return ''

    def stop(self):
        "The server and its kernels (one process group), politely, then for sure."
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, 15)
            try: self.proc.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError): os.killpg(self.proc.pid, 9)
                self.proc.wait(10)
        if self.log: self.log.close()

    def notebook_url(self, path:str) -> str: return f'{self.url}/lab/tree/{path}?token={self.token}&reset'
    def __enter__(self): return self.start()
    def __exit__(self, *exc): self.stop()


def lab_browser(width:int=1400, height:int=1000):
    "Headless Chromium with its console log kept (goog:loggingPrefs), through the system's chromedriver."
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    browser, driver = chromium_paths()
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for a in ('--headless=new', '--no-sandbox', '--disable-dev-shm-usage', '--disable-gpu', f'--window-size={width},{height}',
              '--force-device-scale-factor=1', '--no-first-run', '--no-default-browser-check', '--disable-extensions',
              '--disable-background-networking', '--disable-component-update', '--disable-sync', '--metrics-recording-only',
              '--disable-features=Translate,MediaRouter,OptimizationHints',
              # the page reaches only this machine: other hosts (a badge image in a notebook) fail at once, offline or not
              '--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1'):
        opts.add_argument(a)
    opts.set_capability('goog:loggingPrefs', {'browser': 'ALL'})
    d = webdriver.Chrome(options=opts, service=Service(driver))
    d.set_page_load_timeout(120)
    d.set_script_timeout(60)
    return d


def wait_for(driver, what, timeout:float=60, message:str=''):
    "Poll `what(driver)` until it returns something truthy (returned), or fail with `message` after `timeout` s."
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, timeout, poll_frequency=0.25).until(what, message)

# the notebook in the main area, seen through JupyterLab's own objects (window.jupyterapp)
NB_STATE = """
const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
if (!w || !w.content || !w.content.widgets || !w.sessionContext) return null;
const k = w.sessionContext.session && w.sessionContext.session.kernel;
const cells = w.content.widgets.filter(c => c.model.type === 'code');
const errors = [];
cells.forEach((c, i) => { const o = c.model.outputs; for (let j = 0; j < o.length; j++) { const x = o.get(j).toJSON();
  if (x.output_type === 'error') errors.push(`cell ${i}: ${x.ename}: ${x.evalue}`); } });
return {kernel: k ? k.status : null, ready: w.context.isReady && w.sessionContext.isReady, n: cells.length,
        pending: cells.filter(c => c.promptNode && /\\*/.test(c.promptNode.textContent)).length,
        unrun: cells.filter(c => c.model.executionCount === null).length, errors: errors};
"""

def notebook_state(driver) -> dict|None: return driver.execute_script(NB_STATE)

def open_notebook(driver, lab:Lab, path:str, timeout:float=120):
    "Open `path` in JupyterLab and wait until its kernel is started and idle."
    driver.get(lab.notebook_url(path))
    def ready(d):
        s = notebook_state(d)
        return s if s and s['ready'] and s['kernel'] == 'idle' else False
    return wait_for(driver, ready, timeout, f'{path}: the notebook did not open with an idle kernel in {timeout:.0f} s')

def run_cells(driver, command:str='notebook:run-all-cells', index:int|None=None, timeout:float=300) -> dict:
    """Run cells as the Run menu does (`command`, from the cell at `index` for the '-below' ones), and wait until every
    cell has run and the kernel is idle again. Fails with the first error a cell raised."""
    if index is not None:
        driver.execute_script('const nb = window.jupyterapp.shell.currentWidget.content; nb.activeCellIndex = arguments[0];'
                              'nb.deselectAll();', index)
    driver.execute_script('window.jupyterapp.commands.execute(arguments[0]);', command)
    time.sleep(0.5)  # the command queues the cells: the kernel turns busy
    def done(d):
        s = notebook_state(d)
        if s and s['errors']: raise AssertionError('A cell raised: ' + '; '.join(s['errors']))
        return s if s and s['kernel'] == 'idle' and s['pending'] == 0 else False
    return wait_for(driver, done, timeout, f'{command}: the cells did not finish in {timeout:.0f} s')

def cell_index(driver, text:str) -> int:
    "The index of the first cell whose source contains `text`."
    i = driver.execute_script('return window.jupyterapp.shell.currentWidget.content.widgets'
                              '.findIndex(c => c.model.sharedModel.getSource().includes(arguments[0]));', text)
    assert i >= 0, f'no cell contains {text!r}'
    return i

def console_errors(driver) -> list[str]:
    """The browser console's errors since the last call, less the failed loads of other hosts than this one (the
    browser is kept off the network: a notebook's Colab badge cannot load)."""
    local = ('http://127.0.0.1', 'ws://127.0.0.1', 'blob:', 'data:')
    return [e['message'] for e in driver.get_log('browser')
            if e['level'] == 'SEVERE' and not (e.get('source') == 'network' and not e['message'].startswith(local))]

def shot(driver, path, element=None, max_kb:int|None=None) -> Path:
    "A PNG of the page (or of `element`); with `max_kb`, optimised (Pillow, palette) to stay under that size."
    path = Path(path); path.parent.mkdir(parents=True, exist_ok=True)
    if element is None and max_kb is None:
        driver.save_screenshot(str(path)); return path
    data = element.screenshot_as_png if element is not None else driver.get_screenshot_as_png()
    if max_kb is None:
        path.write_bytes(data); return path
    tmp = path.with_suffix('.full.png'); tmp.write_bytes(data)
    try: return _optimised(tmp, path, max_kb)
    finally: tmp.unlink(missing_ok=True)

def region_shot(driver, path, first, last=None, pad:int=6, max_kb:int=150) -> Path:
    """A small PNG of the page from element `first` down to element `last` (default: `first` alone), as the viewport
    shows them (scrolled so `first` is at the top), optimised to stay under `max_kb`."""
    from PIL import Image
    driver.execute_script('arguments[0].scrollIntoView({block: "start"})', first)
    time.sleep(0.3)
    box = driver.execute_script('''const a = arguments[0].getBoundingClientRect(), b = (arguments[1] || arguments[0]).getBoundingClientRect();
        return [Math.min(a.left, b.left), a.top, Math.max(a.right, b.right), b.bottom];''', first, last)
    img = Image.open(io.BytesIO(driver.get_screenshot_as_png()))
    left, top, right, bottom = (max(0, int(box[0]) - pad), max(0, int(box[1]) - pad), min(img.width, int(box[2]) + pad),
                                min(img.height, int(box[3]) + pad))
    buf = io.BytesIO(); img.crop((left, top, right, bottom)).save(buf, 'PNG')
    tmp = Path(path).with_suffix('.full.png')
    tmp.parent.mkdir(parents=True, exist_ok=True); tmp.write_bytes(buf.getvalue())
    try: return _optimised(tmp, Path(path), max_kb)
    finally: tmp.unlink(missing_ok=True)

def _optimised(src:Path, dest:Path, max_kb:int) -> Path:
    from PIL import Image
    img = Image.open(src).convert('RGB')
    for scale, colours in ((1.0, 256), (1.0, 128), (0.9, 96), (0.8, 64), (0.7, 48), (0.6, 32)):
        im = img if scale == 1 else img.resize((int(img.width * scale), int(img.height * scale)), Image.LANCZOS)
        q = im.quantize(colors=colours, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        buf = io.BytesIO(); q.save(buf, 'PNG', optimize=True)
        if buf.tell() <= max_kb * 1024: break
    dest.write_bytes(buf.getvalue())
    return dest


# --- the training form (nbtrain.ui.TrainForm) as it renders in JupyterLab: found by what a person reads on it
def form_root(driver, timeout:float=60):
    "The output area that shows the form (it has the tabs)."
    from selenium.webdriver.common.by import By
    xp = "//div[contains(@class,'widget-tab')]/ancestor::div[contains(@class,'jp-OutputArea-output')][1]"
    return wait_for(driver, lambda d: (d.find_elements(By.XPATH, xp) or [False])[0], timeout, 'the form did not render')

def tab(form, title:str):
    from selenium.webdriver.common.by import By
    return form.find_element(By.XPATH, f".//li[contains(@class,'lm-TabBar-tab')][.//div[contains(@class,'lm-TabBar-tabLabel') and normalize-space()='{title}']]")

def tab_titles(form) -> list[str]:
    from selenium.webdriver.common.by import By
    return [e.text.strip() for e in form.find_elements(By.CSS_SELECTOR, '.widget-tab-bar .lm-TabBar-tabLabel')]

def cut_tab_titles(driver, form) -> list[str]:
    "The tab titles a person sees cut short (with an ellipsis) at the page's width."
    return driver.execute_script("""return [...arguments[0].querySelectorAll('.widget-tab-bar .lm-TabBar-tabLabel')]
      .filter(e => e.scrollWidth > e.clientWidth + 1).map(e => e.textContent.trim());""", form)

def field(form, label:str):
    "The input of the field whose visible label reads `label`."
    from selenium.webdriver.common.by import By
    lab = form.find_element(By.XPATH, f".//label[contains(@class,'widget-label') and normalize-space()='{label}']")
    return form.find_element(By.ID, lab.get_attribute('for'))

def field_error(form, label:str):
    "The line under the field `label` where its error appears."
    from selenium.webdriver.common.by import By
    lab = form.find_element(By.XPATH, f".//label[contains(@class,'widget-label') and normalize-space()='{label}']")
    row = lab.find_element(By.XPATH, "./ancestor::div[contains(@class,'widget-vbox')][1]")
    return row.find_element(By.XPATH, "./div[2]")

def type_into(el, text:str):
    "Select what the box holds, type `text` over it and press Enter, as a person does (the form reads it then)."
    from selenium.webdriver.common.keys import Keys
    el.click(); el.send_keys(Keys.CONTROL, 'a'); el.send_keys(text, Keys.ENTER)

def button(form, text:str):
    from selenium.webdriver.common.by import By
    return form.find_element(By.XPATH, f".//button[contains(@class,'widget-button') and normalize-space()='{text}']")

def status(form):
    "The status line under Train and Stop."
    from selenium.webdriver.common.by import By
    return form.find_element(By.XPATH, ".//button[normalize-space()='Train']/ancestor::div[contains(@class,'widget-hbox')][1]/following-sibling::div[1]")

def progress(form) -> tuple[str, float]:
    "The progress bar's label ('step N') and how full it is (0 to 1)."
    from selenium.webdriver.common.by import By
    p = form.find_element(By.CSS_SELECTOR, '.widget-hprogress, .widget-progress')
    bar = p.find_element(By.CSS_SELECTOR, '.progress-bar')
    track = bar.find_element(By.XPATH, '..')
    return p.find_element(By.CSS_SELECTOR, 'label').text.strip(), bar.size['width'] / max(track.size['width'], 1)

def step_shown(form) -> int:
    "The step the progress bar says ('step N')."
    label = progress(form)[0]
    return int(label.split()[-1]) if label.startswith('step ') else 0

def image_state(driver, img) -> tuple[str, int]:
    "An image's source and its decoded width (0: nothing drawn)."
    return driver.execute_script('return [arguments[0].currentSrc || arguments[0].src || "", arguments[0].naturalWidth || 0];', img)

# every visible control of the form: a label a person can read, and help on hover (a title on it or on its label)
UNLABELLED = """
const form = arguments[0], problems = [], seen = [];
form.querySelectorAll('input, select, textarea').forEach(el => {
  if (!el.offsetParent || el.closest('.widget-tab-bar')) return;  // not shown now (another tab, a closed section)
  let text = '', help = el.getAttribute('title') || '', cut = false;
  if (el.type === 'checkbox') {  // its label is the text before it in its row
    const row = el.closest('.widget-hbox'), side = row && row.querySelector('.widget-html-content [title]');
    text = side ? side.textContent.trim() : ''; help = help || (side ? side.getAttribute('title') : '');
    cut = !!side && side.scrollWidth > side.clientWidth + 1;
  } else {
    const label = el.id ? form.querySelector(`label[for="${el.id}"]`) : null;
    if (label && label.offsetParent) {
      text = label.textContent.trim();
      const t = label.querySelector('[title]');
      help = help || label.getAttribute('title') || (t ? t.getAttribute('title') : '');
      cut = label.scrollWidth > label.clientWidth + 1;
    }
  }
  if (help === 'null') help = '';
  seen.push(text);
  if (!text) problems.push('a control without a visible label: ' + el.outerHTML.slice(0, 160));
  else if (!help.trim()) problems.push(`${text}: no help on hover`);
  else if (cut && !help.startsWith(text)) problems.push(`${text}: the label is cut off and its hover help does not give it whole`);
});
return [seen, problems];
"""

def label_problems(driver, form) -> tuple[list[str], list[str]]:
    "The labels of the form's visible controls, and what a person would miss: a control without a label or without help on hover."
    return driver.execute_script(UNLABELLED, form)
