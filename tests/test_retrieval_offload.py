"""Offloaded memories (storage and search on the CPU, results on the model's device) against in-place ones.

Without a GPU the offloaded path runs with the CPU as its compute device: every move is then a no-op
but the path (queries moved to the bank, results moved back, gathers through a staging buffer,
int8 dequantised after the move) is the one a GPU model uses; tests/test_cuda.py runs it for real.
"""

import pytest
import torch

from conftest import VOCAB, small_config, tiny_backbone
from longmem import LongMemError, LongMemForCausalLM, MemoryBank, MemorySpec


def trained(family, **cfg):
    model = LongMemForCausalLM.from_backbone(tiny_backbone(family), small_config(**cfg))
    with torch.no_grad():
        model.sidenet.layers[model.sidenet.memory_layer].gate.normal_(0, 2)  # the memory matters in the logits
    return model


@pytest.mark.parametrize("dtype,retriever", [("float32", "exact"), ("int8", "exact"), ("bfloat16", "torch-ivf")])
def test_offloaded_memory_gives_the_logits_of_an_in_place_one(family, dtype, retriever):
    model = trained(family, memory_dtype=dtype)
    plain = model.new_memory(2, retriever=retriever)
    off = model.new_memory(2, retriever=retriever, offload=True)
    assert off.offload_to == model.device and off.compute_device == model.device and not off.pin_memory
    g = torch.Generator().manual_seed(0)
    for step in range(6):  # 96 tokens through a 64-token memory: eviction too
        x = torch.randint(0, VOCAB, (2, 16), generator=g)
        mask = torch.ones_like(x)
        mask[step % 2, 12:] = 0
        a = model(x, memory=plain, attention_mask=mask)
        b = model(x, memory=off, attention_mask=mask)
        assert torch.equal(a.logits, b.logits)
        if a.retrieval is not None:
            assert torch.equal(a.retrieval.slots, b.retrieval.slots) and torch.equal(a.retrieval.valid, b.retrieval.valid)
    for row in range(2):
        assert torch.equal(plain.tokens(row)[0], off.tokens(row)[0])


def test_gather_of_an_offloaded_bank_equals_the_in_place_gather():
    spec = MemorySpec(num_kv_heads=2, head_dim=8, chunk_size=4, capacity=256, dtype="int8", fingerprint="t")
    plain, off = MemoryBank(spec, 2), MemoryBank(spec, 2, compute_device="cpu")
    kv = torch.randn(2, 100, 2, 8)
    plain.write(kv, -kv)
    off.write(kv, -kv)
    slots = torch.randint(0, 25, (2, 2, 5, 3))
    for x, y in zip(plain.gather(slots), off.gather(slots)):
        assert torch.equal(x, y)
    q = torch.randn(2, 2, 5, 8)
    assert torch.equal(plain.search(q, 4).slots, off.search(q, 4).slots)


def test_offload_to_select_stack_and_load_keep_or_drop_the_placement(tmp_path):
    spec = MemorySpec(num_kv_heads=2, head_dim=8, chunk_size=2, capacity=64, dtype="float32", fingerprint="t")
    bank = MemoryBank(spec, 2)
    kv = torch.randn(2, 30, 2, 8)
    bank.write(kv, kv + 1)
    off = bank.offload("cpu")
    assert off.offload_to == torch.device("cpu") and "offloaded" in repr(off)
    for derived in (off.select([1, 0]), MemoryBank.stack(off.split())):
        assert derived.offload_to == off.offload_to
    back = off.to("cpu")
    assert back.offload_to is None
    for row in range(2):
        assert torch.equal(back.tokens(row)[0], bank.tokens(row)[0])
        assert torch.equal(off.tokens(row)[1], bank.tokens(row)[1])
    with pytest.raises(LongMemError, match="placements"):
        MemoryBank.stack([bank, off])
    off.save(tmp_path / "m.safetensors")
    loaded = MemoryBank.load(tmp_path / "m.safetensors", compute_device="cpu")
    assert loaded.offload_to == torch.device("cpu") and torch.equal(loaded.tokens(1)[0], bank.tokens(1)[0])


def test_a_memory_for_another_device_is_refused_unless_offloaded_for_the_model(model):
    x = torch.randint(0, VOCAB, (1, 8))
    elsewhere = MemoryBank(model.memory_spec(), 1, device="meta")
    with pytest.raises(LongMemError, match="is on meta but the model on cpu.*offload"):
        model(x, memory=elsewhere)
    for_another = MemoryBank(model.memory_spec(), 1, compute_device="meta")
    with pytest.raises(LongMemError, match="offloaded to cpu for meta but the model on cpu"):
        model(x, memory=for_another)
    with pytest.raises(LongMemError, match="offload=True"):
        model.new_memory(1, pin_memory=True)
    with pytest.raises(LongMemError, match="CPU memory"):
        model.new_memory(1, offload=True, device="meta")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_pinning_without_cuda_is_an_error(model):
    with pytest.raises(LongMemError, match="pin_memory needs .* CUDA"):
        model.new_memory(1, offload=True, pin_memory=True)
