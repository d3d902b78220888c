"""MemoryBank against brute force: chunking, pending buffer, FIFO, retrieval, isolation, persistence."""

import pytest
import torch
from safetensors.torch import save_file

from longmem import LongMemError, MemoryBank, MemorySpec
from longmem.memory.bank import SLOTTED, checksum

H, D = 2, 8


def bank(capacity=64, chunk=4, rows=2, dtype="float32"):
    return MemoryBank(MemorySpec(num_kv_heads=H, head_dim=D, chunk_size=chunk, capacity=capacity, dtype=dtype,
                                 fingerprint="test"), rows)


def write_stream(mem, lengths, rows=2, mask_fn=None, seed=0):
    """Write random segments; return, per row, every valid token written (T, H, D) in order."""
    g = torch.Generator().manual_seed(seed)
    written = [[] for _ in range(rows)]
    for T in lengths:
        k = torch.randn(rows, T, H, D, generator=g)
        mask = mask_fn(T) if mask_fn else None
        mem.write(k, -k, mask)
        for b in range(rows):
            written[b].append(k[b] if mask is None else k[b][mask[b].bool()])
    return [torch.cat(w) for w in written]


def test_pending_buffer_keeps_every_token_across_odd_segments():
    mem = bank(capacity=400, chunk=4)
    written = write_stream(mem, [3, 5, 1, 7, 2, 9])  # 27 tokens: 6 chunks + 3 pending
    for b in range(2):
        keys, values = mem.tokens(b)  # (H, N, D)
        assert keys.shape[1] == 24
        torch.testing.assert_close(keys.transpose(0, 1), written[b][:24], rtol=0, atol=0)
        torch.testing.assert_close(values.transpose(0, 1), -written[b][:24], rtol=0, atol=0)
        assert int(mem.num_pending[b]) == 3
        torch.testing.assert_close(mem.pending_keys[b, :3], written[b][24:], rtol=0, atol=0)
    assert len(mem) == 24 and mem.sizes.tolist() == [24, 24]


def test_fifo_holds_exactly_the_most_recent_capacity_tokens():
    mem = bank(capacity=8, chunk=2)
    written = write_stream(mem, [5, 7, 3, 8, 21])  # 44 tokens -> 22 chunks, ring of 4 chunks
    for b in range(2):
        keys, _ = mem.tokens(b)
        assert keys.shape[1] == 8
        torch.testing.assert_close(keys.transpose(0, 1), written[b][36:44], rtol=0, atol=0)
    assert len(mem) == 8


def test_padding_is_never_written():
    mem = bank(capacity=64, chunk=2)
    def mask(T):  # row 0 right-padded, row 1 left-padded
        m = torch.ones(2, T, dtype=torch.long)
        m[0, T - 2:] = 0
        m[1, :3] = 0
        return m
    written = write_stream(mem, [7, 6, 9], mask_fn=mask)
    for b in range(2):
        n = written[b].shape[0] // 2 * 2
        keys, _ = mem.tokens(b)
        torch.testing.assert_close(keys.transpose(0, 1), written[b][:n], rtol=0, atol=0)


def brute_force_topk(written_row, chunk, capacity, queries, k):
    """Chunk the whole history, keep the newest capacity tokens, exact inner-product top-k."""
    n = written_row.shape[0] // chunk * chunk
    toks = written_row[:n][-capacity:]                  # (N, H, D)
    chunks = toks.view(-1, chunk, H, D)                  # (S, C, H, D)
    means = chunks.mean(dim=1)                           # (S, H, D)
    scores = torch.einsum("hqd,shd->hqs", queries, means)
    idx = scores.topk(k, dim=-1).indices                 # (H, Q, k)
    return chunks, idx


@pytest.mark.parametrize("capacity", [1000, 24])  # not full, and wrapped around
def test_retrieval_equals_brute_force(capacity):
    mem = bank(capacity=capacity, chunk=4)
    written = write_stream(mem, [13, 6, 11, 9, 5])
    queries = torch.randn(2, H, 7, D)
    k = 4
    res = mem.search(queries, k)
    got_k, _ = mem.gather(res.slots)  # (B, H, Q, k*C, D)
    assert bool(res.valid.all())
    for b in range(2):
        chunks, idx = brute_force_topk(written[b], 4, capacity, queries[b], k)
        for h in range(H):
            for q in range(7):
                ref = {tuple(chunks[i, :, h].flatten().tolist()) for i in idx[h, q].tolist()}
                got = {tuple(got_k[b, h, q, j * 4:(j + 1) * 4].flatten().tolist()) for j in range(k)}
                assert got == ref


def test_retrieval_with_fewer_chunks_than_k_and_uneven_rows():
    mem = bank(capacity=64, chunk=2)
    mem.write(torch.randn(2, 6, H, D), torch.randn(2, 6, H, D), torch.tensor([[1] * 6, [1, 1] + [0] * 4]))
    res = mem.search(torch.randn(2, H, 3, D), 8)
    assert res.slots.shape[-1] == 3  # clipped to the fullest row
    assert bool(res.valid[0].all())
    assert res.valid[1].sum(-1).eq(1).all()  # row 1 holds a single chunk


def test_reset_rows():
    mem = bank()
    write_stream(mem, [9, 9])
    mem.reset(rows=[0])
    assert mem.sizes.tolist() == [0, 16] and int(mem.num_pending[0]) == 0 and int(mem.num_pending[1]) == 2
    mem.reset()
    assert len(mem) == 0


def test_save_load_roundtrip(tmp_path):
    mem = bank(capacity=12, chunk=4, dtype="bfloat16")
    write_stream(mem, [7, 9, 6])  # 22 tokens: 5 chunks in a ring of 3 (the next write goes to slot 2), 2 pending
    assert mem.next_slot.tolist() == [2, 2] and mem.num_pending.tolist() == [2, 2]
    mem.save(tmp_path / "m.safetensors")
    back = MemoryBank.load(tmp_path / "m.safetensors")
    for name in ("num_chunks", "next_slot", "num_pending", "pending_keys"):
        assert torch.equal(getattr(mem, name), getattr(back, name))
    q = torch.randn(2, H, 5, D)
    a, b = mem.search(q, 2), back.search(q, 2)
    assert torch.equal(a.slots, b.slots)
    assert torch.equal(mem.gather(a.slots)[1], back.gather(b.slots)[1])
    more = torch.randn(2, 6, H, D)
    mem.write(more, more)
    back.write(more, more)
    assert torch.equal(mem.tokens(1)[0], back.tokens(1)[0])


def test_save_load_mid_ring_with_pending_continues_exactly(tmp_path):
    """A model's memory saved with its ring position mid-way and tokens pending: after loading, reads, the
    following writes and the logits of the following segments equal those of the memory that was never saved."""
    from conftest import VOCAB, small_config, tiny_backbone
    from longmem import LongMemForCausalLM

    # 8 chunk slots of 2 tokens, and every stored chunk is retrieved (topk_tokens = capacity): the logits depend
    # on exactly which chunks the memory holds
    model = LongMemForCausalLM.from_backbone(tiny_backbone("llama"),
                                             small_config(memory_size=16, chunk_size=2, topk_tokens=16)).eval()
    with torch.no_grad():
        model.sidenet.layers[model.config.sidenet_memory_layer].gate.fill_(4.0)  # lean on the memory
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (2, 27), generator=g)
    mask = torch.ones(2, 27, dtype=torch.long)
    mask[1, 21:] = 0
    mem = model.new_memory(2)
    with torch.no_grad():
        model.memorize(ids, mem, attention_mask=mask)  # row 0: 27 tokens, row 1: 21
    assert mem.next_slot.tolist() == [5, 2] and mem.num_pending.tolist() == [1, 1] and mem.sizes.tolist() == [16, 16]
    mem.save(tmp_path / "m.safetensors")
    back = model.load_memory(tmp_path / "m.safetensors")

    def same_state(a, b):
        for row in range(2):
            for x, y in zip(a.tokens(row), b.tokens(row), strict=True):  # stored tokens in write order
                assert torch.equal(x, y), row
            p = int(a.num_pending[row])
            assert p == int(b.num_pending[row]) and torch.equal(a.pending_keys[row, :p], b.pending_keys[row, :p])
        assert torch.equal(a.next_slot, b.next_slot) and torch.equal(a.num_chunks, b.num_chunks)
        q = torch.randn(2, a.spec.num_kv_heads, 5, a.spec.head_dim, generator=g)
        ra, rb = a.search(q, 8), b.search(q, 8)
        assert torch.equal(ra.slots, rb.slots) and torch.equal(ra.scores, rb.scores)
        assert all(torch.equal(x, y) for x, y in zip(a.gather(ra.slots), b.gather(rb.slots), strict=True))

    same_state(mem, back)
    # the same memory with its ring position, or its pending tokens, lost: what the comparison must tell apart
    no_slot, no_pending = model.load_memory(tmp_path / "m.safetensors"), model.load_memory(tmp_path / "m.safetensors")
    no_slot.next_slot.zero_()
    no_pending.num_pending.zero_()
    differs = {"no_slot": False, "no_pending": False}
    with torch.no_grad():
        for T in (7, 16, 5, 16):  # odd lengths: chunks complete across segments, the ring wraps again
            x = torch.randint(1, VOCAB, (2, T), generator=g)
            a, b = model(x, memory=mem).logits, model(x, memory=back).logits  # read, then write
            torch.testing.assert_close(a, b, rtol=0, atol=0)
            same_state(mem, back)
            for name, broken in (("no_slot", no_slot), ("no_pending", no_pending)):
                differs[name] |= not torch.allclose(model(x, memory=broken).logits, a)
    assert differs == {"no_slot": True, "no_pending": True}


def test_load_errors(tmp_path):
    mem = bank()
    write_stream(mem, [8])
    path = tmp_path / "m.safetensors"
    mem.save(path)
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(LongMemError, match="corrupt or truncated"):
        MemoryBank.load(tmp_path / "cut.safetensors")
    with pytest.raises(LongMemError, match="not found"):
        MemoryBank.load(tmp_path / "missing.safetensors")
    other = MemorySpec(num_kv_heads=H, head_dim=D, chunk_size=4, capacity=64, fingerprint="another-model")
    with pytest.raises(LongMemError, match="different model .*fingerprint"):
        MemoryBank.load(path, expect=other)
    # right header, wrong tensor shapes
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["values"] = tensors["values"][:, :1].contiguous()
    meta["sha256"] = checksum(tensors, meta["spec"] + meta["batch_size"])  # a consistent checksum, for what it sums
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(LongMemError, match="inconsistent contents.*'values' has shape"):
        MemoryBank.load(tmp_path / "bad.safetensors")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(LongMemError, match="not a longmem memory file"):
        MemoryBank.load(tmp_path / "other.safetensors")


def test_tokens_of_an_empty_row_are_empty():
    mem = bank(capacity=16, chunk=4)
    write_stream(mem, [6])  # row 0 and 1 each hold one chunk, then row 1 is reset
    mem.reset(rows=[1])
    keys, values = mem.tokens(1)
    assert keys.shape == values.shape == (H, 0, D)
    assert mem.tokens(0)[0].shape == (H, 4, D)


@pytest.mark.parametrize("dtype, score_dtype", [("float16", torch.float32), ("bfloat16", torch.bfloat16),
                                                ("float32", torch.float32)])
def test_search_scores_in_the_storage_dtype_except_float16_on_cpu(dtype, score_dtype):
    """CPUs have no fast float16 matmul: a float16 memory is scored in float32, the others in their own dtype."""
    mem = bank(capacity=64, chunk=4, dtype=dtype)
    write_stream(mem, [40])
    queries = torch.randn(2, H, 5, D)
    found = mem.search(queries, 3)
    assert found.scores.dtype == score_dtype
    stored = mem.chunk_keys[:, :, :10].to(score_dtype)
    brute = (queries.to(score_dtype) @ stored.transpose(-1, -2)).topk(3, dim=-1)
    torch.testing.assert_close(found.scores, brute.values, rtol=0, atol=0)


def test_search_in_blocks_of_queries_equals_one_block():
    from longmem.memory import ExactRetriever

    mem = bank(capacity=64, chunk=4)
    write_stream(mem, [40])
    queries = torch.randn(2, H, 7, D)
    whole = mem.search(queries, 4)
    mem.retriever = ExactRetriever(max_scores=2 * H * 10 * 3)  # 3 queries per block: blocks of 3, 3, 1
    blocked = mem.search(queries, 4)
    assert torch.equal(blocked.slots, whole.slots)
    torch.testing.assert_close(blocked.scores, whole.scores, rtol=1e-6, atol=1e-6)
    assert blocked.slots.shape == (2, H, 7, 4)


def tampered(tmp_path, path, change):
    """A copy of a saved memory with `change(tensors)` applied and a consistent checksum (the checks after it run)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    change(tensors)
    meta["sha256"] = checksum(tensors, meta["spec"] + meta["batch_size"])
    out = tmp_path / "tampered.safetensors"
    save_file(tensors, str(out), metadata=meta)
    return out


@pytest.mark.parametrize("change", [
    lambda t: t.update(num_chunks=t["num_chunks"] + 1),        # more chunks than stored slots
    lambda t: t.update(num_pending=torch.full_like(t["num_pending"], 4)),  # a full chunk still pending (C = 4)
    lambda t: t.update({k: torch.cat([t[k]] * 9, dim=2) for k in SLOTTED}),  # 18 > 16 slots
])
def test_counters_that_exceed_the_stored_data_are_refused(tmp_path, change):
    mem = bank(capacity=64, chunk=4)
    write_stream(mem, [9])  # 2 chunks + 1 pending per row
    mem.save(tmp_path / "m.safetensors")
    path = tampered(tmp_path, tmp_path / "m.safetensors", change)
    with pytest.raises(LongMemError, match=r"^memory file .* has inconsistent contents \(ValueError: chunk counters "
                                           r"exceed the stored data\); re-create it with memorize$"):
        MemoryBank.load(path)
    assert MemoryBank.load(tmp_path / "m.safetensors").sizes.tolist() == [8, 8]  # the untampered file loads


def test_save_writes_only_the_slots_in_use_and_load_keeps_the_retriever(tmp_path):
    from safetensors import safe_open

    from longmem.memory import ExactRetriever

    mem = bank(capacity=400, chunk=4)
    write_stream(mem, [12, 8])  # 5 chunks per row; storage grew to 64 slots
    assert mem.keys.shape[2] == 64
    mem.save(tmp_path / "m.safetensors")
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        assert f.get_slice("keys").get_shape()[2] == f.get_slice("chunk_keys").get_shape()[2] == 5
    retriever = ExactRetriever(max_scores=1 << 10)
    loaded = MemoryBank.load(tmp_path / "m.safetensors", retriever=retriever)
    assert loaded.retriever is retriever
    for row in range(2):
        assert torch.equal(loaded.tokens(row)[0], mem.tokens(row)[0])


def test_capacity_must_be_a_multiple_of_the_chunk_size():
    with pytest.raises(LongMemError, match=r"^memory capacity 10 must be a multiple of chunk_size 4$"):
        bank(capacity=10, chunk=4)


def test_storage_doubles_on_demand_up_to_capacity():
    """Writes cost amortised O(1): storage starts at 64 chunk slots, doubles when full, stops at capacity."""
    mem = bank(capacity=4 * 300, chunk=4, rows=1)
    storage = []
    for chunks in (60, 4, 1, 63, 1, 200):
        mem.write(torch.randn(1, 4 * chunks, H, D), torch.randn(1, 4 * chunks, H, D))
        storage.append(mem.keys.shape[2])
    assert storage == [64, 64, 128, 128, 256, 300]
    assert mem.sizes.tolist() == [1200] and mem.written.tolist() == [4 * 329]
    # counters are int64: a float32 count would skip tokens past 2**24 (16.7M tokens written into a row)
    assert mem.sizes.dtype == mem.written.dtype == mem.num_pending.dtype == mem.next_slot.dtype == torch.long
