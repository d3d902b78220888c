"""Decoders against references: IncrementalDecoder (key/value caches) against RecomputeDecoder (full
recompute), and every row of a left-padded batch against the same row decoded alone.

Both decoders get the same prompt and the same memory; the reference's greedy token is fed to both
at every step. Tiny GPT-2 and Llama-GQA backbones, SideNets with perturbed weights and random non-zero
gates (so memory and every SideNet layer change the logits), batches with left padding, decoding
across several window overflows. A batch's rows must not depend on each other: each row's logits,
retrievals and memory equal those of the row alone in a batch of one, without padding.
"""

import pytest
import torch

from conftest import VOCAB
from longmem.backbone.base import BackboneAdapter
from longmem.errors import LongMemError
from longmem.decoding import IncrementalDecoder, RecomputeDecoder, make_decoder
from longmem.sidenet import LayerCache
from test_reference_forward import perturbed_model

STEPS = 40  # segment_length 16: a row with t local prompt tokens overflows at steps 17 - t, then every 8 steps
# prompt lengths of the two rows, left-padded (each row keeps its own segments: 37 = 2 memorized segments + 5 local):
PROMPTS = {
    "unpadded": (37, 37),        # no attention_mask
    "padded prefix": (37, 21),   # row 1 memorizes one segment less; both windows hold 5 tokens (no padding there)
    "padded window": (37, 3),    # row 1 memorizes nothing and overflows at other steps than row 0
    "both padded": (37, 30),     # row 1 memorizes one segment and holds 14 tokens in its window
}


def prompt(lengths, seed=0):
    """(B, N) left-padded random prompts and their (B, N) mask (None when no row is padded)."""
    N = max(lengths)
    ids = torch.randint(1, VOCAB, (len(lengths), N), generator=torch.Generator().manual_seed(seed))
    mask = torch.stack([torch.arange(N) >= N - n for n in lengths]).long()
    ids = ids.masked_fill(mask == 0, 0)
    return ids, (None if bool(mask.all()) else mask)


@torch.no_grad()
def assert_decoders_agree(model, lengths, steps=STEPS):
    """Greedy decoding driven by the reference; both decoders agree at every step and on the memory at the end."""
    ids, mask = (None if t is None else t.to(model.device) for t in prompt(lengths))
    ref = RecomputeDecoder(model, model.new_memory(len(lengths)))
    inc = IncrementalDecoder(model, model.new_memory(len(lengths)))
    logits = ref.prefill(ids, mask), inc.prefill(ids, mask)
    worst, overflows = 0.0, 0
    for i in range(steps + 1):
        assert logits[1].dtype == torch.float32 and logits[1].shape == logits[0].shape
        worst = max(worst, float((logits[0] - logits[1]).abs().max()))
        token = logits[0].argmax(-1)
        assert torch.equal(token, logits[1].argmax(-1)), f"greedy tokens differ at step {i}"
        assert (ref.retrieval is None) == (inc.retrieval is None), f"step {i}"
        assert ref.retrieval is not None, f"the memory is empty at step {i}"  # memory attention is compared
        G = model.adapter.num_heads // model.adapter.num_kv_heads
        assert inc.retrieval.slots.shape == (len(lengths), model.adapter.num_kv_heads, G, model.config.topk_chunks)
        assert torch.equal(ref.retrieval.slots, inc.retrieval.slots), f"retrieved chunks differ at step {i}"
        assert torch.equal(ref.retrieval.valid, inc.retrieval.valid)
        if i < steps:
            before = ref.window.ids.shape[1]
            logits = ref.step(token), inc.step(token)
            overflows += ref.window.ids.shape[1] < before
    assert worst <= 1e-4, f"logits differ by {worst:.2e}"
    assert overflows >= 2
    for name in ref.memory.state:  # the memory is written exactly as by the reference
        assert torch.equal(getattr(ref.memory, name), getattr(inc.memory, name)), name
    assert torch.equal(ref.window.ids, inc.window.ids) and torch.equal(ref.window.mask, inc.window.mask)


@pytest.mark.parametrize("case", PROMPTS)
def test_incremental_equals_recompute(family, case):
    assert_decoders_agree(perturbed_model(family, seed=5), PROMPTS[case])


@pytest.mark.parametrize("broken", ["sidenet cache", "backbone cache"])
def test_equality_check_catches_an_ignored_cache(family, broken, monkeypatch):
    """The comparison above fails when a step ignores either cache (the new token then attends only to itself)."""
    model = perturbed_model(family, seed=5)
    if broken == "sidenet cache":
        update = LayerCache.update
        monkeypatch.setattr(LayerCache, "update", lambda self, k, v: (update(self, k, v), (k, v))[1])
    else:
        run = BackboneAdapter.run

        def run_without_past(self, input_ids, attention_mask, position_ids, memory_layer, cache=None):
            if cache is not None and cache.get_seq_length():  # a step: forget the cached tokens
                T = input_ids.shape[1]
                attention_mask = None if attention_mask is None else attention_mask[:, -T:]
                cache = self.new_cache()
            return run(self, input_ids, attention_mask, position_ids, memory_layer, cache)
        monkeypatch.setattr(BackboneAdapter, "run", run_without_past)
    with pytest.raises(AssertionError):
        assert_decoders_agree(model, PROMPTS["padded prefix"])


ROWS = (10, 53, 32)  # shorter than a segment; three segments + 5 tokens; exactly two segments (16 local tokens)


def logical_memory(bank):
    """A one-row bank's contents in stream order, whatever ring slots and storage padding hold them."""
    order, p = bank.write_order(0), int(bank.num_pending[0])
    keys, values = bank.tokens(0)  # (Hkv, n*C, D) each, oldest first
    return {"keys": keys, "values": values, "chunk_keys": bank.chunk_keys[0][:, order],
            "token_ids": bank.token_ids[0, 0][order], "chunk_positions": bank.chunk_positions(0),
            "num_chunks": bank.num_chunks[0], "written": bank.written[0], "num_pending": bank.num_pending[0],
            "pending_keys": bank.pending_keys[0, :p], "pending_values": bank.pending_values[0, :p],
            "pending_token_ids": bank.pending_token_ids[0, :p]}


def assert_row_retrieval(batch, b, solo, step):
    """Row b's retrieval in the batch = the row's alone: the same top-k scores (the batch's k may be larger: the rest
    is invalid). Scores, not slots: a greedy stream repeats itself, and chunks whose keys tie exactly may come in
    either order or either one at the k-th place."""
    if solo is None:  # the row alone holds nothing yet
        assert batch is None or not bool(batch.valid[b].any()), f"row {b} retrieved from an empty memory at {step}"
        return
    k = solo.slots.shape[-1]
    assert bool(batch.valid[b, ..., :k].all()) and not bool(batch.valid[b, ..., k:].any()), f"row {b}, step {step}"
    torch.testing.assert_close(batch.scores[b, ..., :k], solo.scores[0], rtol=0, atol=1e-5,
                               msg=f"row {b} retrieved other chunks at step {step}")


@torch.no_grad()
def assert_rows_decode_as_if_alone(model, decoder):
    """A left-padded batch of very different prompt lengths: every row's logits, retrievals and memory equal those
    of the row decoded alone (batch 1, no padding) by the reference, across overflows at different steps per row."""
    ids, mask = (t.to(model.device) for t in prompt(ROWS, seed=1))
    batch = decoder(model, model.new_memory(len(ROWS)))
    solo = [RecomputeDecoder(model, model.new_memory(1)) for _ in ROWS]
    logits = batch.prefill(ids, mask)
    solo_logits = torch.cat([d.prefill(ids[b:b + 1, -n:]) for b, (d, n) in enumerate(zip(solo, ROWS))])  # (B, V)
    worst, overflow_steps = 0.0, [set() for _ in ROWS]
    for i in range(STEPS + 1):
        worst = max(worst, float((logits - solo_logits).abs().max()))
        token = solo_logits.argmax(-1)  # (B,) each row's own greedy token
        assert torch.equal(token, logits.argmax(-1)), f"greedy tokens differ at step {i}"
        for b, d in enumerate(solo):
            assert_row_retrieval(batch.retrieval, b, d.retrieval, i)
        if i < STEPS:
            logits = batch.step(token)
            widths = [d.window.ids.shape[1] for d in solo]
            solo_logits = torch.cat([d.step(token[b:b + 1]) for b, d in enumerate(solo)])
            for b, d in enumerate(solo):
                if d.window.ids.shape[1] < widths[b]:
                    overflow_steps[b].add(i)
    assert worst <= 1e-4, f"logits differ by {worst:.2e}"
    assert all(len(s) >= 2 for s in overflow_steps)
    assert len({frozenset(s) for s in overflow_steps}) == len(ROWS)  # the rows overflow at different steps
    for b, d in enumerate(solo):
        assert bool(d.memory.num_chunks[0] > 0)
        got, want = logical_memory(batch.memory.select([b])), logical_memory(d.memory)
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-5, msg=f"row {b}: {name}")


@pytest.mark.parametrize("decoder", [RecomputeDecoder, IncrementalDecoder])
def test_batched_rows_decode_as_if_alone(family, decoder):
    assert_rows_decode_as_if_alone(perturbed_model(family, seed=5), decoder)


@pytest.mark.parametrize("bad, message", [(lambda m: m.flip(1), "not left padding"),
                                          (lambda m: m[:, 1:], "attention_mask has shape")])
def test_prefill_rejects_a_bad_mask(bad, message):
    model = perturbed_model("gpt2")
    ids, mask = prompt((5, 3))
    for decoder in (RecomputeDecoder, IncrementalDecoder):
        with pytest.raises(LongMemError, match=message):
            decoder(model, model.new_memory(2)).prefill(ids, bad(mask))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_incremental_equals_recompute_on_cuda(family):
    """Every tensor the caches and steps create lands on the model's device."""
    assert_decoders_agree(perturbed_model(family, seed=5).cuda(), PROMPTS["padded window"])
    assert_rows_decode_as_if_alone(perturbed_model(family, seed=5).cuda(), IncrementalDecoder)


def test_make_decoder():
    model = perturbed_model("llama")
    memory = model.new_memory(1)
    assert type(make_decoder(model, memory)) is IncrementalDecoder
    ref = make_decoder(model, memory, incremental=False)
    assert type(ref) is RecomputeDecoder and ref.memory is memory
