"""Token ids in the bank and readable retrieval, against the memorized input and a plain loop over the retrieval."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import VOCAB, small_config, tiny_backbone
from longmem import LongMemForCausalLM, MemoryBank
from longmem.memory.bank import NO_TOKEN, PREVIOUS_FORMAT, checksum
from longmem.memory.readable import describe_reads, read_chunks


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_read_chunks_name_the_memorized_tokens(family):
    model = LongMemForCausalLM.from_backbone(tiny_backbone(family), small_config(memory_size=32)).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (1, 70), generator=g)  # 70 tokens into a 32-token memory: evicted and wrapped
    memory = model.new_memory(1)
    model.memorize(ids, memory)
    out = model(torch.randint(1, VOCAB, (1, 5), generator=g), memory=memory, update_memory=False)
    r = out.retrieval
    G = model.adapter.num_heads // memory.spec.num_kv_heads
    C, k = memory.spec.chunk_size, r.slots.shape[-1]
    # reference: a plain loop over every query head of token 3, slots -> positions via write order
    order = memory.write_order(0).tolist()
    positions = memory.chunk_positions(0).tolist()
    count, best = {}, {}
    for h in range(model.adapter.num_heads):
        q = (h % G) * 5 + 3
        for j in range(k):
            if r.valid[0, h // G, q, j]:
                p = positions[order.index(int(r.slots[0, h // G, q, j]))]
                count[p] = count.get(p, 0) + 1
                best[p] = max(best.get(p, -1e30), float(r.scores[0, h // G, q, j]))
    chunks = read_chunks(r, memory, G, token=3)
    assert {c.position: c.heads for c in chunks} == count
    assert [c.heads for c in chunks] == sorted(count.values(), reverse=True)
    for c in chunks:
        assert c.token_ids == ids[0, c.position:c.position + C].tolist()  # the text stored is the text memorized
        assert c.score == pytest.approx(best[c.position])
        assert 70 - 32 <= c.position <= 70 - C  # only held chunks: the newest 32 tokens
    assert len(read_chunks(r, memory, G, token=3, top=2)) == 2
    line = describe_reads(chunks[:2], 3, decode=lambda t: "".join(chr(65 + i % 26) for i in t))
    assert line.startswith(f"token 3 read chunks at stream positions {chunks[0].position}, {chunks[1].position} (text '")


def test_token_ids_follow_writes_and_files(tmp_path):
    model = LongMemForCausalLM.from_backbone(tiny_backbone("llama"), small_config(memory_size=16, chunk_size=4)).eval()
    ids = torch.arange(1, 31)[None]  # 30 tokens: 28 chunked, 16 held, 2 pending
    memory = model.new_memory(1)
    model.memorize(ids, memory)
    held = memory.chunk_token_ids(0, memory.write_order(0)).flatten().tolist()
    assert held == list(range(13, 29)) and memory.pending_token_ids[0, :2].tolist() == [29, 30]
    memory.save(tmp_path / "m.safetensors")
    back = MemoryBank.load(tmp_path / "m.safetensors")
    assert back.chunk_token_ids(0, back.write_order(0)).flatten().tolist() == held
    # a file of the previous format has no token ids: they load as unknown, and no text is shown
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    del tensors["token_ids"], tensors["pending_token_ids"]
    meta = {**meta, "format": PREVIOUS_FORMAT, "sha256": checksum(tensors, meta["spec"] + meta["batch_size"])}
    save_file(tensors, str(tmp_path / "v2.safetensors"), metadata=meta)
    old = MemoryBank.load(tmp_path / "v2.safetensors")
    assert bool((old.token_ids == NO_TOKEN).all()) and torch.equal(old.tokens(0)[0], memory.tokens(0)[0])
    out = model(torch.tensor([[5, 6, 7]]), memory=old, update_memory=False)
    chunks = read_chunks(out.retrieval, old, model.adapter.num_heads // old.spec.num_kv_heads)
    assert chunks and all(c.token_ids == [] for c in chunks)
    assert "(text" not in describe_reads(chunks, 2, decode=str)
