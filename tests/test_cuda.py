"""The CUDA path: the same model and memory on a GPU give the CPU's numbers (skipped without a GPU).

Every tensor a forward creates (masks, positions, slot offsets, chunk counters) must land on
the input's device; on a CPU-only machine a misplaced tensor cannot show, so these tests are
what checks placement.
"""

import copy

import pytest
import torch

from conftest import VOCAB, small_config, tiny_backbone
from longmem import LongMemForCausalLM, MemoryBank, MemorySpec

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TOL = dict(rtol=1e-4, atol=1e-4)


def pair(family):
    cpu = LongMemForCausalLM.from_backbone(tiny_backbone(family), small_config())
    with torch.no_grad():
        for p in cpu.sidenet.parameters():
            p.add_(0.1 * torch.randn_like(p))
        cpu.sidenet.layers[cpu.sidenet.memory_layer].gate.normal_(0, 2)
    return cpu, copy.deepcopy(cpu).cuda()


def test_padded_segments_with_memory_match_cpu(family):
    cpu, gpu = pair(family)
    g = torch.Generator().manual_seed(0)
    mem_cpu, mem_gpu = cpu.new_memory(2), gpu.new_memory(2)
    assert mem_gpu.device.type == "cuda"
    for step in range(6):  # 96 tokens through a 64-token memory: FIFO eviction on the GPU too
        x = torch.randint(0, VOCAB, (2, 16), generator=g)
        mask = torch.ones_like(x)
        mask[step % 2, 11:] = 0  # right padding, alternating rows
        out_cpu = cpu(x, memory=mem_cpu, attention_mask=mask, labels=x)
        out_gpu = gpu(x.cuda(), memory=mem_gpu, attention_mask=mask.cuda(), labels=x.cuda())
        torch.testing.assert_close(out_gpu.logits.cpu(), out_cpu.logits, **TOL)
        torch.testing.assert_close(out_gpu.loss.cpu(), out_cpu.loss, **TOL)
    assert mem_gpu.sizes.tolist() == mem_cpu.sizes.tolist()
    for row in range(2):
        torch.testing.assert_close(mem_gpu.tokens(row)[0].cpu(), mem_cpu.tokens(row)[0], **TOL)
    mem_gpu.reset(rows=[0])
    assert mem_gpu.sizes.tolist()[0] == 0


def test_memorize_generate_and_saved_memory_on_gpu(family, tmp_path):
    cpu, gpu = pair(family)
    prompt = torch.randint(0, VOCAB, (2, 37), generator=torch.Generator().manual_seed(1))
    mem_cpu, mem_gpu = cpu.new_memory(2), gpu.new_memory(2)
    out_cpu = cpu.generate(prompt, memory=mem_cpu, max_new_tokens=8, temperature=0)
    out_gpu = gpu.generate(prompt.cuda(), memory=mem_gpu, max_new_tokens=8, temperature=0)
    assert torch.equal(out_gpu.cpu(), out_cpu)
    mem_gpu.save(tmp_path / "m.safetensors")
    loaded = MemoryBank.load(tmp_path / "m.safetensors", device="cuda")
    x = torch.randint(0, VOCAB, (2, 16)).cuda()
    torch.testing.assert_close(gpu(x, memory=loaded).logits, gpu(x, memory=mem_gpu).logits, rtol=0, atol=0)


def test_offloaded_pinned_memory_matches_a_memory_on_the_gpu(family, tmp_path):
    _, gpu = pair(family)
    on_gpu, offloaded = gpu.new_memory(2), gpu.new_memory(2, offload=True)
    assert offloaded.device.type == "cpu" and offloaded.compute_device == gpu.device
    g = torch.Generator().manual_seed(2)
    for step in range(6):  # eviction on the CPU side too
        x = torch.randint(0, VOCAB, (2, 16), generator=g).cuda()
        mask = torch.ones_like(x)
        mask[step % 2, 11:] = 0
        a = gpu(x, memory=on_gpu, attention_mask=mask)
        b = gpu(x, memory=offloaded, attention_mask=mask)
        torch.testing.assert_close(b.logits, a.logits, **TOL)
        if b.retrieval is not None:
            assert b.retrieval.slots.device.type == "cuda"
    assert offloaded.keys.is_pinned() and offloaded.values.is_pinned()
    for row in range(2):
        torch.testing.assert_close(offloaded.tokens(row)[0], on_gpu.tokens(row)[0].cpu(), **TOL)
    prompt = torch.randint(0, VOCAB, (2, 37), generator=g).cuda()
    out_gpu = gpu.generate(prompt, memory=gpu.new_memory(2), max_new_tokens=8, temperature=0)
    out_off = gpu.generate(prompt, memory=gpu.new_memory(2, offload=True), max_new_tokens=8, temperature=0)
    assert torch.equal(out_off, out_gpu)
    offloaded.save(tmp_path / "m.safetensors")
    loaded = gpu.load_memory(tmp_path / "m.safetensors", offload=True)
    assert loaded.keys.is_pinned() and loaded.compute_device == gpu.device
    x = torch.randint(0, VOCAB, (2, 16)).cuda()
    torch.testing.assert_close(gpu(x, memory=loaded).logits, gpu(x, memory=offloaded).logits, rtol=0, atol=0)


def test_offloaded_int8_memory_moves_int8_and_dequantises_on_the_gpu():
    spec = MemorySpec(num_kv_heads=2, head_dim=8, chunk_size=4, capacity=256, dtype="int8", fingerprint="t")
    on_gpu = MemoryBank(spec, 2, device="cuda")
    offloaded = MemoryBank(spec, 2, compute_device="cuda", pin_memory=True)
    kv = torch.randn(2, 100, 2, 8).cuda()
    on_gpu.write(kv, -kv)
    offloaded.write(kv, -kv)
    slots = torch.randint(0, 25, (2, 2, 5, 3)).cuda()
    for x, y in zip(on_gpu.gather(slots), offloaded.gather(slots)):
        assert y.device.type == "cuda"
        torch.testing.assert_close(y, x, rtol=0, atol=0)
