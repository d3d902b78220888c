"""int8 memories against references: quantisation by hand, the bfloat16 bank they approximate, their byte count."""

import pytest
import torch

from conftest import VOCAB, small_config, tiny_backbone
from longmem import LongMemForCausalLM, MemoryBank, MemorySpec
from longmem.memory.quant import dequantize, quantize

H, D, C = 2, 64, 4


def bank(dtype, capacity=64, rows=2):
    return MemoryBank(MemorySpec(num_kv_heads=H, head_dim=D, chunk_size=C, capacity=capacity, dtype=dtype,
                                 fingerprint="test"), rows)


def test_quantize_is_within_half_a_step():
    x = torch.randn(5, 7, D) * torch.rand(5, 7, 1) * 10
    x[0, 0] = 0  # an all-zero vector stays zero
    q, s = quantize(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float16 and s.shape == (5, 7)
    assert torch.equal(s, (x.abs().amax(-1) / 127).half())
    err = (dequantize(q, s, torch.float32) - x).abs()
    assert bool((err <= s.float()[..., None] / 2 * 1.01 + 1e-6).all())  # within half a step (+ fp16 rounding of s)
    assert not dequantize(q, s, torch.float32)[0, 0].any()


def test_int8_bank_stores_the_quantised_tokens_and_searches_dequantised_keys(tmp_path):
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(2, 50, H, D, generator=g), torch.randn(2, 50, H, D, generator=g)  # 12 chunks + 2 pending
    mem = bank("int8")
    mem.write(k, v)
    for b in range(2):
        keys, values = mem.tokens(b)  # (H, N, D) bfloat16
        ref_k = dequantize(*quantize(k[b, :48].bfloat16().transpose(0, 1)))  # quantised by hand, per token
        ref_v = dequantize(*quantize(v[b, :48].bfloat16().transpose(0, 1)))
        assert keys.dtype == torch.bfloat16 and torch.equal(keys, ref_k) and torch.equal(values, ref_v)
        means = k[b, :48].bfloat16().float().view(12, C, H, D).mean(1).transpose(0, 1)  # (H, 12, D)
        torch.testing.assert_close(mem.search_keys(12)[b].float(), dequantize(*quantize(means)).float())
    q = torch.randn(2, H, 3, D, generator=g)
    found = mem.search(q, 4)
    ref = (q.bfloat16() @ mem.search_keys(12).transpose(-1, -2)).topk(4, dim=-1)  # exact over dequantised keys
    assert torch.equal(found.scores, ref.values)
    gk, gv = mem.gather(found.slots)  # dequantised, the chunks' tokens
    tk = mem.tokens(0)[0].view(H, 12, C, D)
    assert torch.equal(gk[0, 1, 2, :C], tk[1, found.slots[0, 1, 2, 0]])
    assert gv.dtype == torch.bfloat16
    mem.save(tmp_path / "m.safetensors")
    back = MemoryBank.load(tmp_path / "m.safetensors")
    assert back.spec.dtype == "int8" and torch.equal(back.tokens(1)[1], mem.tokens(1)[1])
    assert torch.equal(back.search(q, 4).slots, found.slots)


def test_int8_bytes_per_token_are_at_most_055_of_bfloat16():
    sizes = {}
    for dtype in ("bfloat16", "int8"):
        mem = bank(dtype, capacity=256, rows=1)
        mem.write(torch.randn(1, 256, H, D), torch.randn(1, 256, H, D))
        sizes[dtype] = mem.nbytes() / len(mem)
    assert sizes["bfloat16"] == H * (2 * D * 2 + D * 2 / C) + 4  # keys, values, chunk keys; int32 token id
    assert sizes["int8"] == H * (2 * D + 2 * 2 + (D + 2) / C) + 4  # + fp16 scales per token and per chunk key
    assert sizes["int8"] / sizes["bfloat16"] <= 0.55


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_forward_with_an_int8_memory_is_close_to_bfloat16(family):
    outs = {}
    ids = torch.randint(1, VOCAB, (1, 64), generator=torch.Generator().manual_seed(1))
    for dtype in ("bfloat16", "int8"):
        model = LongMemForCausalLM.from_backbone(tiny_backbone(family), small_config(memory_dtype=dtype)).eval()
        memory = model.new_memory(1)
        model.memorize(ids[:, :48], memory)
        outs[dtype] = model(ids[:, 48:], memory=memory, labels=ids[:, 48:])
    assert outs["int8"].retrieval is not None
    torch.testing.assert_close(outs["int8"].logits, outs["bfloat16"].logits, rtol=0.02, atol=0.02)
    assert not torch.equal(outs["int8"].logits, outs["bfloat16"].logits)  # the int8 path ran


@pytest.mark.parametrize("dtype", ["int8", "float16"])
def test_writes_and_stacks_under_cpu_autocast(dtype):
    """CPU autocast refuses float16 tensors in torch.cat (int8 scales, float16 memories): the bank must not care."""
    plain, cast = bank(dtype, rows=1), bank(dtype, rows=1)
    k = torch.randn(1, 70, H, D)
    plain.write(k, k)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast.write(k[:, :33], k[:, :33])
        cast.write(k[:, 33:], k[:, 33:])
        both = MemoryBank.stack([cast, cast])
    assert torch.equal(both.tokens(1)[0], plain.tokens(0)[0])
