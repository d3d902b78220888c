"""`memorize` skips the leading segments a memory would evict: the bank ends exactly as if it had read them all."""

import pytest
import torch

from conftest import VOCAB, small_config, tiny_backbone
from longmem import LongMemForCausalLM


def make(family, memory_size):
    # segment 16, chunk 2; capacities below are not multiples of the segment
    return LongMemForCausalLM.from_backbone(tiny_backbone(family), small_config(memory_size=memory_size)).eval()


def read_everything(model, ids, memory, mask=None):
    """Reference: every segment through the backbone and into the bank (memorize of one segment skips nothing)."""
    T = model.config.segment_length
    for s in range(0, ids.shape[1], T):
        model.memorize(ids[:, s:s + T], memory, None if mask is None else mask[:, s:s + T])
    return memory


def assert_same_bank(model, got, want, probe):
    for b in range(got.batch_size):
        for g, w in zip(got.tokens(b), want.tokens(b)):
            torch.testing.assert_close(g, w, rtol=0, atol=0)
        assert torch.equal(got.chunk_positions(b), want.chunk_positions(b))
        p = int(want.num_pending[b])
        assert torch.equal(got.pending_keys[b, :p], want.pending_keys[b, :p])
        assert torch.equal(got.pending_values[b, :p], want.pending_values[b, :p])
    for name in ("written", "num_pending", "num_chunks", "next_slot"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    # the next forward reads (and then writes) both memories identically
    torch.testing.assert_close(model(probe, memory=got).logits, model(probe, memory=want).logits, rtol=0, atol=0)


def count_backbone_runs(model):
    calls = []
    run = model.adapter.run

    def spy(input_ids, *a, **kw):
        calls.append(input_ids.shape[1])
        return run(input_ids, *a, **kw)

    model.adapter.run = spy
    return calls


@pytest.mark.parametrize("memory_size, prefill, n", [
    (38, 0, 149), (64, 0, 149),
    (38, 21, 118),  # 139 tokens in all: the memory keeps stream positions [100, 138), segment 4 ends at 101
])
def test_skip_equals_reading_everything(family, memory_size, prefill, n):
    model = make(family, memory_size)
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, n))
    got, want = model.new_memory(2), model.new_memory(2)
    if prefill:
        first = torch.randint(0, VOCAB, (2, prefill))
        model.memorize(first, got)
        model.memorize(first, want)
    calls = count_backbone_runs(model)
    model.memorize(ids, got)
    runs = len(calls)
    read_everything(model, ids, want)
    assert runs < len(calls) - runs  # segments were skipped
    assert runs <= -(-memory_size // 16) + 2
    assert_same_bank(model, got, want, torch.randint(0, VOCAB, (2, 16)))


def test_skip_with_padding_and_a_prefilled_memory(family):
    model = make(family, 38)
    torch.manual_seed(2)
    ids = torch.randint(0, VOCAB, (3, 16 * 8 + 3))
    mask = torch.ones_like(ids)
    mask[0, :112] = 0   # left padding over 7 segments: the row's prefill outlives them
    mask[1, :7] = 0
    mask[2, 60:75] = 0  # a hole in the middle
    prefill = torch.randint(0, VOCAB, (3, 21))  # 21 tokens: a pending token left in every row
    got, want = model.new_memory(3), model.new_memory(3)
    model.memorize(prefill, got)
    model.memorize(prefill, want)
    calls = count_backbone_runs(model)
    model.memorize(ids, got, attention_mask=mask)
    runs = len(calls)
    read_everything(model, ids, want, mask)
    assert 0 < runs < len(calls) - runs
    assert_same_bank(model, got, want, torch.randint(0, VOCAB, (3, 16)))


def test_a_row_that_keeps_a_segment_keeps_it_for_all():
    """Row 0 is mostly padding: its few real tokens sit in the first segment and must survive, so nothing is skipped."""
    model = make("llama", 64)
    ids = torch.randint(0, VOCAB, (2, 16 * 6))
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0
    calls = count_backbone_runs(model)
    got = model.memorize(ids, model.new_memory(2), attention_mask=mask)
    assert len(calls) == 6
    want = read_everything(model, ids, model.new_memory(2), mask)
    assert_same_bank(model, got, want, torch.randint(0, VOCAB, (2, 16)))


def test_advance_moves_the_counters_as_write_does():
    model = make("llama", 38)
    counts = torch.tensor([0, 1, 37, 38, 39, 101])
    check_advance(model, counts)
    check_advance(make("llama", 400), torch.tensor([0, 3, 300]))  # past the 64 slots storage starts with


def check_advance(model, counts):
    B, n = len(counts), int(counts.max())
    written, counted = model.new_memory(B), model.new_memory(B)
    for m in (written, counted):
        model.memorize(torch.randint(0, VOCAB, (B, 5)), m)  # one pending token per row
    keys = torch.randn(B, n, 2, 8)
    mask = (torch.arange(n)[None] < counts[:, None]).long()
    written.write(keys, keys, mask)
    counted.advance(counts)
    for name in ("written", "num_pending", "num_chunks", "next_slot"):
        assert torch.equal(getattr(counted, name), getattr(written, name)), name
    assert counted.keys.shape == written.keys.shape
