"""LongMemForCausalLM end to end: freezing, retrieval order, row isolation, persistence, generation."""

import pytest
import torch

from conftest import VOCAB, small_config, tiny_backbone
from longmem import LongMemError, LongMemForCausalLM, MemoryBank


def segments(n, B=2, T=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (B, T), generator=g) for _ in range(n)]


def test_training_step_updates_only_sidenet(model):
    frozen = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    side = {k: v.clone() for k, v in model.sidenet.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in model.sidenet.parameters()}
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    memory = model.new_memory(2)
    model.train()
    for x in segments(3):
        out = model(x, memory=memory, labels=x)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, frozen[k]), k
    assert all(p.grad is None for p in model.backbone.parameters())
    changed = {k for k, p in model.sidenet.named_parameters() if not torch.equal(p, side[k])}
    assert any(k.endswith("gate") for k in changed)
    assert len(changed) == len(side)  # every SideNet tensor moved (gate included)


def test_segment_never_retrieves_itself(family):
    # ask for more chunks than are stored, so everything searchable is retrieved
    model = LongMemForCausalLM.from_backbone(tiny_backbone(family), small_config(topk_tokens=64))
    memory = model.new_memory(2)
    a, b = segments(2)
    assert model(a, memory=memory).retrieval is None  # empty memory: nothing retrieved
    assert len(memory) == 16
    out = model(b, memory=memory)
    assert len(memory) == 32
    slots = out.retrieval.slots[out.retrieval.valid]
    assert int(slots.max()) < 8  # only the first segment's 16 tokens = 8 chunks were searchable
    assert out.retrieval.slots.shape[-1] == 8


def test_rows_are_isolated(family):
    model = LongMemForCausalLM.from_backbone(tiny_backbone(family), small_config())
    a, b = segments(2)
    a2 = a.clone()
    a2[0] = torch.randint(0, VOCAB, (16,))  # change row 0's past only
    logits = []
    for first in (a, a2):
        memory = model.new_memory(2)
        model(first, memory=memory)
        logits.append(model(b, memory=memory).logits)
    assert torch.equal(logits[0][1], logits[1][1])
    assert not torch.allclose(logits[0][0], logits[1][0])


def test_empty_memory_equals_no_memory_and_memory_matters(model):
    x, y = segments(2)
    ref = model(y).logits
    torch.testing.assert_close(model(y, memory=model.new_memory(2)).logits, ref, rtol=0, atol=0)
    memory = model.new_memory(2)
    model(x, memory=memory)
    assert not torch.allclose(model(y, memory=memory).logits, ref)


def test_right_padding_matches_unpadded(model):
    x = segments(1)[0]
    mask = torch.ones_like(x)
    mask[1, 10:] = 0
    mem_pad = model.new_memory(2)
    out = model(x, memory=mem_pad, attention_mask=mask)
    ref = model(x[1:, :10], memory=model.new_memory(1)).logits
    torch.testing.assert_close(out.logits[1, :10], ref[0], rtol=1e-5, atol=1e-5)
    assert mem_pad.sizes.tolist() == [16, 10]


def test_memorize_equals_forward_writes(model):
    x = torch.cat(segments(3), dim=1)  # (2, 48)
    m1, m2 = model.new_memory(2), model.new_memory(2)
    model.memorize(x, m1)
    for s in range(0, 48, 16):
        model(x[:, s:s + 16], memory=m2)
    assert torch.equal(m1.tokens(0)[0], m2.tokens(0)[0]) and torch.equal(m1.tokens(1)[1], m2.tokens(1)[1])


def test_save_load_roundtrip_bit_identical(family, tmp_path):
    model = LongMemForCausalLM.from_backbone(tiny_backbone(family), small_config())
    with torch.no_grad():
        for p in model.sidenet.parameters():
            p.add_(0.01 * torch.randn_like(p))  # make the SideNet differ from its initialisation
    a, b = segments(2)
    memory = model.new_memory(2)
    model(a, memory=memory)
    memory.save(tmp_path / "memory.safetensors")
    model.save_pretrained(tmp_path / "ckpt")
    ref = model(b, memory=memory).logits
    loaded = LongMemForCausalLM.from_pretrained(tmp_path / "ckpt")
    memory2 = loaded.load_memory(tmp_path / "memory.safetensors")
    assert torch.equal(loaded(b, memory=memory2).logits, ref)


def test_load_with_wrong_backbone_is_an_error(tmp_path):
    model = LongMemForCausalLM.from_backbone(tiny_backbone("llama"), small_config())
    model.save_pretrained(tmp_path / "ckpt")
    with pytest.raises(LongMemError, match="built for a different backbone"):
        LongMemForCausalLM.from_pretrained(tmp_path / "ckpt", backbone=tiny_backbone("llama", seed=1))
    other = LongMemForCausalLM.from_backbone(tiny_backbone("llama", seed=1), small_config())
    memory = other.new_memory(1)
    other.memorize(segments(1, B=1)[0], memory)
    memory.save(tmp_path / "m.safetensors")
    with pytest.raises(LongMemError, match="written for a different model"):
        model.load_memory(tmp_path / "m.safetensors")
    with pytest.raises(LongMemError, match="written for a different model"):
        model(segments(1, B=1)[0], memory=MemoryBank.load(tmp_path / "m.safetensors"))
    (tmp_path / "ckpt" / "sidenet.safetensors").write_bytes(b"garbage")
    with pytest.raises(LongMemError, match="corrupt or truncated"):
        LongMemForCausalLM.from_pretrained(tmp_path / "ckpt")
    with pytest.raises(LongMemError, match="not a LongMem checkpoint"):
        LongMemForCausalLM.from_pretrained(tmp_path / "nowhere")


def test_generate_with_memory(family):
    model = LongMemForCausalLM.from_backbone(tiny_backbone(family), small_config())
    prompt = torch.randint(0, VOCAB, (2, 37))  # 2 full segments go to memory, 5 tokens stay local
    memory = model.new_memory(2)
    out = model.generate(prompt, memory=memory, max_new_tokens=20, temperature=0)
    assert out.shape == (2, 57) and torch.equal(out[:, :37], prompt)
    # the first greedy token is the argmax of one forward over the local context with the same memory
    ref_mem = model.new_memory(2)
    model.memorize(prompt[:, :32], ref_mem)
    first = model(prompt[:, 32:], memory=ref_mem).logits[:, -1].argmax(-1)
    assert torch.equal(out[:, 37], first)
    # 5 + 19 tokens were fed (the last new token is never fed back): the 16-token window overflowed once at
    # 17 tokens and its older 8 tokens were memorized
    assert len(memory) == 32 + 8
    sampled = model.generate(prompt[:1], max_new_tokens=5, do_sample=True, temperature=0.8, top_k=5,
                             generator=torch.Generator().manual_seed(0))
    assert sampled.shape == (1, 42)


def test_segment_longer_than_configured_is_an_error(model):
    with pytest.raises(LongMemError, match="longer than segment_length=16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_row_with_empty_memory_next_to_full_rows(family):
    """A row whose memory was just reset stays finite and equals plain local attention."""
    model = LongMemForCausalLM.from_backbone(tiny_backbone(family), small_config())
    a, b = segments(2)
    memory = model.new_memory(2)
    model(a, memory=memory)
    memory.reset(rows=[1])
    out = model(b, memory=memory, labels=b)
    assert torch.isfinite(out.logits).all()
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.sidenet.parameters() if p.grad is not None)
    torch.testing.assert_close(out.logits[1], model(b[1:]).logits[0], rtol=1e-5, atol=1e-5)


def test_checkpoint_referencing_backbone_by_path(tmp_path):
    from transformers import AutoModelForCausalLM

    tiny_backbone("gpt2").save_pretrained(tmp_path / "bb")
    backbone = AutoModelForCausalLM.from_pretrained(tmp_path / "bb")
    model = LongMemForCausalLM.from_backbone(backbone, small_config())
    model.save_pretrained(tmp_path / "ckpt", backbone="reference")
    assert not (tmp_path / "ckpt" / "backbone").exists()
    x = segments(1)[0]
    loaded = LongMemForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert torch.equal(loaded(x).logits, model(x).logits)
    with pytest.raises(LongMemError, match="no path to reference"):
        LongMemForCausalLM.from_backbone(tiny_backbone("gpt2"), small_config()).save_pretrained(
            tmp_path / "c2", backbone="reference")


def test_memory_attention_reads_a_lower_precision_memory_in_the_query_dtype():
    """A bf16 memory read by a float32 SideNet: the memory is upcast, never the query downcast."""
    from longmem.sidenet import memory_attention

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 3, 8, generator=g)
    mem_k, mem_v = (torch.randn(2, 4, 3, 6, 8, generator=g).bfloat16() for _ in range(2))
    valid = torch.rand(2, 4, 3, 6, generator=g) > 0.3
    out = memory_attention(q, mem_k, mem_v, valid)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, memory_attention(q, mem_k.float(), mem_v.float(), valid), rtol=0, atol=0)


def test_memory_attention_gathered_in_blocks_equals_one_gather(family, monkeypatch):
    """The memory layer's retrieved tokens gathered a few queries at a time (as on CPU) give the same output and the
    same gradients as one gather of everything followed by `memory_attention` (the reference)."""
    import longmem.sidenet as sidenet

    model = LongMemForCausalLM.from_backbone(tiny_backbone(family), small_config())
    model.train()
    a, b, c = segments(3)
    results = []
    for block_bytes in (1, 1 << 40):  # one query per block; one block
        monkeypatch.setattr(sidenet, "GATHER_BYTES", block_bytes)
        memory = model.new_memory(2)
        model(a, memory=memory)
        model(b, memory=memory)
        model.zero_grad()
        out = model(c, memory=memory, labels=c)
        out.loss.backward()
        results.append((out.logits, [p.grad.clone() for p in model.sidenet.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=1e-6)
    for g0, g1 in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(g0, g1, rtol=1e-5, atol=1e-6)
    # and the reference: one gather of every retrieved token, attended per query head
    layer = model.sidenet.layers[model.config.sidenet_memory_layer]
    q = torch.randn(2, model.adapter.num_heads, 16, model.adapter.head_dim)
    Hkv = memory.spec.num_kv_heads
    queries = q.reshape(2, Hkv, -1, q.shape[-1])  # (B, Hkv, G*T, D)
    found = memory.search(queries, layer.topk_chunks)
    mem_k, mem_v = memory.gather(found.slots)  # (B, Hkv, G*T, K, D)
    valid = found.valid.repeat_interleave(memory.spec.chunk_size, dim=-1)
    ref = sidenet.memory_attention(queries, mem_k, mem_v, valid)
    monkeypatch.setattr(sidenet, "GATHER_BYTES", 1)
    torch.testing.assert_close(sidenet.retrieved_attention(queries, memory, found), ref, rtol=1e-6, atol=1e-6)


def test_new_memory_uses_the_given_retriever_and_the_model_device():
    from longmem.memory import ExactRetriever

    model = LongMemForCausalLM.from_backbone(tiny_backbone("llama"), small_config())
    retriever = ExactRetriever(max_scores=1 << 12)
    memory = model.new_memory(3, memory_size=32, retriever=retriever)
    assert memory.retriever is retriever and memory.batch_size == 3 and memory.spec.capacity == 32
    assert memory.device == model.device
    assert isinstance(model.new_memory(1).retriever, ExactRetriever)


def test_memory_with_the_wrong_number_of_rows_is_an_error(model):
    with pytest.raises(LongMemError, match=r"^the memory has 3 rows but the input has 2; create it with "
                                           r"model.new_memory\(batch_size=2\)$"):
        model(segments(1)[0], memory=model.new_memory(3))


def test_loss_is_none_without_labels(model):
    out = model(segments(1)[0])
    assert out.loss is None and out.logits.shape == (2, 16, VOCAB)


def test_float32_sidenet_over_a_bfloat16_backbone_without_autocast(family):
    """Hidden states are cast to the SideNet's dtype on the way in and to the LM head's on the way out."""
    model = LongMemForCausalLM.from_backbone(tiny_backbone(family).to(torch.bfloat16), small_config())
    model.sidenet.float()
    assert model.dtype == torch.float32
    x, y = segments(2)
    memory = model.new_memory(2)
    model(x, memory=memory)
    out = model(y, memory=memory)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()


def test_a_row_holding_a_single_chunk_reads_it(family):
    model = LongMemForCausalLM.from_backbone(tiny_backbone(family), small_config())
    with torch.no_grad():
        model.sidenet.layers[model.sidenet.memory_layer].gate.fill_(2.0)
    x, y = segments(2)
    memory = model.new_memory(2)
    model(x[:, :2], memory=memory)  # chunk_size 2: one chunk per row
    assert memory.num_chunks.tolist() == [1, 1]
    assert not torch.allclose(model(y, memory=memory).logits, model(y).logits)


def test_training_mode_uses_attention_dropout_without_a_padding_mask():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    backbone = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=128,
                                          attn_pdrop=0.5, resid_pdrop=0.0, embd_pdrop=0.0)).eval()
    model = LongMemForCausalLM.from_backbone(backbone, small_config()).train()
    x = segments(1)[0]
    with torch.no_grad():
        a, b = model(x).logits, model(x).logits
        model.eval()
        c, d = model(x).logits, model(x).logits
    assert not torch.allclose(a, b) and torch.equal(c, d)


# ---- one backbone pass, reused (model.backbone_forward) --------------------------------------------------------
def padded_segments(n, T=16, seed=1):
    """n segments of 3 rows: full, right-padded (9 real tokens), left-padded (5 pads); and their mask."""
    mask = torch.ones(3, T, dtype=torch.long)
    mask[1, 9:] = 0
    mask[2, :5] = 0
    return [(x, mask) for x in segments(n, B=3, T=T, seed=seed)]


def bank_state(memory):
    return {name: getattr(memory, name).clone() for name in memory.state}


@pytest.mark.parametrize("family", ["gpt2", "llama"])  # llama: grouped-query attention (2 kv heads for 4)
def test_reused_backbone_pass_equals_plain_forward(family):
    model = LongMemForCausalLM.from_backbone(tiny_backbone(family), small_config(memory_size=24)).eval()
    plain = {m: model.new_memory(3, memory_size=m) for m in (24, 64)}
    shared = {m: model.new_memory(3, memory_size=m) for m in (24, 64)}
    for x, mask in padded_segments(4):  # the 24-token memory evicts from the third segment on
        bb = model.backbone_forward(x, mask)
        want = model(x, attention_mask=mask).logits
        assert torch.equal(model(x, backbone_output=bb).logits, want)  # no memory; mask taken from bb
        assert torch.equal(model(x, attention_mask=mask, backbone_output=bb).logits, want)
        for m in (24, 64):  # one pass, several memories
            want = model(x, memory=plain[m], attention_mask=mask)
            got = model(x, memory=shared[m], backbone_output=bb)
            assert torch.equal(got.logits, want.logits)
            assert (got.retrieval is None) == (want.retrieval is None)
            if want.retrieval is not None:
                assert torch.equal(got.retrieval.slots, want.retrieval.slots)
            a, b = bank_state(shared[m]), bank_state(plain[m])
            assert all(torch.equal(a[k], b[k]) for k in a), m
    assert len(plain[24]) == 24 and len(plain[64]) > 24


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_backbone_logits_equal_the_backbones_own(family):
    """The LM head on the pass's H[L] gives the HuggingFace model's logits bit for bit, and with right padding
    (masked in the pass) its real tokens' logits are those of the unmasked padded input and of the unpadded one."""
    model = LongMemForCausalLM.from_backbone(tiny_backbone(family), small_config()).eval()
    (x, mask), = padded_segments(1)
    assert torch.equal(model.backbone_logits(model.backbone_forward(x)), model.backbone(input_ids=x).logits)
    got = model.backbone_logits(model.backbone_forward(x[:2], mask[:2]))  # rows: full, right-padded
    hf = model.backbone(input_ids=x[:2]).logits                           # padding visible, masked only causally
    assert torch.equal(got[0], hf[0]) and torch.equal(got[1, :9], hf[1, :9])
    alone = model.backbone(input_ids=x[1:2, :9]).logits[0]                 # the real tokens alone
    torch.testing.assert_close(got[1, :9], alone, rtol=1e-5, atol=1e-5)  # other shapes: float rounding only


def test_backbone_output_of_another_input_is_an_error(model):
    (x, mask), = padded_segments(1)
    bb = model.backbone_forward(x, mask)
    other = x.clone()
    other[0, 0] = (other[0, 0] + 1) % VOCAB
    for kw in (dict(input_ids=other), dict(input_ids=x[:2]), dict(input_ids=x, attention_mask=torch.ones_like(x))):
        with pytest.raises(LongMemError, match="backbone_forward on this same input"):
            model(backbone_output=bb, **kw)
    assert torch.equal(model(x, attention_mask=mask.bool(), backbone_output=bb).logits,
                       model(x, attention_mask=mask).logits)  # the same mask as bool: accepted
    with pytest.raises(LongMemError, match="segment_length"):
        model.backbone_forward(torch.zeros(1, 17, dtype=torch.long))
