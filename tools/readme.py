"""Write README.md from nbs/index.ipynb (nbdev-readme needs Quarto; this needs nothing).

Markdown cells are copied; code cells become fenced Python blocks; cells marked `#| hide` are left out.
`python tools/readme.py --check` fails when README.md is out of date.
"""
import json, sys
from pathlib import Path

root = Path(__file__).resolve().parent.parent

def render() -> str:
    nb = json.loads((root/'nbs'/'index.ipynb').read_text(encoding='utf-8'))
    parts = []
    for c in nb['cells']:
        src = ''.join(c['source'])
        lines = src.splitlines()
        if any(l.strip() == '#| hide' for l in lines): continue
        if c['cell_type'] == 'markdown': parts.append(src.strip())
        elif c['cell_type'] == 'code':
            code = '\n'.join(l for l in lines if not l.startswith('#|')).strip()
            if code: parts.append(f"```python\n{code}\n```")
    return '\n\n'.join(parts) + '\n'

if __name__ == '__main__':
    text, readme = render(), root/'README.md'
    if '--check' in sys.argv:
        if not readme.exists() or readme.read_text(encoding='utf-8') != text:
            sys.exit("README.md is out of date with nbs/index.ipynb: run python tools/readme.py")
    else:
        readme.write_text(text, encoding='utf-8')
        print(f"wrote {readme}")
