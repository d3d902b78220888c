"""Memory banks as values (to, select, stack, split), stream positions, row checks, the checksummed file
format, and the public interface the evaluations read (held_span, split_prompt), against references."""

import hashlib
import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import VOCAB, small_config, tiny_backbone
from longmem import LongMemConfig, LongMemError, LongMemForCausalLM, MemoryBank, MemorySpec
from longmem.config import MEMORY_DTYPES
from longmem.memory import Retrieval, held_span
from longmem.memory.bank import COUNTERS, FORMAT, LEGACY_FORMAT, PREVIOUS_FORMAT, SLOTTED

H, D = 2, 8


def bank(capacity=64, chunk=4, rows=2, dtype="float32"):
    return MemoryBank(MemorySpec(num_kv_heads=H, head_dim=D, chunk_size=chunk, capacity=capacity, dtype=dtype,
                                 fingerprint="test"), rows)


def segment(rows, T, seed, pad=True):
    """Random keys (rows, T, H, D) and a 0/1 mask with some padding in every row but the first."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(rows, T, H, D, generator=g)
    mask = torch.ones(rows, T, dtype=torch.long)
    if pad:
        mask[1:] = (torch.rand(rows - 1, T, generator=g) > 0.3).long()
    return k, mask


def write(mem, k, mask):
    mem.write(k, -k, mask)


def row_state(mem, row):
    """Everything observable about one row, comparable across banks of different storage sizes."""
    p = int(mem.num_pending[row])
    keys, values = mem.tokens(row)
    return {"keys": keys, "values": values, "pending_keys": mem.pending_keys[row, :p],
            "pending_values": mem.pending_values[row, :p], "positions": mem.chunk_positions(row),
            **{name: int(getattr(mem, name)[row]) for name in ("num_chunks", "next_slot", "num_pending", "written")},
            "size": int(mem.sizes[row])}


def assert_same_row(a, ra, b, rb):
    sa, sb = row_state(a, ra), row_state(b, rb)
    assert sa.keys() == sb.keys()
    for name in sa:
        if torch.is_tensor(sa[name]):
            assert torch.equal(sa[name], sb[name]), name
        else:
            assert sa[name] == sb[name], name


def assert_same_search(a, ra, b, rb, seed=0, k=5):
    """Row ra of bank a and row rb of bank b retrieve the same chunks for the same queries."""
    q = torch.randn(1, H, 6, D, generator=torch.Generator().manual_seed(seed))
    qa = q.expand(a.batch_size, -1, -1, -1).contiguous()
    qb = q.expand(b.batch_size, -1, -1, -1).contiguous()
    res_a, res_b = a.search(qa, k), b.search(qb, k)
    n = min(k, int(a.num_chunks[ra]))
    assert n == min(k, int(b.num_chunks[rb]))
    for res, row in ((res_a, ra), (res_b, rb)):
        assert bool(res.valid[row, ..., :n].all()) and not bool(res.valid[row, ..., n:].any())
    assert torch.equal(res_a.slots[ra, ..., :n], res_b.slots[rb, ..., :n])
    torch.testing.assert_close(res_a.scores[ra, ..., :n], res_b.scores[rb, ..., :n])
    ga, gb = a.gather(res_a.slots)[1], b.gather(res_b.slots)[1]  # values (B, H, Q, k*C, D)
    C = a.spec.chunk_size
    assert torch.equal(ga[ra, ..., :n * C, :], gb[rb, ..., :n * C, :])


# ---- the eviction rule and stream positions --------------------------------------------------------------
def test_held_span():
    assert held_span(0, 8, 4) == (0, 0)
    assert held_span(3, 8, 4) == (0, 0)    # pending only
    assert held_span(4, 8, 4) == (0, 4)
    assert held_span(11, 8, 4) == (0, 8)   # exactly full
    assert held_span(12, 8, 4) == (4, 12)  # the first chunk evicted
    assert held_span(27, 8, 2) == (18, 26)


@pytest.mark.parametrize("capacity", [1000, 24])  # never full; wrapped, with a write longer than the capacity
def test_written_and_chunk_positions_follow_the_stream(capacity):
    mem, stream = bank(capacity=capacity, chunk=4), [[], []]
    for i, T in enumerate([13, 6, 11, 30, 5]):
        k, mask = segment(2, T, seed=i)
        write(mem, k, mask)
        for b in range(2):
            stream[b].append(k[b][mask[b].bool()])
    for b in range(2):
        s = torch.cat(stream[b])                          # (N, H, D) every token written, in order
        n = s.shape[0]
        assert int(mem.written[b]) == n                    # pending tokens included
        pos = mem.chunk_positions(b)
        end = n // 4 * 4
        assert pos.dtype == torch.long and pos.tolist() == list(range(max(0, end - capacity), end, 4))
        keys, _ = mem.tokens(b)                            # (H, 4 * len(pos), D)
        assert keys.shape[1] == 4 * len(pos) == int(mem.sizes[b])
        for j, p in enumerate(pos.tolist()):
            assert torch.equal(keys[:, 4 * j:4 * j + 4].transpose(0, 1), s[p:p + 4])
    assert mem.written[0] > capacity or capacity == 1000


def test_reset_starts_a_new_stream():
    mem = bank(capacity=16, chunk=4)
    for i in range(3):
        write(mem, *segment(2, 9, seed=i, pad=False))
    mem.reset(rows=[0])
    assert mem.written.tolist() == [0, 27] and mem.chunk_positions(0).tolist() == []
    assert mem.chunk_positions(1).tolist() == [8, 12, 16, 20]
    write(mem, *segment(2, 5, seed=9, pad=False))
    assert mem.written.tolist() == [5, 32] and mem.chunk_positions(0).tolist() == [0]
    mem.reset()
    assert mem.written.tolist() == [0, 0]


# ---- rows ------------------------------------------------------------------------------------------------
def test_rows_out_of_range_are_errors_naming_the_valid_range():
    mem = bank(rows=2)
    for bad in ([2], [-1], [0, 5], torch.tensor([1, 2])):
        with pytest.raises(LongMemError, match=r"^row (2|-1|5) is out of range: this memory has rows 0\.\.1$"):
            mem.reset(rows=bad)
        with pytest.raises(LongMemError, match=r"^row (2|-1|5) is out of range: this memory has rows 0\.\.1$"):
            mem.select(bad)
    for mask in (torch.tensor([True]), torch.tensor([True, False, True]), torch.ones(2, 1, dtype=torch.bool)):
        with pytest.raises(LongMemError, match=r"^a row mask needs 2 entries \(one per row\), not \((1,|3,|2, 1)\)$"):
            mem.reset(rows=mask)


def test_reset_by_mask_and_by_index():
    for rows in (torch.tensor([False, True]), [False, True], [1], torch.tensor(1), range(1, 2)):
        mem = bank(rows=2)
        write(mem, *segment(2, 9, seed=0, pad=False))
        mem.reset(rows=rows)
        assert mem.sizes.tolist() == [8, 0] and mem.num_pending.tolist() == [1, 0] and mem.written.tolist() == [9, 0]
        assert len(mem) == 8  # the fullest row
    mem.reset(rows=[])
    assert mem.sizes.tolist() == [8, 0]


# ---- banks as values -----------------------------------------------------------------------------------------
def three_banks():
    """Single-row banks with different histories and storage sizes: wrapped (S=100), short (S=64), pending only."""
    a, b, c = (bank(capacity=400, chunk=4, rows=1) for _ in range(3))
    for i, T in enumerate([150, 130, 177, 31]):  # 488 tokens: 122 chunks through a ring of 100
        write(a, *segment(1, T, seed=i))
    write(b, *segment(1, 30, seed=7))
    write(c, *segment(1, 3, seed=8))
    assert [m.keys.shape[2] for m in (a, b, c)] == [100, 64, 0]
    assert a.next_slot.tolist() == [22] and c.num_pending.tolist() == [3]
    return [a, b, c]


def test_split_of_stack_gives_back_the_banks():
    singles = three_banks()
    stacked = MemoryBank.stack(singles)
    assert stacked.batch_size == 3 and stacked.keys.shape[2] == 100 and stacked.spec == singles[0].spec
    for i, (single, back) in enumerate(zip(singles, stacked.split(), strict=True)):
        assert back.batch_size == 1
        assert_same_row(single, 0, back, 0)
        assert_same_row(single, 0, stacked, i)
        S = single.keys.shape[2]
        for name in SLOTTED:  # the storage, zero-padded to the largest
            assert torch.equal(getattr(back, name)[:, :, :S], getattr(single, name))
            assert not getattr(back, name)[:, :, S:].any()
        for name in COUNTERS:
            assert torch.equal(getattr(back, name), getattr(single, name)), name
    # banks of several rows stack in order too
    two = MemoryBank.stack([singles[2], MemoryBank.stack(singles[:2])])
    for row, single in enumerate([singles[2], *singles[:2]]):
        assert_same_row(two, row, single, 0)


def test_writing_to_a_stack_equals_writing_to_each_bank():
    singles = three_banks()
    stacked = MemoryBank.stack(singles)
    for step, T in enumerate([9, 17, 64, 3, 70]):
        k, mask = segment(3, T, seed=100 + step)
        write(stacked, k, mask)
        for i, single in enumerate(singles):
            write(single, k[i:i + 1], mask[i:i + 1])
        for i, single in enumerate(singles):
            assert_same_row(stacked, i, single, 0)
            assert_same_search(stacked, i, single, 0, seed=step)


def test_select_then_write_equals_write_then_select():
    stacked = MemoryBank.stack(three_banks())
    rows = [2, 0, 2]
    k, mask = segment(3, 21, seed=5)
    first = stacked.select(rows)
    write(first, k[rows], mask[rows])
    later = stacked.to("cpu")
    write(later, k, mask)
    later = later.select(torch.tensor(rows))
    assert first.batch_size == later.batch_size == 3
    for r in range(3):
        assert_same_row(first, r, later, r)
        assert_same_search(first, r, later, r)
    assert_same_row(first, 0, first, 2)  # a repeated row is copied, not shared
    masked = stacked.select(torch.tensor([True, False, True]))
    assert masked.batch_size == 2
    assert_same_row(masked, 1, stacked, 2)


def test_derived_banks_are_copies():
    mem = bank()
    write(mem, *segment(2, 11, seed=0))
    for other in (mem.to("cpu"), mem.select([0, 1]), MemoryBank.stack([mem]), *mem.split()):
        assert other is not mem and other.retriever is mem.retriever and other.spec == mem.spec
        for name in mem.state:
            assert getattr(other, name).data_ptr() != getattr(mem, name).data_ptr(), name
    copy = mem.to(torch.device("cpu"))
    write(copy, *segment(2, 40, seed=1))
    assert mem.written.tolist() == [11, int(segment(2, 11, seed=0)[1][1].sum())]
    moved = mem.to("meta")
    assert moved.device.type == "meta" and all(getattr(moved, n).device.type == "meta" for n in mem.state)
    assert moved.keys.shape == mem.keys.shape


def test_stack_checks_its_banks():
    with pytest.raises(LongMemError, match="^MemoryBank.stack needs at least one bank$"):
        MemoryBank.stack([])
    with pytest.raises(LongMemError, match=r"^cannot stack memories of different specs or devices \(.*; build "
                                           r"them with one model$"):
        MemoryBank.stack([bank(capacity=64), bank(capacity=32)])
    on_meta = MemoryBank(bank().spec, 2, device="meta")
    with pytest.raises(LongMemError, match=r"^cannot stack .* on meta vs .* on cpu\); build them with one model$"):
        MemoryBank.stack([bank(), on_meta])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_model_over_a_stacked_memory_equals_the_single_memories(family):
    model = LongMemForCausalLM.from_backbone(tiny_backbone(family), small_config(memory_size=32)).eval()
    with torch.no_grad():
        model.sidenet.layers[model.config.sidenet_memory_layer].gate.fill_(3.0)  # lean on the memory
    g = torch.Generator().manual_seed(0)
    singles = [model.new_memory(1) for _ in range(3)]
    for single, n in zip(singles, (45, 9, 1), strict=True):  # wrapped, short, pending only
        model.memorize(torch.randint(1, VOCAB, (1, n), generator=g), single)
    stacked = MemoryBank.stack(singles)
    with torch.no_grad():
        for T in (11, 16):
            x = torch.randint(1, VOCAB, (3, T), generator=g)
            out = model(x, memory=stacked)
            assert isinstance(out.retrieval, Retrieval)
            Hkv = model.adapter.num_kv_heads
            assert out.retrieval.slots.shape == (3, Hkv, model.adapter.num_heads // Hkv * T, 4)
            for i, single in enumerate(singles):
                ref = model(x[i:i + 1], memory=single).logits[0]
                torch.testing.assert_close(out.logits[i], ref, rtol=1e-5, atol=1e-5)
                assert_same_row(stacked, i, single, 0)
            assert not torch.allclose(out.logits[0], model(x[:1]).logits[0], atol=1e-3)  # the memory matters
    with pytest.raises(LongMemError, match=r"^the memory is on meta but the model on cpu; move it with "
                                           r"memory\.to\(model\.device\), or keep it in CPU memory with "
                                           r"memory\.offload\(model\.device\)$"):
        model(x, memory=stacked.to("meta"))


# ---- the file format ------------------------------------------------------------------------------------------
def saved(tmp_path, capacity=12):
    mem = bank(capacity=capacity, chunk=4, dtype="bfloat16")
    for i, T in enumerate([7, 9, 6]):
        write(mem, *segment(2, T, seed=i))
    path = tmp_path / "m.safetensors"
    mem.save(path)
    return mem, path


def read(path):
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}


def test_save_load_keeps_stream_positions_and_a_checksum_of_the_bytes(tmp_path):
    mem, path = saved(tmp_path)
    meta, tensors = read(path)
    assert meta["format"] == FORMAT == "longmem.memory/3" and set(tensors) == set(mem.state) == set(SLOTTED + COUNTERS)
    h = hashlib.sha256((meta["spec"] + meta["batch_size"]).encode())
    for name in sorted(tensors):
        h.update(tensors[name].view(torch.uint8).numpy().tobytes())
    assert meta["sha256"] == h.hexdigest()
    back = MemoryBank.load(path)
    for row in range(2):
        assert_same_row(mem, row, back, row)
    assert mem.written.tolist() != (mem.sizes + mem.num_pending).tolist()  # the ring wrapped: positions matter


def test_flipped_bytes_fail_the_checksum(tmp_path):
    _, path = saved(tmp_path)
    data = bytearray(path.read_bytes())
    header = 8 + struct.unpack("<Q", data[:8])[0]
    middle = header + (len(data) - header) // 2
    data[middle] ^= 0xFF
    (tmp_path / "flipped.safetensors").write_bytes(bytes(data))
    with pytest.raises(LongMemError, match=r"^memory file .*flipped.safetensors fails its checksum: its bytes "
                                           r"changed since it was saved; re-create it with memorize$"):
        MemoryBank.load(tmp_path / "flipped.safetensors")
    meta, tensors = read(path)
    for key, value in (("spec", meta["spec"].replace('"capacity": 12', '"capacity": 8')), ("batch_size", "1"),
                       ("sha256", None)):  # the header's spec and row count are summed too; a missing sum fails
        m = {**meta, key: value} if value is not None else {k: v for k, v in meta.items() if k != key}
        assert m != meta
        save_file(tensors, str(tmp_path / "h.safetensors"), metadata=m)
        with pytest.raises(LongMemError, match="fails its checksum"):
            MemoryBank.load(tmp_path / "h.safetensors")


def test_previous_format_still_loads_without_a_checksum(tmp_path):
    mem, path = saved(tmp_path)
    meta, tensors = read(path)
    del tensors["written"], tensors["token_ids"], tensors["pending_token_ids"], meta["sha256"]
    save_file(tensors, str(tmp_path / "v1.safetensors"), metadata={**meta, "format": LEGACY_FORMAT})
    back = MemoryBank.load(tmp_path / "v1.safetensors")
    assert LEGACY_FORMAT == "longmem.memory/1"
    # no stream length in the old format: it is rebuilt as held + pending, positions count from the oldest chunk
    assert back.written.tolist() == (mem.sizes + mem.num_pending).tolist() and mem.sizes.tolist() == [12, 12]
    assert back.chunk_positions(0).tolist() == [0, 4, 8]
    lost = mem.written - back.written  # the evicted tokens
    assert lost.tolist() == [8, 0]  # row 0 wrapped; row 1 (with padding) just filled its 3 slots
    for row in range(2):
        assert torch.equal(back.tokens(row)[0], mem.tokens(row)[0])
    k, mask = segment(2, 13, seed=3)
    write(mem, k, mask)
    write(back, k, mask)
    for row in range(2):
        s, t = row_state(mem, row), row_state(back, row)
        assert torch.equal(s["keys"], t["keys"]) and s["num_chunks"] == t["num_chunks"]
        assert s["next_slot"] == t["next_slot"] and s["num_pending"] == t["num_pending"]
        assert s["written"] - t["written"] == int(lost[row])
    save_file(tensors, str(tmp_path / "v4.safetensors"), metadata={**meta, "format": "longmem.memory/4"})
    with pytest.raises(LongMemError, match=r"^.*v4.safetensors is not a longmem memory file \(format "
                                           r"'longmem.memory/4', expected 'longmem.memory/3'\)$"):
        MemoryBank.load(tmp_path / "v4.safetensors")
    save_file(tensors, str(tmp_path / "no-written.safetensors"), metadata={**meta, "format": FORMAT,
                                                                         "sha256": "0" * 64})
    with pytest.raises(LongMemError, match="fails its checksum"):
        MemoryBank.load(tmp_path / "no-written.safetensors")


def test_empty_bank_round_trips_and_header_fields_are_required(tmp_path):
    from longmem.memory.bank import checksum

    bank(rows=3).save(tmp_path / "empty.safetensors")
    back = MemoryBank.load(tmp_path / "empty.safetensors")
    assert back.batch_size == 3 and back.written.tolist() == [0, 0, 0] and len(back) == 0
    meta, tensors = read(tmp_path / "empty.safetensors")
    for missing in ("spec", "batch_size"):
        m = {k: v for k, v in meta.items() if k != missing}
        m["sha256"] = checksum(tensors, m.get("spec", "") + m.get("batch_size", ""))
        save_file(tensors, str(tmp_path / "h.safetensors"), metadata=m)
        with pytest.raises(LongMemError, match=f"inconsistent contents \\(KeyError: '{missing}'\\)"):
            MemoryBank.load(tmp_path / "h.safetensors")


def test_current_format_requires_the_stream_lengths(tmp_path):
    from longmem.memory.bank import checksum

    _, path = saved(tmp_path)
    meta, tensors = read(path)
    del tensors["written"]
    meta["sha256"] = checksum(tensors, meta["spec"] + meta["batch_size"])
    save_file(tensors, str(tmp_path / "m2.safetensors"), metadata=meta)
    with pytest.raises(LongMemError, match="inconsistent contents .*missing tensor 'written'"):
        MemoryBank.load(tmp_path / "m2.safetensors")


# ---- dtypes, config, retrieval type ----------------------------------------------------------------------------
def test_one_table_of_memory_dtypes():
    from longmem.runtime import DTYPE_NAMES

    assert MEMORY_DTYPES == ("float32", "bfloat16", "float16", "int8")
    assert set(MEMORY_DTYPES) - {"int8"} == set(DTYPE_NAMES.values())
    assert [bank(dtype=name).keys.dtype for name in MEMORY_DTYPES] == [torch.float32, torch.bfloat16, torch.float16,
                                                                       torch.int8]
    with pytest.raises(LongMemError, match=r"^memory dtype 'int4' is not one of float32, bfloat16, float16, int8$"):
        bank(dtype="int4")
    with pytest.raises(LongMemError, match=r"memory_dtype='int4' is not one of float32, bfloat16, float16, int8$"):
        LongMemConfig(memory_dtype="int4").resolve(4)


def test_config_has_no_extra_field_and_reads_configs_that_had_one():
    d = LongMemConfig().to_dict()
    assert "extra" not in d and not hasattr(LongMemConfig(), "extra")
    assert LongMemConfig.from_dict({**d, "extra": {}, "chunk_size": 8}) == LongMemConfig(chunk_size=8)
    with pytest.raises(LongMemError, match=r"unknown LongMemConfig field\(s\) \['extras'\]"):
        LongMemConfig.from_dict({**d, "extras": {}})


def test_one_retrieval_type():
    import longmem.memory
    import longmem.memory.retrieval
    import longmem.sidenet

    assert not hasattr(longmem.memory, "SearchResult") and not hasattr(longmem.memory.retrieval, "SearchResult")
    assert not hasattr(longmem.sidenet, "Retrieval")
    mem = bank()
    write(mem, *segment(2, 12, seed=0))
    assert isinstance(mem.search(torch.randn(2, H, 3, D), 2), Retrieval)


# ---- what the evaluations read --------------------------------------------------------------------------------
def test_split_prompt():
    model = LongMemForCausalLM.from_backbone(tiny_backbone("gpt2"), small_config(segment_length=16))
    assert [model.split_prompt(n) for n in (1, 16, 17, 32, 33, 37)] == \
        [(0, 1), (0, 16), (16, 1), (16, 16), (32, 1), (32, 5)]
    with pytest.raises(LongMemError, match="^a prompt of 0 tokens: generate needs at least one$"):
        model.split_prompt(0)
    for n, prefix in ((32, 16), (33, 32)):  # generate memorizes the prefix split_prompt gives
        memory = model.new_memory(1)
        model.generate(torch.randint(1, VOCAB, (1, n)), memory=memory, max_new_tokens=0)
        assert memory.written.tolist() == [model.split_prompt(n)[0]] == [prefix]


def test_icl_memory_stats_read_the_bank_rule():
    from longmem.eval import icl

    lengths = [10, 13, 9, 12, 11, 10, 14]
    for capacity in (64, 200, 20):
        mem = bank(capacity=capacity, chunk=2, rows=1)
        for i, n in enumerate(lengths):
            write(mem, *segment(1, n, seed=i))
        stats = icl.memory_stats(lengths, capacity, 2)
        pos = mem.chunk_positions(0)
        starts = torch.tensor([0, *lengths]).cumsum(0)[:-1]
        assert stats["held_tokens"] == int(mem.sizes[0])
        assert stats["demos_held"] == int((starts >= pos[0]).sum())
        assert stats["evicted"] == bool(pos[0] > 0) and stats["demo_tokens"] == int(mem.written[0])


def test_passkey_key_visibility_reads_the_bank_rule():
    from longmem.eval.passkey import PasskeyPrompt, key_visibility

    for prefix in (0, 3, 40, 100, 103):
        mem = bank(capacity=32, chunk=4, rows=1)
        if prefix:
            write(mem, *segment(1, prefix, seed=prefix, pad=False))
        held = {p + i for p in mem.chunk_positions(0).tolist() for i in range(4)}
        for a in range(0, 110, 3):
            span = range(a, a + 7)
            local = sum(i >= prefix for i in span)
            memory = sum(i in held for i in span)
            want = ("local" if local == 7 else "memory" if local + memory == 7
                    else "evicted" if local + memory == 0 else "partial")
            assert key_visibility(PasskeyPrompt([], "0", a, a + 7), prefix, 32, 4) == want, (prefix, a)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "int8"])
def test_full_size_bounds_the_file_of_a_full_memory(tmp_path, dtype):
    """MemoryBank.full_size is what the tensors of a saved full memory take (the server's upload limit)."""
    spec = MemorySpec(num_kv_heads=2, head_dim=8, chunk_size=4, capacity=64, dtype=dtype)
    bank = MemoryBank(spec, 1)
    bank.write(torch.randn(1, 70, 2, 8), torch.randn(1, 70, 2, 8), token_ids=torch.arange(70)[None])  # full, wrapped
    bank.save(tmp_path / "m.st")
    size = (tmp_path / "m.st").stat().st_size
    header = 8 + int.from_bytes((tmp_path / "m.st").read_bytes()[:8], "little")  # safetensors: length, then JSON
    assert size - header == MemoryBank.full_size(spec)
