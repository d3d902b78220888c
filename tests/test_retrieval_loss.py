"""The auxiliary retrieval loss (`longmem.retrieval_loss`) against a per-query loop written from its definition,
its place in the forward (logits and attended chunks unchanged) and in a training step, and that minimising it
does what it is for: the chunks holding each query's next token rise into the top k."""

import copy
import math

import pytest
import torch

from conftest import VOCAB, small_config, tiny_backbone
from longmem import LongMemForCausalLM, MemoryBank, MemorySpec
from longmem.errors import LongMemError
from longmem.loss import IGNORE_INDEX, next_token_loss
from longmem.memory import make_retriever
from longmem.retrieval_loss import RetrievalSupervision, retrieval_loss
from longmem.training.step import train_step
from test_train_step import NoSchedule, batch

H, D, C = 2, 8, 2


def memory_with_tokens(n_tokens=48, seed=0, rows=2):
    """A bank of n_tokens per row with random keys and token ids from a small vocabulary (so ids repeat)."""
    g = torch.Generator().manual_seed(seed)
    mem = MemoryBank(MemorySpec(num_kv_heads=H, head_dim=D, chunk_size=C, capacity=64, dtype="float32",
                                fingerprint="t"), rows)
    keys = torch.randn(rows, n_tokens, H, D, generator=g)
    mem.write(keys, torch.randn(rows, n_tokens, H, D, generator=g),
              token_ids=torch.randint(0, 6, (rows, n_tokens), generator=g))
    return mem


def loop_reference(queries, mem, found, targets):
    """The loss written from its definition, one query at a time, in float64."""
    B, Hkv, Q, _ = queries.shape
    T = targets.shape[1]
    keys = mem.search_keys(mem.slots_in_use)
    terms = []
    for b in range(B):
        for h in range(Hkv):
            for i in range(Q):
                y = int(targets[b, i % T])
                valid = found.valid[b, h, i]
                slots = found.slots[b, h, i][valid]
                s = torch.stack([queries[b, h, i].double() @ keys[b, h, s_].double() for s_ in slots]) / math.sqrt(D)
                pos = torch.tensor([bool((mem.token_ids[b, 0, s_] == y).any()) for s_ in slots])
                if y == IGNORE_INDEX or not pos.any() or pos.all():
                    continue
                terms.append(s.logsumexp(0) - s[pos].logsumexp(0))
    return torch.stack(terms).mean(), len(terms)


def test_loss_and_gradient_equal_a_loop_over_queries():
    mem = memory_with_tokens()
    g = torch.Generator().manual_seed(1)
    T, G = 5, 2
    queries = torch.randn(2, H, G * T, D, generator=g, requires_grad=True)
    targets = torch.randint(0, 6, (2, T), generator=g)
    targets[0, 1] = IGNORE_INDEX
    found = mem.search(queries.detach(), 10)
    loss, n = retrieval_loss(queries, mem, found, targets)
    want, want_n = loop_reference(queries, mem, found, targets)
    assert n == want_n and 0 < n < 2 * H * G * T  # some queries are left out (ignored target, no positive, ...)
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    grad, = torch.autograd.grad(loss, queries)
    want_grad, = torch.autograd.grad(want, queries)
    torch.testing.assert_close(grad, want_grad.float(), rtol=1e-4, atol=1e-6)
    ignored = grad.view(2, H, G, T, D)[0, :, :, 1]  # token 1 of row 0 has no target: no gradient
    assert torch.equal(ignored, torch.zeros_like(ignored))


def test_no_usable_query_gives_zero_with_a_graph():
    mem = memory_with_tokens()
    queries = torch.randn(2, H, 4, D, requires_grad=True)
    loss, n = retrieval_loss(queries, mem, mem.search(queries.detach(), 5), torch.full((2, 4), 99))  # 99 never stored
    assert n == 0 and float(loss.detach()) == 0.0 and loss.requires_grad


def test_minimising_it_brings_the_chunks_with_the_target_into_the_top_k():
    """Queries trained on the loss alone: afterwards the best chunk of every query holds its target."""
    mem = memory_with_tokens(n_tokens=64, seed=3, rows=1)
    g = torch.Generator().manual_seed(4)
    targets = torch.randint(0, 6, (1, 16), generator=g)
    queries = torch.nn.Parameter(torch.randn(1, H, 16, D, generator=g) * 0.1)

    def best_holds_target():
        top = mem.search(queries.detach(), 1).slots[..., 0]  # (1, H, 16)
        ids = mem.token_ids[0, 0][top[0]]                   # (H, 16, C)
        return (ids == targets[0][None, :, None]).any(-1).float().mean().item()

    before = best_holds_target()
    opt = torch.optim.Adam([queries], lr=0.05)
    for _ in range(300):
        loss, _ = retrieval_loss(queries, mem, mem.search(queries.detach(), mem.slots_in_use), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert before < 0.6 and best_holds_target() == 1.0


@pytest.mark.parametrize("name", ["exact", "torch-ivf", "faiss-ivf", "faiss-hnsw"])
def test_the_best_k_of_more_candidates_are_the_k_searched_alone(name):
    """The memory layer searches the loss's candidates and attends their first k: every backend returns best first."""
    if name.startswith("faiss"):
        pytest.importorskip("faiss")
    retriever = make_retriever(name)
    if hasattr(retriever, "min_chunks"):
        retriever.min_chunks = 8  # build the index on this small memory
    mem = MemoryBank(MemorySpec(num_kv_heads=H, head_dim=D, chunk_size=C, capacity=256, dtype="float32",
                                fingerprint="t"), 2, retriever=retriever)
    g = torch.Generator().manual_seed(5)
    mem.write(torch.randn(2, 200, H, D, generator=g), torch.randn(2, 200, H, D, generator=g))
    q = torch.randn(2, H, 7, D, generator=g)
    few, many = mem.search(q, 4), mem.search(q, 32).top(4)
    assert torch.equal(few.slots, many.slots) and torch.equal(few.valid, many.valid)
    torch.testing.assert_close(few.scores, many.scores)


def test_forward_with_supervision_keeps_logits_and_sets_the_loss(family):
    model = LongMemForCausalLM.from_backbone(tiny_backbone(family), small_config())
    g = torch.Generator().manual_seed(0)
    first, second = (torch.randint(1, VOCAB, (2, 16), generator=g) for _ in range(2))
    mem = model.new_memory(2)
    model(first, memory=mem)
    plain = model(second, memory=copy.deepcopy(mem))
    sup = RetrievalSupervision(targets=torch.cat([second[:, 1:], first[:, :1]], dim=1), candidates=12)
    supervised = model(second, memory=copy.deepcopy(mem), retrieval_supervision=sup)
    torch.testing.assert_close(supervised.logits, plain.logits, rtol=0, atol=0)
    assert torch.equal(supervised.retrieval.slots, plain.retrieval.slots)  # attends the same topk_chunks
    assert sup.loss is not None and sup.loss.requires_grad and sup.queries > 0


def test_train_step_minimises_the_weighted_sum():
    """SGD with lr 1: each parameter moves by minus the gradient of next-token loss + weight * retrieval loss."""
    model = LongMemForCausalLM.from_backbone(tiny_backbone("llama"), small_config())
    with torch.no_grad():
        model.sidenet.layers[model.sidenet.memory_layer].gate.fill_(0.5)
    ref = copy.deepcopy(model)
    mem = model.new_memory(2)
    opt = torch.optim.SGD(model.sidenet.parameters(), lr=1.0)
    train_step(model, batch(0), mem, opt, NoSchedule(), torch.device("cpu"), grad_clip=0.0, precision="fp32")
    ref.load_state_dict(model.state_dict())
    ref_mem = copy.deepcopy(mem)
    b = batch(1)
    sup = RetrievalSupervision(b.labels, candidates=8)
    out = ref(b.input_ids, memory=ref_mem, attention_mask=b.attention_mask, retrieval_supervision=sup)
    want_loss = next_token_loss(out.logits, b.labels)
    params = dict(ref.sidenet.named_parameters())
    grads = torch.autograd.grad(want_loss + 0.3 * sup.loss, list(params.values()), allow_unused=True,
                                retain_graph=True)
    before = {n: p.detach().clone() for n, p in model.sidenet.named_parameters()}
    losses = train_step(model, b, mem, opt, NoSchedule(), torch.device("cpu"), grad_clip=0.0, precision="fp32",
                        retrieval_loss_weight=0.3, retrieval_candidates=8)
    torch.testing.assert_close(losses.loss, want_loss.detach())
    torch.testing.assert_close(losses.retrieval_loss, sup.loss.detach())
    for (n, p), grad in zip(model.sidenet.named_parameters(), grads):
        want = torch.zeros_like(p) if grad is None else -grad
        torch.testing.assert_close(p.detach() - before[n], want, rtol=1e-4, atol=1e-6, msg=n)
    # the retrieval loss's own gradient: the memory layer's queries and the layers below, never the gate or above
    aux = torch.autograd.grad(sup.loss, list(params.values()), allow_unused=True)
    touched = {n for n, a in zip(params, aux) if a is not None and bool(a.abs().sum() > 0)}
    m = ref.sidenet.memory_layer
    assert any(n.startswith(f"layers.{m}.") for n in touched), touched
    assert all(n.startswith("layers.") and int(n.split(".")[1]) <= m and not n.endswith("gate") for n in touched)


def test_bad_settings_are_one_line_errors(tmp_path):
    from longmem.training.train import TrainConfig, train
    for bad, message in ((dict(retrieval_loss_weight=-0.5), r"^retrieval_loss_weight must be a finite number of at "
                                                             r"least 0, not -0\.5$"),
                         (dict(retrieval_loss_weight=float("nan")), r"^retrieval_loss_weight must be .* not nan$"),
                         (dict(retrieval_loss_weight=float("inf")), r"^retrieval_loss_weight must be .* not inf$"),
                         (dict(retrieval_loss_weight=1.0, retrieval_loss_candidates=8),
                          r"^retrieval_loss_candidates=8 is fewer than the 16 chunks a query attends")):
        with pytest.raises(LongMemError, match=message):
            train(TrainConfig(out_dir=str(tmp_path / "run"), **bad))


def test_the_loss_is_float32_under_bf16_autocast():
    mem = memory_with_tokens()
    g = torch.Generator().manual_seed(1)
    queries = torch.randn(2, H, 10, D, generator=g)
    targets = torch.randint(0, 6, (2, 5), generator=g)
    found = mem.search(queries, 10)
    want, _ = retrieval_loss(queries, mem, found, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = retrieval_loss(queries, mem, found, targets)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_the_loss_can_train_the_memory_layers_query_projection_alone():
    """through_lower_layers=False: the same loss value, its gradient only in the memory layer (never its gate)."""
    model = LongMemForCausalLM.from_backbone(tiny_backbone("llama"), small_config())
    g = torch.Generator().manual_seed(0)
    first, second = (torch.randint(1, VOCAB, (2, 16), generator=g) for _ in range(2))
    mem = model.new_memory(2)
    model(first, memory=mem)
    targets = torch.cat([second[:, 1:], first[:, :1]], dim=1)
    params = dict(model.sidenet.named_parameters())
    touched, losses = {}, {}
    for through in (True, False):
        sup = RetrievalSupervision(targets, candidates=12, through_lower_layers=through)
        model(second, memory=copy.deepcopy(mem), retrieval_supervision=sup)
        grads = torch.autograd.grad(sup.loss, list(params.values()), allow_unused=True)
        touched[through] = {n for n, a in zip(params, grads) if a is not None and bool(a.abs().sum() > 0)}
        losses[through] = sup.loss.detach()
    torch.testing.assert_close(losses[False], losses[True], rtol=0, atol=0)
    m = model.sidenet.memory_layer
    assert touched[False] and all(n.startswith(f"layers.{m}.") and not n.endswith("gate") for n in touched[False])
    assert any(not n.startswith(f"layers.{m}.") for n in touched[True])  # the default reaches lower layers too
