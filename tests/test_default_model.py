"""The model shipped in the repository: loads by name, fits the size budget, and memory changes its predictions."""

from pathlib import Path

import torch
from transformers import AutoTokenizer

from longmem import LongMemForCausalLM
from longmem.checkpoint import DEFAULT_MODEL, backbone_source


def test_default_model_loads_and_uses_memory():
    size = sum(f.stat().st_size for f in Path(DEFAULT_MODEL).rglob("*") if f.is_file())
    assert size <= 40 * 2**20
    model = LongMemForCausalLM.from_pretrained("default").eval()
    assert model.adapter.config.model_type == "llama" and model.config.segment_length == 512
    assert next(model.backbone.parameters()).dtype == torch.bfloat16
    tok = AutoTokenizer.from_pretrained(backbone_source("default"))
    text = Path(__file__).read_text() * 4
    ids = torch.tensor([tok(text)["input_ids"][:1024]])
    memory = model.new_memory(1)
    with torch.no_grad():
        model.memorize(ids[:, :512], memory)
        assert len(memory) == 512
        with_memory = model(ids[:, 512:], memory=memory)
        without = model(ids[:, 512:])
    assert len(memory) == 1024 and with_memory.retrieval is not None
    assert torch.isfinite(with_memory.logits).all()
    assert not torch.allclose(with_memory.logits, without.logits)
    # the text repeats: with the first half in memory the model predicts the second half better
    def nll(out):
        return torch.nn.functional.cross_entropy(out.logits[0, :-1].float(), ids[0, 513:]).item()
    assert nll(with_memory) < nll(without)
