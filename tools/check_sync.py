"""Fail when `nbdev-export` would change the package: every module must be what its notebook exports.

Exports into a scratch copy of the repository, so the working tree is never modified, and prints the files that differ.
"""
import filecmp, shutil, subprocess, sys, tempfile
from pathlib import Path

root = Path(__file__).resolve().parent.parent
with tempfile.TemporaryDirectory() as tmp:
    copy = Path(tmp)/'repo'
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns('.git', '.venv', 'venv', '_proc', '_docs', 'runs', '__pycache__', '*.egg-info'))
    r = subprocess.run(['nbdev-export'], cwd=copy, capture_output=True, text=True)
    if r.returncode: sys.exit(f"nbdev-export failed:\n{r.stdout}{r.stderr}")
    ours = {p.relative_to(root) for p in (root/'nbtrain').rglob('*.py')}
    theirs = {p.relative_to(copy) for p in (copy/'nbtrain').rglob('*.py')}
    bad = sorted(str(p) for p in ours ^ theirs) + sorted(str(p) for p in ours & theirs if not filecmp.cmp(root/p, copy/p, shallow=False))
    if bad:
        sys.exit("The package is out of sync with the notebooks (edit nbs/, then run nbdev-export and commit both):\n  "
                 + "\n  ".join(bad))
    print(f"package in sync with notebooks ({len(ours)} modules)")
