"""Tiny random backbones of both supported families (GPT-2; Llama with grouped-query attention)."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.utils import logging

logging.set_verbosity_error()
torch.set_num_threads(1)  # tiny models: one thread is fastest and keeps the suite quick on a busy machine

VOCAB = 97


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads; whatever a test (or the CLI it runs) sets is undone after it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_backbone(family: str, seed: int = 0, layers: int = 4):
    torch.manual_seed(seed)
    if family == "gpt2":
        cfg = GPT2Config(n_layer=layers, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=128,
                         bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return GPT2LMHeadModel(cfg).eval()
    cfg = LlamaConfig(num_hidden_layers=layers, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=128, bos_token_id=0,
                      eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(params=["gpt2", "llama"])
def family(request):
    return request.param


def small_config(**kw):
    from longmem import LongMemConfig
    base = dict(memory_size=64, chunk_size=2, topk_tokens=8, segment_length=16, memory_dtype="float32")
    base.update(kw)
    return LongMemConfig(**base)


@pytest.fixture
def model(family):
    from longmem import LongMemForCausalLM
    return LongMemForCausalLM.from_backbone(tiny_backbone(family), small_config())


# ---- a tiny saved checkpoint and documents, for the evaluation tasks ----
DOCS = (("a", 1), ("b", 2), ("c", 1))  # name, repeats of TEXT (122 tokens)
TEXT = ("The old house stood at the end of the lane. Its windows were dark and its garden was full of weeds. "
        "Every morning a cat walked along the wall and looked at the door. ")


@pytest.fixture(scope="module")
def tok():
    from test_training_utils import make_tokenizer

    return make_tokenizer()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tok):
    """A tiny random LongMem checkpoint (Llama backbone, 32-token segments, 64-token memory) with its tokenizer."""
    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=4, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64, vocab_size=len(tok), max_position_embeddings=128)
    from longmem import LongMemForCausalLM

    model = LongMemForCausalLM.from_backbone(LlamaForCausalLM(cfg).eval(), small_config(segment_length=32))
    path = tmp_path_factory.mktemp("ckpt") / "model"
    model.save_pretrained(path, tokenizer=tok)
    return str(path)


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    root = tmp_path_factory.mktemp("docs")
    for name, n in DOCS:
        (root / f"{name}.txt").write_text(TEXT * n)
    return str(root)
