"""The shared reference: written once by concurrent trials, read back bit for bit, in chunks."""

import multiprocessing
import os

import numpy as np
import pytest
import torch

from jobs.config import ModelConfig
from jobs.evaluate import log_probs
from jobs.models import load_model
from jobs.reference import FILE, ensure_reference

CPU = torch.device("cpu")
WINDOWS = torch.randint(0, 96, (5, 12), generator=torch.Generator().manual_seed(0))
BATCH = 2


@pytest.fixture
def random_model(tmp_path):
    """A small random Llama with a tokenizer, saved as a local checkpoint (model.source=path)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from jobs.models import train_tokenizer

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "model")
    train_tokenizer("the quick brown fox jumps over the lazy dog " * 20, 96).save_pretrained(tmp_path / "model")
    return ModelConfig(name="random", source="path", path=str(tmp_path / "model"), dtype="float32")


def _trial(model_cfg, cache, barrier, out):
    os.environ["QUANTSWEEP_CACHE"] = cache
    model, _ = load_model(model_cfg, CPU)
    barrier.wait()  # both trials ask at once
    ref, computed = ensure_reference(model, model_cfg, WINDOWS, BATCH, CPU)
    out.put((computed, ref.read(0, len(ref)).numpy().tobytes(), str(ref.folder)))


def test_two_concurrent_trials_write_the_reference_once_and_read_the_same_bits(random_model, tmp_path):
    ctx = multiprocessing.get_context("spawn")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    trials = [ctx.Process(target=_trial, args=(random_model, str(tmp_path / "cache"), barrier, out)) for _ in range(2)]
    for p in trials:
        p.start()
    results = [out.get(timeout=300) for _ in trials]
    for p in trials:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert sorted(computed for computed, _, _ in results) == [False, True]
    (_, first, folder), (_, second, _) = results
    assert first == second
    stored = np.load(os.path.join(folder, FILE))  # a plain .npy: numpy reads it as it is
    assert stored.tobytes() == first and stored.shape == (5, 11, 96) and stored.dtype == np.float32
    model, _ = load_model(random_model, CPU)
    with torch.inference_mode():
        direct = torch.cat([log_probs(model, b, CPU) for b in WINDOWS.split(BATCH)])
    torch.testing.assert_close(torch.from_numpy(stored), direct, rtol=1e-6, atol=1e-6)
    assert not list((tmp_path / "cache" / "references").glob("*.tmp")), "no half-written reference is left"


def test_reads_in_chunks_are_slices_of_the_whole_and_a_new_eval_makes_a_new_reference(random_model, tmp_path,
                                                                                       monkeypatch):
    monkeypatch.setenv("QUANTSWEEP_CACHE", str(tmp_path / "cache"))
    model, _ = load_model(random_model, CPU)
    ref, computed = ensure_reference(model, random_model, WINDOWS, BATCH, CPU)
    again, computed_again = ensure_reference(model, random_model, WINDOWS, BATCH, CPU)
    assert computed and not computed_again and again.folder == ref.folder
    whole = ref.read(0, 5)
    assert torch.equal(ref.read(1, 4), whole[1:4]) and torch.equal(ref.read(4, 5), whole[4:])
    other, computed_other = ensure_reference(model, random_model, WINDOWS[:3], BATCH, CPU)
    assert computed_other and other.folder != ref.folder and len(other) == 3


def test_a_reference_too_big_for_the_disk_is_refused_before_writing(random_model, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setenv("QUANTSWEEP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**6, 10**6 - 100, 100))
    model, _ = load_model(random_model, CPU)
    with pytest.raises(OSError, match=r"need 0\.0 GiB under .*references, which has 0\.0 GiB free"):
        ensure_reference(model, random_model, WINDOWS, BATCH, CPU)
