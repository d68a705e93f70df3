"""Rebuild ``stdlib_docs.txt``, the evaluation and training text the project ships.

The text is the docstrings of the Python standard library (PSF licence), which every
machine has, so the tiny model and the default perplexity need no dataset hub. It is
built once and committed, so every machine evaluates on the same bytes whatever its
Python version. Run ``python -m jobs.data.build_corpus`` to rebuild it.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
import sys
import warnings
from pathlib import Path

OUT = Path(__file__).with_name("stdlib_docs.txt")
# GUI, test and side-effect modules (antigravity opens a browser, this prints).
SKIP = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "lib2to3",
        "test", "ensurepip", "venv", "pydoc_data"}
MIN_CHARS = 160


def _stdlib_modules() -> list[str]:
    stdlib = f"{sys.base_prefix}/lib/python3"
    return sorted(m.name for m in pkgutil.iter_modules()
                  if getattr(m.module_finder, "path", "").startswith(stdlib)
                  and "site-packages" not in m.module_finder.path
                  and not m.name.startswith("_") and m.name not in SKIP)


def _clean(doc: str) -> str:
    # Drop interactive examples: they are code, not prose.
    lines = [ln for ln in doc.splitlines() if not ln.lstrip().startswith((">>>", "..."))]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def collect() -> list[str]:
    docs: list[str] = []
    warnings.simplefilter("ignore")
    for name in _stdlib_modules():
        try:
            mod = importlib.import_module(name)
        except Exception:
            continue
        objs = [mod]
        for _, obj in sorted(inspect.getmembers(mod), key=lambda kv: kv[0]):
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and getattr(obj, "__module__", None) == name:
                objs.append(obj)
                if inspect.isclass(obj):
                    objs += [m for _, m in sorted(vars(obj).items()) if inspect.isfunction(m)]
        for obj in objs:
            doc = _clean(inspect.getdoc(obj) or "")
            if len(doc) >= MIN_CHARS and doc not in docs:
                docs.append(doc)
    return docs


if __name__ == "__main__":
    docs = collect()
    OUT.write_text("\n\n\n".join(docs) + "\n", encoding="utf-8")
    print(f"{OUT}: {len(docs)} docstrings, {OUT.stat().st_size / 1e6:.2f} MB")
