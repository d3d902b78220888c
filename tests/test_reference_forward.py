"""LongMemForCausalLM against an independent reference forward written from the equations.

The reference uses only the frozen HuggingFace backbone (`backbone(..., output_hidden_states=True)`),
the HF submodules of the SideNet's copied blocks, HF's `apply_rotary_pos_emb` and the backbone's
`rotary_emb`. It keeps its own memory (a list of every memorized token's key/value per row,
computed by running the backbone's memory-layer modules itself), builds the chunks and their
mean keys itself and does brute-force top-k with explicit loops per row, head and query.
Nothing of longmem's SideNet attention, adapters or MemoryBank.search/gather is used.

    S[0] = H[0],  S[l+1] = layer_l(S[l]) + (H[2l+2] - H[2l]),  logits = lm_head(norm(S[n]))
    memory layer, query head h, token t (kv head j = h // G):
      A = softmax(q_rot . K_rot^T / sqrt(D) + causal/padding mask) V          (local, positions)
      top-k chunks c by q . mean(K_c)   (q pre-rotary, per kv head, per row)
      M = softmax(q . K~^T / sqrt(D)) V~   over the k*C tokens of those chunks  (no positions)
      out = (1 - sigmoid(g_h)) A + sigmoid(g_h) M     (A alone when the row's memory is empty)

Shapes: B rows, T tokens, Hq query heads, Hkv kv heads, G = Hq // Hkv, D head dim, C chunk size.
"""

import math

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from conftest import VOCAB, small_config, tiny_backbone
from longmem import LongMemForCausalLM

TOL = dict(rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# the reference
# ---------------------------------------------------------------------------------------------
class RefMemory:
    """Every memorized token of every row, oldest first: the FIFO/chunking rules applied on read."""

    def __init__(self, batch_size, capacity, chunk_size):
        self.tokens = [[] for _ in range(batch_size)]  # row -> list of (k (Hkv, D), v (Hkv, D))
        self.capacity, self.C = capacity, chunk_size

    def reset(self, row):
        self.tokens[row] = []

    def chunks(self, row):
        """The row's retrievable chunks: complete chunks of its stream, the newest `capacity` tokens."""
        toks = self.tokens[row]
        complete = toks[: len(toks) // self.C * self.C]
        kept = complete[max(0, len(complete) - self.capacity):]
        return [kept[i:i + self.C] for i in range(0, len(kept), self.C)]

    def retrievable(self, row):
        return len(self.chunks(row)) * self.C


def ref_positions(mask):
    """(B, T): position of each real token = number of real tokens before it (pads: 0)."""
    B, T = mask.shape
    pos = torch.zeros(B, T, dtype=torch.long)
    for b in range(B):
        n = 0
        for t in range(T):
            if mask[b, t]:
                pos[b, t] = n
                n += 1
    return pos


def heads(t, n, D):
    B, T, _ = t.shape
    return t.view(B, T, n, D).transpose(1, 2)  # (B, n, T, D)


def ref_qkv(family, block, x, pos, rotary_emb, Hq, Hkv, D):
    """Pre-rotary q (B, Hq, T, D), k/v (B, Hkv, T, D) and the positioned q_rot, k_rot."""
    if family == "gpt2":
        q, k, v = block.attn.c_attn(block.ln_1(x)).split(Hq * D, dim=-1)
        q, k, v = heads(q, Hq, D), heads(k, Hkv, D), heads(v, Hkv, D)
        return q, k, v, q, k  # learned absolute positions live in H[0]: attention itself is position-free
    h = block.input_layernorm(x)
    at = block.self_attn
    q, k, v = heads(at.q_proj(h), Hq, D), heads(at.k_proj(h), Hkv, D), heads(at.v_proj(h), Hkv, D)
    cos, sin = rotary_emb(x, pos)
    q_rot, k_rot = apply_rotary_pos_emb(q, k, cos, sin)
    return q, k, v, q_rot, k_rot


def ref_block(family, block, x, pos, mask, rotary_emb, Hq, Hkv, D, memory=None, gate=None, topk_chunks=None):
    """One SideNet layer, memory-augmented when `memory` is given. x (B, T, d) -> (B, T, d)."""
    B, T, _ = x.shape
    G = Hq // Hkv
    q, k, v, q_rot, k_rot = ref_qkv(family, block, x, pos, rotary_emb, Hq, Hkv, D)
    out = torch.zeros(B, T, Hq, D)
    for b in range(B):
        chunks = memory.chunks(b) if memory is not None else []
        for h in range(Hq):
            j = h // G
            if chunks:
                means = torch.stack([torch.stack([tok[0][j] for tok in c]).mean(0) for c in chunks])  # (S, D)
                mk = [torch.stack([tok[0][j] for tok in c]) for c in chunks]  # S x (C, D)
                mv = [torch.stack([tok[1][j] for tok in c]) for c in chunks]
            for t in range(T):
                if not mask[b, t]:
                    continue  # padding: never read by a real token, never compared
                keys = [u for u in range(t + 1) if mask[b, u]]
                s = torch.stack([q_rot[b, h, t] @ k_rot[b, j, u] for u in keys]) / math.sqrt(D)
                a = torch.softmax(s, 0) @ v[b, j, keys]
                if chunks:
                    score = [float(q[b, h, t] @ means[c]) for c in range(len(chunks))]
                    top = sorted(range(len(chunks)), key=lambda c: -score[c])[:topk_chunks]
                    K, V = torch.cat([mk[c] for c in top]), torch.cat([mv[c] for c in top])  # (k*C, D)
                    m = torch.softmax(K @ q[b, h, t] / math.sqrt(D), 0) @ V
                    g = torch.sigmoid(gate[h])
                    a = (1 - g) * a + g * m
                out[b, t, h] = a
    o = out.reshape(B, T, Hq * D)
    if family == "gpt2":
        x = x + block.attn.c_proj(o)
        return x + block.mlp(block.ln_2(x))
    x = x + block.self_attn.o_proj(o)
    return x + block.mlp(block.post_attention_layernorm(x))


def memory_layer_kv(family, backbone, hidden, layer, Hkv, D):
    """The backbone's memory layer keys/values, pre-rotary, from its own modules: (B, T, Hkv, D) each."""
    x = hidden[layer]
    B, T, d = x.shape
    if family == "gpt2":
        blk = backbone.transformer.h[layer]
        _, k, v = blk.attn.c_attn(blk.ln_1(x)).split(d, dim=-1)
    else:
        blk = backbone.model.layers[layer]
        h = blk.input_layernorm(x)
        k, v = blk.self_attn.k_proj(h), blk.self_attn.v_proj(h)
    return k.view(B, T, Hkv, D), v.view(B, T, Hkv, D)


@torch.no_grad()
def reference_forward(family, model, memory, x, mask=None, write=True):
    """Reference logits (B, T, V) for one segment; then the segment's real tokens go into `memory`."""
    backbone, cfg = model.backbone, model.config
    B, T = x.shape
    mask = torch.ones_like(x) if mask is None else mask
    pos = ref_positions(mask)
    hf = backbone(input_ids=x, attention_mask=None if bool(mask.all()) else mask, position_ids=pos,
                  output_hidden_states=True, use_cache=False)
    H = hf.hidden_states
    bc = backbone.config
    if family == "gpt2":
        Hq = Hkv = bc.n_head
        D, rotary = bc.n_embd // bc.n_head, None
    else:
        Hq, Hkv = bc.num_attention_heads, bc.num_key_value_heads
        D, rotary = bc.hidden_size // Hq, backbone.model.rotary_emb
    s = H[0]
    for l, layer in enumerate(model.sidenet.layers):
        if l == cfg.sidenet_memory_layer:
            out = ref_block(family, layer.block, s, pos, mask, rotary, Hq, Hkv, D, memory, layer.gate, cfg.topk_chunks)
        else:
            out = ref_block(family, layer.block, s, pos, mask, rotary, Hq, Hkv, D)
        s = out + (H[2 * l + 2] - H[2 * l])
    logits = backbone.get_output_embeddings()(model.sidenet.norm(s))
    if write:
        k, v = memory_layer_kv(family, backbone, H, cfg.memory_layer, Hkv, D)
        for b in range(B):
            for t in range(T):
                if mask[b, t]:
                    memory.tokens[b].append((k[b, t], v[b, t]))
    return logits


def reference_loss(logits, labels):
    """Mean over non-ignored targets of -log p(labels[t+1] | logits[t])."""
    total, n = 0.0, 0
    B, T, _ = logits.shape
    for b in range(B):
        for t in range(T - 1):
            y = int(labels[b, t + 1])
            if y != -100:
                total += float(-torch.log_softmax(logits[b, t].double(), 0)[y])
                n += 1
    return total / n


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def perturbed_model(family, seed=0, **cfg):
    """A LongMem model whose SideNet differs from its backbone copies, with random non-zero gates."""
    model = LongMemForCausalLM.from_backbone(tiny_backbone(family), small_config(**cfg))
    blocks = model.adapter.blocks
    for i, layer in enumerate(model.sidenet.layers):  # initialisation: layer i copies backbone block 2i+1
        ref = blocks[2 * i + 1].state_dict()
        assert all(torch.equal(t, ref[n]) for n, t in layer.block.state_dict().items())
    g = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for p in model.sidenet.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
        gate = model.sidenet.layers[model.config.sidenet_memory_layer].gate
        gate.copy_(2 * torch.randn(gate.shape, generator=g))
    assert (gate.abs() > 0.5).sum() >= 2  # sigmoid(g) far from 1/2: the gate's direction matters
    return model.eval()


def rand_segment(B=2, T=16, seed=0):
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def padded_labels(x, mask):
    """Targets = the inputs; -100 where the token or its predecessor is padding (nothing to predict from)."""
    if mask is None:
        return x.clone()
    prev_real = torch.cat([torch.ones_like(mask[:, :1]), mask[:, :-1]], dim=1)
    return x.masked_fill((mask == 0) | (prev_real == 0), -100)


def check_segment(family, model, memory, ref_mem, x, mask=None):
    labels = padded_labels(x, mask)
    with torch.no_grad():
        out = model(x, memory=memory, attention_mask=mask, labels=labels)
    ref = reference_forward(family, model, ref_mem, x, mask)
    real = torch.ones_like(x, dtype=torch.bool) if mask is None else mask.bool()
    torch.testing.assert_close(out.logits[real], ref[real], **TOL)
    assert abs(float(out.loss) - reference_loss(ref, labels)) < 1e-5
    assert memory.sizes.tolist() == [ref_mem.retrievable(b) for b in range(x.shape[0])]
    for b in range(x.shape[0]):  # the bank holds exactly the reference's retained tokens, oldest first
        keys, values = memory.tokens(b)  # (Hkv, N, D)
        kept = [tok for c in ref_mem.chunks(b) for tok in c]
        if kept:
            torch.testing.assert_close(keys, torch.stack([k for k, _ in kept], 1), **TOL)
            torch.testing.assert_close(values, torch.stack([v for _, v in kept], 1), **TOL)
    return out, ref


# ---------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------
def test_consecutive_segments_match_reference(family):
    """Six segments, uneven rows (padding, a reset, a row with fewer chunks than top-k), FIFO eviction."""
    model = perturbed_model(family)
    cap = 32  # 16 chunks of 2: every row overflows within three segments
    memory, ref_mem = model.new_memory(2, memory_size=cap), RefMemory(2, cap, model.config.chunk_size)
    full = torch.ones(2, 16, dtype=torch.long)
    right = full.clone()
    right[1, 11:] = 0                       # row 1: 11 real tokens (one waits in the pending buffer)
    left = full.clone()
    left[1, :3] = 0                         # row 1: left padding, 13 real tokens
    short = full.clone()
    short[0, 5:] = 0                        # row 0: 5 real tokens -> 2 chunks, fewer than top-k (4)
    plan = [(full, None), (right, None), (left, None), (short, 0), (full, None), (right, None)]
    empty_memory_seen = overflow_seen = clipped_seen = False
    for i, (mask, reset) in enumerate(plan):
        if reset is not None:               # row `reset` starts a new document
            memory.reset(rows=[reset])
            ref_mem.reset(reset)
        chunks = [len(ref_mem.chunks(b)) for b in range(2)]
        empty_memory_seen |= i > 0 and min(chunks) == 0 < max(chunks)
        clipped_seen |= 0 < min(chunks) < model.config.topk_chunks
        overflow_seen |= max(len(t) for t in ref_mem.tokens) > cap
        x = rand_segment(seed=10 + i)
        out, ref = check_segment(family, model, memory, ref_mem, x, None if bool(mask.all()) else mask)
        if i > 0:
            assert out.retrieval is not None
    assert empty_memory_seen and clipped_seen and overflow_seen
    assert [len(t) for t in ref_mem.tokens] == [5 + 16 + 16, 16 + 11 + 13 + 16 + 16 + 11]


def test_memory_matters_in_reference_comparison(family):
    """The checks above are not vacuous: the memory branch moves the logits far beyond the tolerance."""
    model = perturbed_model(family, seed=1)
    memory, ref_mem = model.new_memory(2), RefMemory(2, model.config.memory_size, model.config.chunk_size)
    for i in range(3):
        check_segment(family, model, memory, ref_mem, rand_segment(seed=20 + i))
    x = rand_segment(seed=30)
    with torch.no_grad():
        with_memory = model(x, memory=memory, update_memory=False).logits
        without = model(x).logits
    assert (with_memory - without).abs().amax(-1).min() > 1e-3  # every token's logits move


def test_empty_row_next_to_full_row_matches_reference(family):
    model = perturbed_model(family, seed=2)
    memory, ref_mem = model.new_memory(2), RefMemory(2, model.config.memory_size, model.config.chunk_size)
    for i in range(2):
        check_segment(family, model, memory, ref_mem, rand_segment(seed=40 + i))
    memory.reset(rows=[1])
    ref_mem.reset(1)
    out, _ = check_segment(family, model, memory, ref_mem, rand_segment(seed=42))
    with torch.no_grad():
        local = model(rand_segment(seed=42)[1:]).logits[0]
    torch.testing.assert_close(out.logits[1], local, **TOL)  # the empty row is plain local attention


def test_rope_memory_branch_sees_no_positions():
    """A constant segment makes a RoPE model's local attention position-free; so is the memory branch.

    With identical tokens, every backbone hidden state and every local attention output is the
    same at every position (attention over identical values), so the logits of all positions must
    be equal. Searching or reading the memory with rotary-positioned queries breaks this (each
    position rotates q differently), and it is checked before any reference comparison.
    """
    model = perturbed_model("llama", seed=3)
    memory = model.new_memory(2)
    ref_mem = RefMemory(2, model.config.memory_size, model.config.chunk_size)
    with torch.no_grad():
        for i in range(3):  # fill both memories; the reference comparison comes last
            x = rand_segment(seed=50 + i)
            model(x, memory=memory)
            reference_forward("llama", model, ref_mem, x)
    x = torch.tensor([[5] * 16, [17] * 16])
    with torch.no_grad():
        out = model(x, memory=memory, update_memory=False).logits
        local = model(x).logits
    torch.testing.assert_close(local, local[:, :1].expand_as(local), **TOL)  # the premise
    assert (out - local).abs().amax() > 1e-3                                    # memory contributes
    torch.testing.assert_close(out, out[:, :1].expand_as(out), **TOL)          # and is position-free
    # with 5 left pads the real tokens sit at other columns and see less context: nothing may change
    mask = torch.ones_like(x)
    mask[:, :5] = 0
    with torch.no_grad():
        shifted = model(x, memory=memory, attention_mask=mask, update_memory=False).logits
    torch.testing.assert_close(shifted[:, 5:], out[:, :11], **TOL)
    ref = reference_forward("llama", model, ref_mem, x, write=False)
    torch.testing.assert_close(out, ref, **TOL)


@pytest.mark.parametrize("pad", ["right", "left"])
def test_padded_segment_matches_reference(family, pad):
    """Padding: never written, never attended; real tokens match the reference."""
    model = perturbed_model(family, seed=4)
    memory, ref_mem = model.new_memory(2), RefMemory(2, model.config.memory_size, model.config.chunk_size)
    mask = torch.ones(2, 16, dtype=torch.long)
    if pad == "right":
        mask[0, 9:] = 0
    else:
        mask[0, :7] = 0
    for i in range(3):
        check_segment(family, model, memory, ref_mem, rand_segment(seed=60 + i), mask)
    assert memory.sizes.tolist() == [26, 48]  # 27 real tokens: 13 chunks + 1 pending; 48 = 24 chunks
