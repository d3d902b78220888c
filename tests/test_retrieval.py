"""Retrieval backends against brute force: the two-stage exact top-k, approximate indexes' recall and eviction,
and the index lifecycle (writes, FIFO overwrites, resets, derived and loaded banks)."""

import pytest
import torch

from longmem import LongMemConfig, LongMemError, MemoryBank, MemorySpec
from longmem.memory import ExactRetriever, make_retriever
from longmem.memory.retrieval import topk_by_blocks

H, D = 2, 16
APPROX = ["torch-ivf", "faiss-ivf", "faiss-hnsw"]


def bank(capacity, retriever="exact", rows=2, dtype="float32"):
    return MemoryBank(MemorySpec(num_kv_heads=H, head_dim=D, chunk_size=4, capacity=capacity, dtype=dtype,
                                 fingerprint="test"), rows, retriever=retriever)


@pytest.fixture(autouse=True)
def one_faiss_thread():
    """faiss builds HNSW graphs in parallel, in an order that varies from run to run: one thread makes each test's
    index, and so its (approximate) answers, the same every time."""
    try:
        import faiss
    except ImportError:
        yield
        return
    n = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(n)


def small_index(name):
    """An approximate index that builds from 64 chunks on (the defaults wait for 1,024)."""
    r = make_retriever(name)
    r.min_chunks = 64
    return r


def clustered(n, seed, centers=32):
    """(n, H, D) keys around a few centers, like real attention keys (IVF needs structure to prune)."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(centers, H, D, generator=g) * 3
    return c[torch.randint(0, centers, (n,), generator=g)] + torch.randn(n, H, D, generator=g)


def write_tokens(mem, n, seed, segment=200):
    keys = clustered(n, seed)
    for s in range(0, n, segment):
        k = keys[s:s + segment].expand(mem.batch_size, -1, -1, -1)
        mem.write(k, -k)


def brute(mem, queries, k):
    """float32 brute force over each row's held chunks: (B, H, Q, k) sorted scores and slot sets."""
    n = mem.slots_in_use
    s = queries.float() @ mem.search_keys(n).float().transpose(-1, -2)  # (B, H, Q, n)
    s.masked_fill_(torch.arange(n) >= mem.num_chunks[:, None, None, None], float("-inf"))
    return s.topk(k, dim=-1)


# ---- the exact backend --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("blocks", [8, 16])
def test_topk_by_blocks_equals_topk(blocks):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 5, 256, generator=g)
    v, i = topk_by_blocks(s, 7, blocks)
    ref = s.topk(7, dim=-1)
    assert torch.equal(v, ref.values) and torch.equal(i, ref.indices)  # no ties: same slots, same order
    # ties: equal maxima in several blocks; the values are the brute-force values and each index holds its value
    t = torch.randint(0, 4, (3, 5, 256), generator=g).float()
    v, i = topk_by_blocks(t, 7, blocks)
    assert torch.equal(v, t.topk(7, dim=-1).values) and torch.equal(t.gather(-1, i), v)
    assert all(len(set(row)) == 7 for row in i.flatten(0, 1).tolist())  # distinct columns
    # the top k all in one block (columns 3, 3 + blocks, ...): the other blocks' maxima are all smaller
    u = torch.randn(2, 256, generator=g) - 10
    u[:, 3::blocks] += 20
    assert torch.equal(topk_by_blocks(u, 7, blocks)[1], u.topk(7, dim=-1).indices)


@pytest.mark.parametrize("shift", [0.0, -1.0, -2.0, -4.0, -100.0])
def test_topk_by_blocks_in_bfloat16_equals_topk_whatever_the_signs(shift):
    """bfloat16 takes its block maxima over the int16 bit patterns (exact for positive maxima); rows whose k-th best
    score is negative (shift -2: some rows, -4 and -100: all) must still get the true top k."""
    g = torch.Generator().manual_seed(1)
    s = (torch.randn(4, 6, 512, generator=g) + shift).bfloat16()
    s[0, 0] = -s[0, 0].abs()  # one row with no positive score at all
    v, i = topk_by_blocks(s, 16, 32)
    ref = s.float().topk(16, dim=-1)
    assert torch.equal(v.float(), ref.values) and torch.equal(s.gather(-1, i), v)
    assert all(len(set(row)) == 16 for row in i.flatten(0, 1).tolist())


@pytest.mark.parametrize("chunks,k,settings", [
    ((2900, 2100), 16, dict(tile=1 << 12, blocks=16)),                  # several staged tiles a row, the last padded
    ((2900, 2100), 16, dict(tile=1 << 12, blocks=16, query_block=4)),   # several query blocks too
    ((2900, 2100), 32, dict(tile=1 << 12, blocks=16)),                  # k > blocks: flat top-k per tile
    ((700, 9), 16, dict(tile=1 << 10, blocks=8)),                       # a row holding fewer than k chunks
    ((700, 0), 16, dict(tile=1 << 10, blocks=8)),                       # an empty row
    ((2900, 2100), 16, dict(tile=1 << 40)),                             # one batched matmul and top-k
    ((2900, 2100), 16, dict(tile=1 << 40, max_scores=2 * H * 3000 * 4)),  # batched in blocks of 4 queries
])
def test_exact_search_equals_float32_brute_force(chunks, k, settings):
    mem = bank(capacity=4 * 3000, retriever=ExactRetriever(**settings))
    write_tokens(mem, 4 * chunks[0] + 3, seed=1)
    mem.reset(rows=[1])
    if chunks[1]:  # rows of different lengths: a row's empty slots must never be returned
        k2 = clustered(4 * chunks[1], seed=2)[None].expand(2, -1, -1, -1)
        mem.write(k2, -k2, attention_mask=torch.tensor([[False], [True]]).expand(-1, 4 * chunks[1]))
    assert mem.num_chunks.tolist() == list(chunks)
    q = torch.randn(2, H, 9, D)
    found, ref = mem.search(q, k), brute(mem, q, k)
    torch.testing.assert_close(found.scores, ref.values, rtol=0, atol=1e-5)
    assert torch.equal(found.valid, torch.isfinite(ref.values))  # rows short of k chunks: the rest is not valid
    assert torch.equal(found.slots[found.valid], ref.indices[found.valid])


@pytest.mark.parametrize("dtype", ["int8", "float16", "bfloat16"])
def test_tiled_exact_search_reads_every_storage_dtype_like_the_batched_one(dtype):
    """The tiled schedule reads the keys a row and head at a time (int8 dequantised per head, float16 upcast on CPU):
    it must score what the batched schedule scores over the whole dequantised bank."""
    mem = bank(capacity=4 * 3000, dtype=dtype)
    write_tokens(mem, 4 * 2900, seed=5)
    q = clustered(9, seed=6).permute(1, 0, 2)[None].expand(2, -1, -1, -1)  # (B, H, Q, D) near the keys
    mem.retriever = ExactRetriever(tile=1 << 12, blocks=16)
    tiled = mem.search(q, 16)
    mem.retriever = ExactRetriever(tile=1 << 62)
    batched = mem.search(q, 16)
    assert tiled.scores.dtype == batched.scores.dtype == {"float16": torch.float32}.get(dtype, torch.bfloat16)
    torch.testing.assert_close(tiled.scores.float(), batched.scores.float(), rtol=1e-2, atol=1e-2)
    # each slot holds its score (bf16 ties may pick different slots of equal score than the batched top-k)
    keys = mem.search_keys(mem.slots_in_use).float()                               # (B, H, S, D)
    held = keys.gather(2, tiled.slots.flatten(2)[..., None].expand(-1, -1, -1, D))  # (B, H, Q*k, D)
    rescored = (q.float().repeat_interleave(16, dim=2) * held).sum(-1).view_as(tiled.scores)
    torch.testing.assert_close(rescored, tiled.scores.float(), rtol=2e-2, atol=5e-2)


# ---- approximate backends -----------------------------------------------------------------------------------------
def recall(found, ref):
    hits = (found.slots[..., :, None] == ref.indices[..., None, :]).any(-1) & found.valid
    return hits.float().mean().item()


@pytest.mark.parametrize("name", APPROX)
def test_approximate_recall_against_exact(name):
    pytest.importorskip("faiss") if name.startswith("faiss") else None
    mem = bank(capacity=4 * 4096, retriever=small_index(name))
    write_tokens(mem, 4 * 4096, seed=3)
    q = clustered(64, seed=4).permute(1, 0, 2)[None].expand(2, -1, -1, -1)  # queries near the keys (B, H, Q, D)
    found = mem.search(q, 16)
    assert found.slots.shape == (2, H, 64, 16)
    assert recall(found, brute(mem, q, 16)) >= 0.9
    # the scores are the inner products of the slots returned
    s = (q[..., None, :] * mem.search_keys()[torch.arange(2)[:, None, None, None], torch.arange(H)[None, :, None, None],
                                             found.slots]).sum(-1)
    torch.testing.assert_close(found.scores, s, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("name", APPROX)
def test_an_evicted_chunk_is_never_returned(name):
    """Row 0 first holds keys aligned with the query, then FIFO overwrites them with keys that are not: a stale index
    would still return the old slots' ids or scores."""
    pytest.importorskip("faiss") if name.startswith("faiss") else None
    mem = bank(capacity=4 * 512, retriever=small_index(name), rows=1)
    target = torch.randn(H, D)
    strong = target.expand(4 * 512, H, D) * 5 + torch.randn(4 * 512, H, D) * 0.1
    mem.write(strong[None], strong[None])
    q = target[None, :, None, :].expand(1, H, 3, D).contiguous()
    before = mem.search(q, 16)
    assert bool((before.scores > 4 * target.pow(2).sum(-1)[None, :, None, None]).all())
    weak = clustered(4 * 300, seed=5)  # overwrites 300 of the 512 chunks
    for s in range(0, weak.shape[0], 100):
        mem.write(weak[None, s:s + 100], weak[None, s:s + 100])
    found, ref = mem.search(q, 16), brute(mem, q, 16)
    live = torch.arange(300, 512)  # slots still holding strong chunks (slots 0..299 were overwritten)
    assert bool(torch.isin(found.slots, live).all())  # the best chunks are the surviving strong ones
    torch.testing.assert_close(found.scores, ref.values, rtol=1e-4, atol=1e-3)
    # evict everything strong: no returned score may come from a chunk no longer held
    more = clustered(4 * 300, seed=6)
    for s in range(0, more.shape[0], 100):
        mem.write(more[None, s:s + 100], more[None, s:s + 100])
    found = mem.search(q, 16)
    keys = mem.search_keys()[0]  # (H, S, D)
    held = (q[0, :, :1] @ keys.transpose(1, 2)).amax(-1)  # the best score any held chunk gives
    assert bool((found.scores[0, :, :, 0] <= held + 1e-3).all())


@pytest.mark.parametrize("name", APPROX)
def test_index_follows_reset_select_stack_and_load(name, tmp_path):
    pytest.importorskip("faiss") if name.startswith("faiss") else None
    mem = bank(capacity=4 * 512, retriever=small_index(name))
    write_tokens(mem, 4 * 700, seed=7)  # wrapped
    q = clustered(8, seed=8).permute(1, 0, 2)[None].expand(2, -1, -1, -1).contiguous()
    ref = mem.search(q, 8)
    for other in (mem.select([1, 0]).select([1, 0]), MemoryBank.stack(mem.split()), mem.to("cpu")):
        assert other.retriever is not mem.retriever and other.retriever.name == mem.retriever.name
        assert torch.equal(other.search(q, 8).slots, ref.slots)
    mem.save(tmp_path / "m.safetensors")
    back = MemoryBank.load(tmp_path / "m.safetensors", retriever=small_index(name))
    assert torch.equal(back.search(q, 8).slots, ref.slots)
    mem.reset(rows=[0])
    after = mem.search(q, 8)
    assert not bool(after.valid[0].any()) and torch.equal(after.slots[1], ref.slots[1])
    write_tokens(mem, 4 * 80, seed=9)  # row 0 refills (80 chunks) while row 1 keeps its 512
    ref0 = brute(mem, q, 8)
    # row 0's new index has 16 lists, fewer than the probes: it finds the exact top-k
    torch.testing.assert_close(mem.search(q, 8).scores[0], ref0.values[0], rtol=1e-5, atol=1e-4)


def test_retriever_names():
    assert isinstance(make_retriever("exact"), ExactRetriever)
    with pytest.raises(LongMemError, match=r"^retriever 'annoy': 'annoy' is not one of exact, faiss-ivf, faiss-hnsw, "
                                           r"torch-ivf$"):
        make_retriever("annoy")
    assert bank(64, retriever="torch-ivf").retriever.name == "torch-ivf"


# ---- faiss-hnsw: inner products searched as L2 distances --------------------------------------------------------
def test_lift_turns_inner_products_into_l2_distances():
    from longmem.memory.faiss_index import lift, norms
    np = pytest.importorskip("numpy")
    g = torch.Generator().manual_seed(0)
    x, q = torch.randn(50, D, generator=g).numpy() * 3, torch.randn(7, D, generator=g).numpy()
    R = float(norms(x).max())
    xl, ql = lift(x, R), np.concatenate([q, np.zeros((7, 1), np.float32)], 1)
    dist = ((ql[:, None] - xl[None]) ** 2).sum(-1)                                # (7, 50)
    expected = (q ** 2).sum(-1)[:, None] + R ** 2 - 2 * q @ x.T
    np.testing.assert_allclose(dist, expected, rtol=1e-4, atol=1e-3)
    assert (np.argsort(dist, 1)[:, :5] == np.argsort(-(q @ x.T), 1)[:, :5]).all()


def test_hnsw_rebuilds_when_a_key_outgrows_the_lift():
    pytest.importorskip("faiss")
    mem = bank(capacity=4 * 1024, retriever=small_index("faiss-hnsw"), rows=1)
    write_tokens(mem, 4 * 300, seed=12)
    q = torch.randn(1, H, 4, D, generator=torch.Generator().manual_seed(13))
    long = (q[0, :, :1] * 100).expand(H, 4, D).transpose(0, 1)[None]  # (1, 4, H, D): one chunk, far longer
    mem.write(long, long)
    found, ref = mem.search(q, 4), brute(mem, q, 4)
    assert found.slots[0, :, 0, 0].tolist() == [300] * H  # the long chunk (along query 0) is query 0's best
    torch.testing.assert_close(found.scores, ref.values, rtol=1e-4, atol=1e-3)


# ---- torch-ivf against its own definition ---------------------------------------------------------------------
def test_torch_ivf_returns_the_top_k_over_each_querys_probed_lists():
    """Brute force of the IVF's semantics: the float32 top-k over the chunks assigned to the query's `nprobe` lists
    (lists of unequal sizes, a wrapped ring, fewer probes than lists)."""
    r = small_index("torch-ivf")
    r.nprobe = 5
    mem = bank(capacity=4 * 600, retriever=r)
    write_tokens(mem, 4 * 900, seed=14)  # wrapped: slots reassigned
    q = clustered(40, seed=15).permute(1, 0, 2)[None].expand(2, -1, -1, -1).contiguous()  # (B, H, Q, D)
    found = mem.search(q, 16)
    for b in range(2):
        row, n = mem.retriever.rows[b], int(mem.num_chunks[b])
        probes = (q[b] @ row.centroids.transpose(1, 2)).topk(5, dim=-1).indices         # (H, Q, 5)
        probed = (row.assign[:, None, :n, None] == probes[:, :, None, :]).any(-1)      # (H, Q, n)
        s = (q[b] @ mem.search_keys(n)[b].float().transpose(1, 2)).masked_fill(~probed, float("-inf"))
        ref = s.topk(16, dim=-1)
        torch.testing.assert_close(found.scores[b], ref.values, rtol=1e-5, atol=1e-5)
        assert torch.equal(found.slots[b].sort(-1).values, ref.indices.sort(-1).values)
    assert mem.retriever.rows[0].centroids.shape[1] > 5  # the probes do prune


@pytest.mark.parametrize("name", ["torch-ivf", "faiss-ivf"])
def test_ivf_nlist_scale_sets_the_number_of_lists(name):
    """nlist = scale x sqrt(chunks), at least 16 and at most chunks / 8 (hand-computed), in the index as built."""
    from longmem.memory.retrieval import ivf_nlist

    pytest.importorskip("faiss") if name.startswith("faiss") else None
    assert [ivf_nlist(4096), ivf_nlist(4096, 4), ivf_nlist(4096, 16), ivf_nlist(100), ivf_nlist(10)] == [
        64, 256, 512, 16, 10]
    for scale, lists in ((1, 45), (4, 180), (16, 256)):  # 2,048 chunks: sqrt 45.25, cap 256
        r = make_retriever(f"{name}:nlist_scale={scale},min_chunks=64")
        mem = bank(capacity=4 * 2048, retriever=r, rows=1)
        write_tokens(mem, 4 * 2048, seed=16)
        mem.retriever.rebuild(mem)  # trained on all 2,048 chunks (growing, it retrains at 4x what it saw)
        row = mem.retriever.rows[0]
        got = [ix.nlist for ix in row.indexes] if name == "faiss-ivf" else [row.centroids.shape[1]]
        assert set(got) == {lists}


def test_faiss_ivf_lists_are_l2_and_probed_by_inner_product():
    """faiss-ivf holds each chunk (built or added later) in the list of its L2-nearest centroid, as torch-ivf does,
    not by faiss's inner-product IVF (spherical k-means: unit centroids, the same list by L2 and by inner product, so
    the second assert fails there), and a search probes the lists whose centroids have the largest inner product
    with the query (recomputed here from the stored lists)."""
    faiss = pytest.importorskip("faiss")
    mem = bank(capacity=4 * 2048, retriever=make_retriever("faiss-ivf:min_chunks=64,nprobe=4"), rows=1)
    write_tokens(mem, 4 * 1000, seed=19)
    mem.retriever.rebuild(mem)
    write_tokens(mem, 4 * 400, seed=20)  # added to the trained lists (1,400 chunks: no retrain below 4x)
    row = mem.retriever.rows[0]
    assert row.total == 1400 and row.trained_on == 1000
    keys = mem.search_keys()[0].float()  # (H, S, D)
    q = clustered(6, seed=21).permute(1, 0, 2)                                    # (H, Q, D)
    found = mem.search(q[None], 16)
    for h, index in enumerate(row.indexes):
        cent = torch.from_numpy(index.quantizer.reconstruct_n(0, index.nlist))   # (L, D)
        ids = [torch.from_numpy(faiss.rev_swig_ptr(index.invlists.get_ids(l), index.invlists.list_size(l)).copy())
               for l in range(index.nlist)]
        lists = torch.cat([torch.full((len(i),), l) for l, i in enumerate(ids)])
        slots = torch.from_numpy(row.id_slot)[torch.cat(ids)]                     # (n,) slot of each, in list order
        x = keys[h, slots]                                                        # (n, D)
        assert torch.equal(lists, torch.cdist(x, cent).argmin(-1))                # L2-nearest centroid
        assert not torch.equal(lists, (x @ cent.T).argmax(-1))                   # not the inner-product one
        # a search returns the float32 top 16 over the chunks of the 4 lists of largest inner product
        top_lists = (q[h] @ cent.T).topk(4, dim=-1).indices                       # (Q, 4)
        for i in range(q.shape[1]):
            members = torch.isin(lists, top_lists[i])
            s = (x[members] @ q[h, i]).topk(16)
            torch.testing.assert_close(found.scores[0, h, i], s.values, rtol=1e-5, atol=1e-4)
            assert set(found.slots[0, h, i].tolist()) == set(slots[members][s.indices].tolist())


@pytest.mark.parametrize("name", ["torch-ivf", "faiss-ivf"])
def test_ivf_indexes_a_row_of_fewer_chunks_than_16_lists(name):
    """min_chunks below 16: a row of 10 chunks gets 10 lists (faiss's k-means and torch-ivf failed with 16); with
    every list probed the search is exact."""
    pytest.importorskip("faiss") if name.startswith("faiss") else None
    mem = bank(capacity=4 * 64, retriever=make_retriever(f"{name}:min_chunks=8"))
    write_tokens(mem, 4 * 10, seed=17, segment=40)
    assert mem.retriever.rows[0] is not None
    q = clustered(5, seed=18).permute(1, 0, 2)[None].expand(2, -1, -1, -1)
    found, ref = mem.search(q, 4), brute(mem, q, 4)
    torch.testing.assert_close(found.scores, ref.values, rtol=1e-4, atol=1e-4)


def test_retriever_specs_carry_settings():
    from longmem.config import parse_retriever
    from longmem.memory import make_retriever

    assert parse_retriever("exact") == ("exact", {})
    assert parse_retriever("faiss-ivf:nprobe=8,min_chunks=512") == ("faiss-ivf", {"nprobe": 8, "min_chunks": 512})
    r = make_retriever("faiss-hnsw:ef_search=256,M=16")
    assert (r.kind, r.ef_search, r.M, r.nprobe) == ("hnsw", 256, 16, 32)  # the rest keep their defaults
    assert make_retriever("torch-ivf:nprobe=4").nprobe == 4 and make_retriever("exact:blocks=64").blocks == 64
    for spec, message in (("annoy", "'annoy' is not one of exact, faiss-ivf, faiss-hnsw, torch-ivf"),
                          ("faiss-ivf:ef_search=3", "'ef_search=3' is not a setting of faiss-ivf"),
                          ("faiss-ivf:nprobe", "'nprobe' is not a setting of faiss-ivf"),
                          ("torch-ivf:nprobe=0", "nprobe must be a whole number of at least 1, not '0'")):
        with pytest.raises(LongMemError, match=message):
            parse_retriever(spec)
    with pytest.raises(LongMemError, match="'x=1' is not a setting of exact"):
        LongMemConfig(retriever="exact:x=1").resolve(4)
