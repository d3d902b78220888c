"""Adapters and SideNet layers against the real HuggingFace modules."""

import pytest
import torch
from transformers import AttentionInterface, OPTConfig, OPTForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from conftest import VOCAB, small_config, tiny_backbone
from longmem import LongMemConfig, LongMemError, LongMemForCausalLM
from longmem.sidenet import SegmentContext

CAPTURED = {}


def capturing_attention(module, query, key, value, attention_mask, **kw):
    """HF attention function that records the key/value states the backbone really attends with."""
    CAPTURED[module.layer_idx] = (key.detach().clone(), value.detach().clone())
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kw)


AttentionInterface.register("longmem_capture", capturing_attention)


def test_sidenet_copies_odd_blocks(model):
    blocks = model.adapter.blocks
    for i, layer in enumerate(model.sidenet.layers):
        ref = blocks[2 * i + 1].state_dict()
        got = layer.block.state_dict()
        assert ref.keys() == got.keys()
        for k in ref:
            assert torch.equal(ref[k], got[k]), (i, k)
    assert torch.equal(model.sidenet.norm.weight, model.adapter.final_norm.weight)
    assert model.config.sidenet_layers == 2 and model.config.memory_layer == 2 and model.config.sidenet_memory_layer == 1


def test_memory_kv_equal_backbone_attention(family):
    backbone = tiny_backbone(family)
    model = LongMemForCausalLM.from_backbone(backbone, small_config())
    x = torch.randint(0, VOCAB, (2, 12))
    bb = model.adapter.run(x, None, torch.arange(12).expand(2, 12), model.config.memory_layer)
    backbone.config._attn_implementation = "longmem_capture"
    CAPTURED.clear()
    with torch.no_grad():
        backbone(x)
    k_ref, v_ref = CAPTURED[model.config.memory_layer]  # (B, Hkv, T, D) as attended (post-rotary for Llama)
    k = bb.memory_keys.transpose(1, 2)                    # (B, Hkv, T, D) pre-rotary
    if family == "llama":
        cos, sin = backbone.model.rotary_emb(k, torch.arange(12).expand(2, 12))
        k, _ = apply_rotary_pos_emb(k, k, cos, sin)
        assert not torch.allclose(bb.memory_keys.transpose(1, 2), k_ref, atol=1e-3)  # stored keys are pre-rotary
        assert bb.memory_keys.shape[2] == 2  # stored per key/value head (GQA)
    torch.testing.assert_close(k, k_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bb.memory_values.transpose(1, 2), v_ref, rtol=1e-5, atol=1e-5)


def _hf_block(family, model, block, x, pos):
    if family == "llama":
        cos_sin = model.backbone.model.rotary_emb(x, pos)
        return block(x, position_embeddings=cos_sin, position_ids=pos)
    return block(x)


@pytest.mark.parametrize("layer_index", [0, 1])  # layer 1 is the memory-augmented layer
def test_sidenet_layer_equals_hf_block_without_memory(family, layer_index):
    model = LongMemForCausalLM.from_backbone(tiny_backbone(family), small_config())
    layer = model.sidenet.layers[layer_index]
    x = torch.randn(2, 10, 32)
    pos = torch.arange(10).expand(2, 10)
    empty = model.new_memory(2)
    ctx = SegmentContext(model.adapter.positions(x, pos), None, empty)
    with torch.no_grad():
        ours, retrieval = layer(x, ctx)
        ref = _hf_block(family, model, layer.block, x, pos)
    assert retrieval is None
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_unsupported_architecture_is_named():
    opt = OPTForCausalLM(OPTConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=2, ffn_dim=32,
                                   vocab_size=50, word_embed_proj_dim=16))
    with pytest.raises(LongMemError, match=r"'opt' is not supported; supported: gpt2, llama, mistral, qwen2"):
        LongMemForCausalLM.from_backbone(opt, LongMemConfig())


def test_memory_layer_outside_backbone():
    with pytest.raises(LongMemError, match="memory_layer=9 is outside the backbone's 4 layers"):
        LongMemForCausalLM.from_backbone(tiny_backbone("gpt2"), LongMemConfig(memory_layer=9))


def test_default_config_scales_reference():
    cfg = LongMemConfig().resolve(24)
    assert (cfg.memory_layer, cfg.sidenet_layers, cfg.sidenet_memory_layer, cfg.topk_chunks) == (17, 12, 8, 16)


def test_object_without_a_config_is_not_a_backbone():
    with pytest.raises(LongMemError, match=r"^backbone architecture None is not supported; supported: gpt2, llama, "
                                           r"mistral, qwen2$"):
        LongMemForCausalLM.from_backbone(torch.nn.Linear(2, 2), LongMemConfig())


@pytest.mark.parametrize("variant", [dict(scale_attn_weights=False), dict(scale_attn_by_inverse_layer_idx=True),
                                     dict(add_cross_attention=True)])
def test_unsupported_gpt2_variants_are_refused(variant):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=32, **variant)
    with pytest.raises(LongMemError, match=r"^this GPT-2 variant \(unscaled, layer-scaled or cross attention\) is not "
                                           r"supported; use a standard GPT-2 configuration$"):
        LongMemForCausalLM.from_backbone(GPT2LMHeadModel(cfg), LongMemConfig())


def test_fingerprint_is_the_documented_hash():
    """Checkpoints and memories store this hash, so it must not drift: recompute it independently."""
    import hashlib

    from longmem.backbone import adapter_for
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=300, n_positions=32))
    h = hashlib.sha256(b"gpt2")
    for name, p in sorted(model.state_dict().items()):  # wte has 4,800 values: the sample is its first 4,096
        values = p.detach().reshape(-1).float()
        step = max(1, values.numel() // 4096)
        sample = torch.stack([values[i] for i in range(0, values.numel(), step)][:4096])
        h.update(name.encode() + str(tuple(p.shape)).encode() + sample.numpy().tobytes())
    assert adapter_for(model).fingerprint() == h.hexdigest()[:16]
