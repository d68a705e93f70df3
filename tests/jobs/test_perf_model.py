"""The cost model against counters: FLOPs against torch's FlopCounterMode, weight bytes against the
quantized tensors themselves, KV bytes against the cache, and a prefill's bytes against what its matmuls
and attention read and write; on the tiny model and on an 8B-shaped model built on the meta device."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from jobs import models, perf_model
from jobs.config import TrialConfig
from jobs.perf_model import Cost, ModelShape, Peaks, decode_cost, prefill_cost, roofline
from jobs.quantize import QuantizedLinear, apply_dtype
from orchestrator.plan import trial_spec
from tests.helpers import compose

TINY = LlamaConfig(vocab_size=2048, hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=4)
LLAMA_8B = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8)
GROUPED = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2)  # grouped queries, as Llama-3 has
# The CPU's fused attention is not in FlopCounterMode's table; it counts what SDPA counts elsewhere.
CPU_ATTENTION = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
                 lambda query, key, value, *args, out_shape=None, **kwargs: sdpa_flop_count(query, key, value)}


class _Traffic(TorchDispatchMode):
    """Bytes the matmuls and attention read and write (their tensor operands and results)."""
    OPS = {"aten.mm.default", "aten.addmm.default", "aten.bmm.default",
           "aten._scaled_dot_product_flash_attention_for_cpu.default", "aten.embedding.default"}

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if str(func) in self.OPS:
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            if str(func) == "aten.embedding.default":
                tensors = []  # the table is not read whole: the rows gathered are the output
            results = out if isinstance(out, tuple) else (out,)
            self.bytes += sum(t.numel() * t.element_size() for t in tensors)
            self.bytes += sum(t.numel() * t.element_size() for t in results[:1] if isinstance(t, torch.Tensor))
        return out


def _cfg(*overrides):
    """A trial computing in float32, as the models here do."""
    return TrialConfig.from_dict(trial_spec(compose("model.dtype=float32", "dtype.compute_dtype=auto", *overrides),
                                            []).config)


def _flops(cost: Cost) -> float:
    return sum(cost.flops.values())


@pytest.mark.parametrize("batch,prompt", [(1, 128), (4, 64)])
def test_the_tiny_models_prefill_and_decode_flops_match_the_counter(batch, prompt):
    torch.manual_seed(0)
    model, shape, cfg = LlamaForCausalLM(TINY).eval(), ModelShape.from_config(TINY.to_dict()), _cfg()
    ids = torch.randint(0, 2048, (batch, prompt))
    with torch.no_grad():
        with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION) as counter:
            model(input_ids=ids, use_cache=False)
        assert _flops(prefill_cost(shape, cfg, batch, prompt)) == pytest.approx(counter.get_total_flops(), rel=0.02)
        cache = DynamicCache(config=TINY)
        model(input_ids=ids, use_cache=True, past_key_values=cache)
        with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION) as counter:
            model(input_ids=ids[:, -1:], use_cache=True, past_key_values=cache)
    assert _flops(decode_cost(shape, cfg, batch, prompt + 1)) == pytest.approx(counter.get_total_flops(), rel=0.02)


def test_an_8b_shaped_models_prefill_flops_and_bytes_match_the_counters_on_the_meta_device():
    with torch.device("meta"):
        model = LlamaForCausalLM(LLAMA_8B)
    batch, prompt = 2, 128
    ids = torch.zeros((batch, prompt), dtype=torch.long, device="meta")
    positions = torch.arange(prompt, device="meta")[None].expand(batch, -1)
    # The decoder layers one by one: the causal mask's builder reads values, which meta tensors have none of.
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION) as counter, _Traffic() as traffic:
        x = model.model.embed_tokens(ids)
        rotary = model.model.rotary_emb(x, positions)
        for layer in model.model.layers:
            x = layer(x, attention_mask=None, position_embeddings=rotary, position_ids=positions)
            x = x[0] if isinstance(x, tuple) else x
        model.lm_head(model.model.norm(x))
    predicted = prefill_cost(ModelShape.from_config(LLAMA_8B.to_dict()), _cfg(), batch, prompt)
    assert _flops(predicted) == pytest.approx(counter.get_total_flops(), rel=0.02)
    assert counter.get_total_flops() > 3.8e12
    assert predicted.bytes == pytest.approx(traffic.bytes, rel=0.02)


@pytest.mark.parametrize("overrides", [("dtype=int4",), ("dtype=nvfp4",), ("dtype=mxfp4",), ("dtype=int8",),
                                       ("dtype=int4", "dtype.symmetric=false"),
                                       ("dtype=int4", 'quant.rules=[{match:"*.mlp.*",dtype:int8},'
                                                      '{match:"model.layers.0.*",dtype:bf16}]')])
def test_weight_bytes_are_the_quantized_tensors_own(tiny_model_cfg, overrides):
    cfg = _cfg(*overrides)
    model, _ = models.load_model(cfg.model, torch.device("cpu"))
    apply_dtype(model, cfg, torch.float32)
    layers = {c.name: c for c in perf_model.layer_costs(ModelShape.from_config(model.config.to_dict()), cfg)}
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear):
            assert layers[name].weight_bytes == module.weight_q.nbytes, name
        elif isinstance(module, torch.nn.Linear):
            assert layers[name].weight_bytes == module.weight.numel() * module.weight.element_size(), name


def test_kv_bytes_per_token_are_the_caches_own():
    model, shape = LlamaForCausalLM(GROUPED).eval(), ModelShape.from_config(GROUPED.to_dict())
    cache = DynamicCache(config=GROUPED)
    with torch.no_grad():
        model(input_ids=torch.randint(0, 100, (2, 16)), use_cache=True, past_key_values=cache)
    stored = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert perf_model.kv_bytes_per_token(shape, _cfg()) * 2 * 16 == stored


def test_a_prefills_bytes_match_what_its_matmuls_and_attention_move():
    model, shape = LlamaForCausalLM(TINY).eval(), ModelShape.from_config(TINY.to_dict())
    with torch.no_grad(), _Traffic() as traffic:
        model(input_ids=torch.randint(0, 2048, (2, 64)), use_cache=False)
    assert prefill_cost(shape, _cfg(), 2, 64).bytes == pytest.approx(traffic.bytes, rel=0.02)


def test_the_roofline_names_its_bound_and_marks_a_format_run_where_it_is_not_native():
    peaks = Peaks(1e12, {"bf16": 1e15, "fp8": 2e15}, native=("bf16", "fp8"))
    memory = roofline(Cost(1e9, {"bf16": 1e9}), peaks, "bf16")
    assert memory.bound == "memory" and memory.seconds == pytest.approx(1e-3) and not memory.emulated
    compute = roofline(Cost(1e6, {"fp8": 4e12}), peaks, "bf16")
    assert compute.bound == "compute" and compute.seconds == pytest.approx(2e-3)
    fp4 = roofline(Cost(1e6, {"fp4": 4e12}), peaks, "bf16")  # no fp4 units: dequantized, at bf16's rate
    assert fp4.emulated and fp4.seconds == pytest.approx(4e-3)


def test_w4a4_counts_its_matmuls_at_fp4_and_weight_only_at_the_compute_dtype():
    shape = ModelShape.from_config(TINY.to_dict())
    w4a4, w4a16 = (prefill_cost(shape, _cfg("dtype=nvfp4", f"quant={q}"), 1, 16)
                   for q in ("w_a_dynamic", "weight_only"))
    assert set(w4a4.flops) == {"fp4", "fp32"} and set(w4a16.flops) == {"fp32"}  # lm_head and attention stay fp32
    assert _flops(w4a4) == pytest.approx(_flops(w4a16))
