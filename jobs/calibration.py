"""Calibration data: random windows of a text the trial is not evaluated on.

``calib.text`` is a shipped text, whose train split is used (evaluation reads the held-out
documents), or a UTF-8 file; ``calib.dataset`` an HF dataset id, loaded with ``datasets`` where
a hub is reachable. Every document of the calibration text is checked against the eval text's:
one in both is refused, since calibrating on the evaluated text flatters a method.
"""

from __future__ import annotations

import torch

from jobs import data
from jobs.config import CalibConfig


def load_documents(calib: CalibConfig) -> list[str]:
    if calib.dataset is None:
        return data.load_text(calib.text, "train").split(data.DOC_SEPARATOR)
    try:
        import datasets
    except ImportError:
        raise ImportError(f"calib.dataset={calib.dataset} needs the datasets package: pip install datasets") from None
    rows = datasets.load_dataset(calib.dataset, calib.dataset_config, split=calib.dataset_split)
    if calib.dataset_field not in rows.column_names:
        raise ValueError(f"calib.dataset_field={calib.dataset_field}: not a column of {calib.dataset}; "
                         f"its columns: {', '.join(rows.column_names)}")
    return [str(text) for text in rows[calib.dataset_field]]


def calibration_windows(tokenizer, calib: CalibConfig, eval_text: str, max_positions: int) -> torch.Tensor:
    """``calib.num_sequences`` windows of ``calib.seq_len`` tokens at random (seeded) places, ``[n, seq_len]``."""
    if calib.seq_len > max_positions:
        raise ValueError(f"calib.seq_len={calib.seq_len} exceeds the model's {max_positions} positions")
    docs = [d for d in load_documents(calib) if d.strip()]
    held_out = {d.strip() for d in data.load_text(eval_text, "eval").split(data.DOC_SEPARATOR)}
    shared = sum(d.strip() in held_out for d in docs)
    if shared:
        raise ValueError(f"the calibration text shares {shared} of its {len(docs)} documents with the eval text "
                         f"{eval_text!r}: calibrate on other text (calib.text or calib.dataset)")
    ids = tokenizer(data.DOC_SEPARATOR.join(docs))["input_ids"]
    if len(ids) <= calib.seq_len:
        raise ValueError(f"the calibration text has {len(ids)} tokens, too few for calib.seq_len={calib.seq_len}")
    gen = torch.Generator().manual_seed(calib.seed)
    starts = torch.randint(0, len(ids) - calib.seq_len + 1, (calib.num_sequences,), generator=gen).tolist()
    ids = torch.tensor(ids, dtype=torch.long)
    return torch.stack([ids[s:s + calib.seq_len] for s in starts])
