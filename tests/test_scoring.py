"""Long-document scoring: every token scored exactly once, never with itself in memory."""

import torch

from conftest import VOCAB, small_config, tiny_backbone
from longmem import LongMemForCausalLM
from longmem.eval.scoring import BackboneScorer, LocalScorer, MemoryScorer, score_document


def make(family="llama"):
    return LongMemForCausalLM.from_backbone(tiny_backbone(family), small_config(memory_size=256)).eval()


def test_every_token_scored_once_against_direct_computation():
    model = make()
    ids = torch.randint(0, VOCAB, (50,))
    r = score_document(LocalScorer(model), ids)
    assert r.first_target == 1 and r.logprobs.shape == (49,)
    # hand-computed: segments [0,16) [16,32) [32,48) [48,50), each predicting its next tokens
    ref = []
    for s in (0, 16, 32, 48):
        x = ids[s:s + 16][None]
        logp = torch.log_softmax(model(x).logits.float(), -1)[0]
        for i in range(x.shape[1]):
            if s + i + 1 < 50:
                ref.append(logp[i, ids[s + i + 1]])
    torch.testing.assert_close(r.logprobs, torch.stack(ref), rtol=1e-5, atol=1e-5)


def test_backbone_scorer_matches_backbone():
    model = make("gpt2")
    ids = torch.randint(0, VOCAB, (20,))
    r = score_document(BackboneScorer(model), ids)
    logp = torch.log_softmax(model.backbone(ids[None, :16]).logits.float(), -1)[0]
    torch.testing.assert_close(r.logprobs[:15], logp[torch.arange(15), ids[1:16]], rtol=1e-5, atol=1e-5)


def test_memory_never_holds_the_scored_segment():
    model = make()
    ids = torch.randint(0, VOCAB, (70,))
    seen = []
    forward = model.forward

    def spy(x, memory=None, **kw):
        seen.append((len(memory), int(memory.num_pending[0])))
        return forward(x, memory=memory, **kw)

    model.forward = spy
    scorer = MemoryScorer(model)
    r = score_document(scorer, ids, score_from=20)  # rounded up to the segment at 32
    assert r.first_target == 33 and r.logprobs.shape == (37,)
    assert seen == [(32, 0), (48, 0), (64, 0)]  # memory = exactly the tokens before the segment
    assert len(scorer.memory) == 70
    # the prefix was memorized, not scored; the memory changes the scores of later segments
    model.forward = forward
    local = score_document(LocalScorer(model), ids, score_from=20)
    assert local.logprobs.shape == r.logprobs.shape and not torch.allclose(local.logprobs, r.logprobs)
