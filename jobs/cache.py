"""The node's cache of things worth computing once: built models, references, quantized models.

Everything lives under ``$QUANTSWEEP_CACHE`` (default ``~/.cache/quantsweep``). A folder is made
once per node: the first trial to need it builds it under a file lock into a temporary folder,
renamed when whole, so other trials wait and then read it, and a reader sees all of it or none.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable


def cache_root() -> Path:
    return Path(os.environ.get("QUANTSWEEP_CACHE", Path.home() / ".cache" / "quantsweep")).expanduser()


def built_model_dir(build) -> Path:
    """Where the tiny model of ``build`` (a ``TinyModelBuild``) is saved on this node."""
    import dataclasses
    import hashlib
    import json

    digest = hashlib.sha256(json.dumps(dataclasses.asdict(build), sort_keys=True).encode()).hexdigest()[:12]
    return cache_root() / "models" / f"tiny-llama-{digest}"


def node_identity(device) -> dict[str, str]:
    """What moves the last bits of anything computed here: the hardware and the library versions."""
    import torch
    import transformers

    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return {"hardware": hardware, "torch": torch.__version__, "transformers": transformers.__version__}


def build_once(folder: Path, marker: str, build: Callable[[Path], None]) -> bool:
    """Make ``folder`` by ``build(tmp)`` unless it holds ``marker`` (a file ``build`` writes last);
    whether this call built it."""
    from filelock import FileLock

    if (folder / marker).exists():
        return False
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if (folder / marker).exists():
            return False
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        build(tmp)
        tmp.rename(folder)  # atomic: a reader sees a whole folder or none
    return True


def check_space(folder: Path, needed: int, what: str, remedy: str) -> None:
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise OSError(f"{what} need {needed / 2**30:.1f} GiB under {folder.parent}, which has "
                      f"{free / 2**30:.1f} GiB free ({remedy}, or point QUANTSWEEP_CACHE elsewhere)")
