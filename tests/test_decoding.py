"""IncrementalDecoder (key/value caches) against RecomputeDecoder (full recompute), the reference.

Both decoders get the same prompt and the same memory; the reference's greedy token is fed to both
at every step. Tiny GPT-2 and Llama-GQA backbones, SideNets with perturbed weights and random non-zero
gates (so memory and every SideNet layer change the logits), batch 2 with left padding, decoding
across several window overflows.
"""

import pytest
import torch

from conftest import VOCAB
from longmem.backbone.base import BackboneAdapter
from longmem.decoding import IncrementalDecoder, RecomputeDecoder, make_decoder
from longmem.sidenet import LayerCache
from test_reference_forward import perturbed_model

STEPS = 40  # 5 local prompt tokens + 40 steps, segment_length 16: the window overflows at steps 12, 20, 28, 36
# prompt lengths of the two rows (left-padded to 37 = 2 memorized segments + 5 local tokens):
PROMPTS = {
    "unpadded": (37, 37),      # no attention_mask
    "padded prefix": (37, 30),  # row 1's padding is in the memorized prefix only
    "padded window": (37, 3),   # row 1 memorizes nothing from its prompt and has padding in the window
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
            before = ref.ctx.shape[1]
            logits = ref.step(token), inc.step(token)
            overflows += ref.ctx.shape[1] < before
    assert worst <= 1e-4, f"logits differ by {worst:.2e}"
    assert overflows >= 2
    for name in ref.memory.state:  # the memory is written exactly as by the reference
        assert torch.equal(getattr(ref.memory, name), getattr(inc.memory, name)), name
    assert torch.equal(ref.ctx, inc.ctx)


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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_incremental_equals_recompute_on_cuda(family):
    """Every tensor the caches and steps create lands on the model's device."""
    assert_decoders_agree(perturbed_model(family, seed=5).cuda(), PROMPTS["padded window"])


def test_make_decoder():
    model = perturbed_model("llama")
    memory = model.new_memory(1)
    assert type(make_decoder(model, memory)) is IncrementalDecoder
    ref = make_decoder(model, memory, incremental=False)
    assert type(ref) is RecomputeDecoder and ref.memory is memory
