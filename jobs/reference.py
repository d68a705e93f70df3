"""The reference a trial's accuracy is measured against: the unquantized model's log-probabilities
on the eval windows, computed once per node and shared by every trial that asks for the same one.

One reference per (model, ``model.dtype``, eval windows, ``eval.batch_size``, device, torch and
transformers versions): each of these can move the reference's last bits. It is stored under
``$QUANTSWEEP_CACHE/references/<key>/logp.npy``, float32 ``[windows, seq_len - 1, vocab]``,
exactly the rows a trial would have held in memory, so KL and perplexity lose nothing to it.
The price is disk, ``tokens x vocab x 4`` bytes: 8.4 GB for 16,384 tokens of a 128k
vocabulary, 17 MB for the tiny model; it is checked against free space before writing.

The first trial to need a reference writes it under a file lock, into a temporary folder renamed
when whole, so another trial waits and then reads it, and a reader sees a whole reference or none.
Reads are plain file reads of a few windows at a time (not a memory map, whose pages would count
against the trial), so a trial holds ``eval.batch_size`` windows of it at most.

On a multi-node cluster each node's cache is its own local disk: each node computes the
reference once, on its own hardware (a GPU model is part of the key, as it moves the last bits).
A cache on a shared filesystem is shared where that filesystem honours file locks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

from jobs.cache import build_once, cache_root, check_space, node_identity
from jobs.config import ModelConfig
from jobs.evaluate import log_probs

log = logging.getLogger(__name__)
FILE = "logp.npy"


class Reference:
    """A stored reference, read a few windows at a time."""

    def __init__(self, folder: Path):
        self.folder = folder
        with open(folder / FILE, "rb") as f:
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}[np.lib.format.read_magic(f)]
            self.shape, fortran, dtype = read_header(f)
            self._offset = f.tell()
        if fortran or dtype != np.float32 or len(self.shape) != 3:
            raise ValueError(f"{folder / FILE}: not a float32 [windows, positions, vocab] array")
        self._row = self.shape[1] * self.shape[2]  # float32 values per window

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, start: int, stop: int) -> torch.Tensor:
        """Windows ``start:stop``, ``[stop - start, seq_len - 1, vocab]`` float32, on the CPU."""
        out = np.empty((stop - start, *self.shape[1:]), dtype=np.float32)
        with open(self.folder / FILE, "rb") as f:
            f.seek(self._offset + start * self._row * 4)
            if f.readinto(memoryview(out).cast("B")) != out.nbytes:
                raise ValueError(f"{self.folder / FILE}: shorter than its header says")
        return torch.from_numpy(out)


def reference_key(model_cfg: ModelConfig, windows: torch.Tensor, batch_size: int, device: torch.device) -> str:
    model = {k: v for k, v in dataclasses.asdict(model_cfg).items() if k != "name"}
    identity = {"model": model, "windows": hashlib.sha256(windows.numpy().tobytes()).hexdigest(),
                "shape": list(windows.shape), "batch_size": batch_size, **node_identity(device)}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def ensure_reference(model, model_cfg: ModelConfig, windows: torch.Tensor, batch_size: int,
                     device: torch.device) -> tuple[Reference, bool]:
    """The reference of ``model`` (unquantized, at ``model.dtype``) on ``windows``, computed and
    stored if this node has none yet; and whether this call computed it."""
    folder = cache_root() / "references" / reference_key(model_cfg, windows, batch_size, device)
    shape = (len(windows), windows.shape[1] - 1, model.config.vocab_size)

    def make(tmp: Path) -> None:
        check_space(tmp, 4 * int(np.prod(shape)), "the reference log-probs", "lower eval.max_tokens")
        _write(model, windows, batch_size, device, tmp / FILE, shape)
        (tmp / "reference.json").write_text(json.dumps(
            {"model": model_cfg.name, "shape": list(shape), "dtype": "float32", "batch_size": batch_size,
             "device": str(device), "torch_dtype": str(model.dtype)}, indent=2))

    computed = build_once(folder, "reference.json", make)
    if computed:
        log.info("reference: computed %s %s into %s", model_cfg.name, list(shape), folder)
    return Reference(folder), computed


@torch.inference_mode()
def _write(model, windows: torch.Tensor, batch_size: int, device: torch.device, path: Path, shape: tuple) -> None:
    with open(path, "wb") as f:
        np.lib.format.write_array_header_2_0(f, {"descr": "<f4", "fortran_order": False, "shape": shape})
        for batch in windows.split(batch_size):
            logp = log_probs(model, batch, device)
            if logp.shape[1:] != shape[1:]:  # e.g. logits padded past config.vocab_size: rows would misalign
                raise ValueError(f"the model's log-probs are {list(logp.shape[1:])} per window, not {list(shape[1:])}")
            f.write(logp.cpu().numpy().tobytes())
        f.flush()
        os.fsync(f.fileno())
