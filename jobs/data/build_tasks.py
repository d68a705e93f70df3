"""Rebuild the shipped lm-evaluation-harness tasks' data (``tasks/*.jsonl``) from the held-out
documents of ``stdlib_docs.txt`` (the ``eval`` split, which the tiny model never trains on).

- ``stdlib_next_word``: multiple choice. The context is a sentence without its last word; the
  choices are that word and three last words of other sentences, in a seeded order.
- ``stdlib_rolling``: rolling log-likelihood of whole documents (word and byte perplexity).

Built once and committed, so every machine evaluates the same examples:
``python -m jobs.data.build_tasks``.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from jobs.data import DOC_SEPARATOR, load_text

OUT = Path(__file__).with_name("tasks")
NEXT_WORD_EXAMPLES = 300
ROLLING_MAX_CHARS = 1500  # a document's first characters: the rolling task stays quick on a CPU
SENTENCE = re.compile(r"(?<=[.!?])\s+")
LAST_WORD = re.compile(r"^(?P<context>.*\S)\s+(?P<word>[A-Za-z]{3,})[.!?]$", re.DOTALL)


def next_word_examples(docs: list[str], rng: random.Random) -> list[dict]:
    pairs = []
    for doc in docs:
        for sentence in SENTENCE.split(" ".join(doc.split())):
            match = LAST_WORD.match(sentence)
            if match and 40 <= len(match["context"]) <= 300:
                pairs.append((match["context"], match["word"]))
    rng.shuffle(pairs)
    words = sorted({w for _, w in pairs})
    examples = []
    for context, word in pairs[:NEXT_WORD_EXAMPLES]:
        choices = [word, *rng.sample([w for w in words if w.lower() != word.lower()], 3)]
        rng.shuffle(choices)
        examples.append({"context": context, "choices": choices, "label": choices.index(word)})
    return examples


def main() -> None:
    docs = [d for d in load_text("stdlib-docs", "eval").split(DOC_SEPARATOR) if d.strip()]
    rng = random.Random(0)
    OUT.mkdir(exist_ok=True)
    tasks = {"stdlib_next_word": next_word_examples(docs, rng),
             "stdlib_rolling": [{"text": d[:ROLLING_MAX_CHARS]} for d in docs]}
    for name, rows in tasks.items():
        with open(OUT / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        print(f"{name}: {len(rows)} examples")


if __name__ == "__main__":
    main()
