"""One adaptation step (`longmem.training.step.train_step`) against a hand-written step.

The reference does what a step means, with plain SGD (lr 1, so a parameter's change is
minus its gradient): reset the rows that start a document, forward with memory and the
padding mask, mean NLL over the real targets, backward, clip the global gradient norm.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import VOCAB, small_config, tiny_backbone
from longmem import LongMemForCausalLM
from longmem.training.step import next_token_loss, train_step
from longmem.training.streams import IGNORE_INDEX, StreamBatch


class NoSchedule:
    def __init__(self):
        self.steps = 0

    def step(self):
        self.steps += 1


def batch(seed, new_document=(False, False), pad_row=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, VOCAB, (2, 16), generator=g)
    mask = torch.ones_like(x)
    if pad_row is not None:
        mask[pad_row, 10:] = 0
    labels = torch.cat([x[:, 1:], torch.full((2, 1), IGNORE_INDEX)], dim=1).masked_fill(mask == 0, IGNORE_INDEX)
    labels[:, 9] = labels[:, 9].masked_fill(mask[:, 10] == 0, IGNORE_INDEX)  # no target past the last real token
    return StreamBatch(input_ids=x, labels=labels, attention_mask=mask,
                       new_document=torch.tensor(new_document), doc_index=torch.zeros(2, dtype=torch.long))


def model_pair(family):
    model = LongMemForCausalLM.from_backbone(tiny_backbone(family), small_config())
    with torch.no_grad():
        model.sidenet.layers[model.sidenet.memory_layer].gate.fill_(0.5)
    return model, copy.deepcopy(model)


def reference_step(model, b, memory, grad_clip):
    """Hand-written step: returns (loss, {name: expected parameter change})."""
    memory.reset(rows=[i for i, new in enumerate(b.new_document.tolist()) if new])
    out = model(b.input_ids, memory=memory, attention_mask=b.attention_mask)
    logp = F.log_softmax(out.logits.double(), dim=-1)
    keep = b.labels != IGNORE_INDEX
    nll = -logp.gather(-1, b.labels.clamp(min=0)[..., None])[..., 0]
    loss = nll[keep].mean()
    params = dict(model.sidenet.named_parameters())
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g.float() for p, g in zip(params.values(), grads)]
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
    scale = min(1.0, grad_clip / (float(norm) + 1e-6)) if grad_clip > 0 else 1.0
    return loss.float(), {n: -scale * g for n, g in zip(params, grads)}, float(norm)


@pytest.mark.parametrize("grad_clip", [0.0, 0.01, 1e9])
def test_step_equals_hand_written_step(family, grad_clip):
    model, ref = model_pair(family)
    mem, ref_mem = model.new_memory(2), ref.new_memory(2)
    opt = torch.optim.SGD(model.sidenet.parameters(), lr=1.0)
    sched = NoSchedule()
    steps = [batch(0), batch(1, pad_row=1), batch(2, new_document=(True, False), pad_row=0)]
    for i, b in enumerate(steps):
        before = {n: p.detach().clone() for n, p in model.sidenet.named_parameters()}
        want_loss, want_delta, norm = reference_step(ref, b, ref_mem, grad_clip)
        loss = train_step(model, b, mem, opt, sched, torch.device("cpu"), grad_clip=grad_clip, precision="fp32").loss
        assert not loss.requires_grad
        torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
        if grad_clip == 0.01:
            assert norm > 0.01  # clipping really happened
        for n, p in model.sidenet.named_parameters():
            torch.testing.assert_close(p.detach() - before[n], want_delta[n], rtol=1e-3, atol=1e-6, msg=n)
        with torch.no_grad():  # keep the reference's weights equal to the trained model's
            for (n, p), q in zip(ref.sidenet.named_parameters(), model.sidenet.parameters()):
                p.copy_(q)
        assert sched.steps == i + 1
        assert mem.sizes.tolist() == ref_mem.sizes.tolist()
        assert int(mem.num_pending.sum()) == int(ref_mem.num_pending.sum())
    assert mem.sizes.tolist() == [10, 42]  # row 0 reset before the last (padded) segment; row 1: 16 + 10 + 16


def test_parameter_without_gradient_is_not_updated():
    """A step in which every row's memory is empty gives the gate no gradient: Adam must leave it alone."""
    model, _ = model_pair("llama")
    gate = model.sidenet.layers[model.sidenet.memory_layer].gate
    mem = model.new_memory(2)
    opt = torch.optim.AdamW(model.sidenet.parameters(), lr=1e-2, weight_decay=0.1)
    train_step(model, batch(0), mem, opt, NoSchedule(), torch.device("cpu"), grad_clip=0.0, precision="fp32")
    train_step(model, batch(1), mem, opt, NoSchedule(), torch.device("cpu"), grad_clip=0.0, precision="fp32")
    assert gate.grad is not None  # the second step read memory: the gate learned
    moved = gate.detach().clone()
    train_step(model, batch(2, new_document=(True, True)), mem, opt, NoSchedule(), torch.device("cpu"),
               grad_clip=0.0, precision="fp32")
    assert gate.grad is None
    assert torch.equal(gate.detach(), moved)


def test_bf16_precision_is_autocast():
    model, ref = model_pair("gpt2")
    b = batch(0, pad_row=1)
    loss32 = train_step(model, b, model.new_memory(2), torch.optim.SGD(model.sidenet.parameters(), lr=0.0),
                        NoSchedule(), torch.device("cpu"), grad_clip=0.0, precision="fp32").loss
    loss16 = train_step(ref, b, ref.new_memory(2), torch.optim.SGD(ref.sidenet.parameters(), lr=0.0),
                        NoSchedule(), torch.device("cpu"), grad_clip=0.0, precision="bf16").loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want16 = next_token_loss(ref(b.input_ids, attention_mask=b.attention_mask).logits, b.labels)
    assert float(loss32) != float(loss16)
    torch.testing.assert_close(loss16, want16, rtol=0, atol=0)
    torch.testing.assert_close(loss16, loss32, rtol=2e-2, atol=2e-2)


def test_next_token_loss_ignores_targets_marked_ignore():
    logits = torch.randn(1, 3, VOCAB)
    labels = torch.tensor([[5, IGNORE_INDEX, 7]])
    want = -(F.log_softmax(logits[0, 0], -1)[5] + F.log_softmax(logits[0, 2], -1)[7]) / 2
    torch.testing.assert_close(next_token_loss(logits, labels), want)
