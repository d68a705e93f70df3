"""Texts the project ships, so evaluation and the tiny model need no dataset hub."""

from __future__ import annotations

from pathlib import Path

BUILTIN_TEXTS = {"stdlib-docs": Path(__file__).with_name("stdlib_docs.txt")}
DOC_SEPARATOR = "\n\n\n"
EVAL_EVERY = 10  # every 10th document is held out for evaluation


def load_text(name: str, split: str = "eval") -> str:
    """A shipped text by name (``stdlib-docs``) or any UTF-8 file by path.

    Shipped texts are split by document: every ``EVAL_EVERY``-th one is ``eval``, the rest
    ``train``, so the tiny model is never evaluated on what it was trained on. A file
    given by path is used whole for either split.
    """
    if name not in BUILTIN_TEXTS:
        path = Path(name).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"eval text {name!r}: not a shipped text ({', '.join(BUILTIN_TEXTS)}) nor a file")
        return path.read_text(encoding="utf-8")
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    docs = BUILTIN_TEXTS[name].read_text(encoding="utf-8").split(DOC_SEPARATOR)
    held_out = split == "eval"
    return DOC_SEPARATOR.join(d for i, d in enumerate(docs) if (i % EVAL_EVERY == EVAL_EVERY - 1) == held_out)
