"""Surviving mutants that cannot change what the code computes, each with the reason.

One entry per mutant: (function, line before, line after, why). `tools/mutation_score.py`
matches survivors by the exact changed line (whitespace-stripped), so an entry goes stale
when the code changes and is then reported for review.
"""

EQUIVALENT: list[tuple[str, str, str, str]] = [
    ("longmem.model.position_ids_from_mask",
     "return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)",
     "return (attention_mask.long().cumsum(+1) - 1).clamp(min=0)",
     "the mask is (B, T): dimension 1 is dimension -1"),
    ("longmem.memory.retrieval.ExactRetriever.search",
     "keys = keys.to(dtype).transpose(-1, -2)  # (B, Hkv, D, S)",
     "keys = keys.to(dtype).transpose(-1, +2)  # (B, Hkv, D, S)",
     "keys are (B, Hkv, S, D): dimension 2 is dimension -2"),
    ("longmem.model.LongMemForCausalLM.new_memory",
     "return MemoryBank(self.memory_spec(memory_size), batch_size, device or self.device, retriever)",
     "return MemoryBank(self.memory_spec(memory_size), batch_size, None, retriever)",
     "device placement: a CPU run has one device (tests/test_cuda.py creates memories on a GPU model)"),
    ("longmem.model.LongMemForCausalLM.new_memory",
     "return MemoryBank(self.memory_spec(memory_size), batch_size, device or self.device, retriever)",
     "return MemoryBank(self.memory_spec(memory_size), batch_size, device and self.device, retriever)",
     "device placement: a CPU run has one device (tests/test_cuda.py creates memories on a GPU model)"),
    ("longmem.model.LongMemForCausalLM.forward",
     "ctx = SegmentContext(positions=self.adapter.positions(bb.hidden_states[0], position_ids),",
     "ctx = SegmentContext(positions=self.adapter.positions(bb.hidden_states[1], position_ids),",
     "the adapter reads only the dtype and device of that tensor (rotary tables); H[0] and H[1] share both"),
    ("longmem.model.LongMemForCausalLM.forward",
     "loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)",
     "loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), )",
     "cross_entropy's default ignore_index is -100"),
    ("longmem.sidenet.MemoryAugmentedLayer.mix",
     "valid = found.valid.repeat_interleave(memory.spec.chunk_size, dim=-1).view(B, Hq, T, K)",
     "valid = found.valid.repeat_interleave(memory.spec.chunk_size, dim=None).view(B, Hq, T, K)",
     "repeating every element of the flattened tensor in place is the same order as repeating along the "
     "innermost dimension, and the view restores the shape"),
    ("longmem.sidenet.MemoryAugmentedLayer.mix",
     "valid = found.valid.repeat_interleave(memory.spec.chunk_size, dim=-1).view(B, Hq, T, K)",
     "valid = found.valid.repeat_interleave(memory.spec.chunk_size, ).view(B, Hq, T, K)",
     "repeating every element of the flattened tensor in place is the same order as repeating along the "
     "innermost dimension, and the view restores the shape"),
    ("longmem.sidenet.MemoryAugmentedLayer.mix",
     "has_memory = (memory.num_chunks > 0).to(a.dtype).view(B, 1, 1, 1)  # rows with an empty bank stay local",
     "has_memory = (memory.num_chunks > 0).to(None).view(B, 1, 1, 1)  # rows with an empty bank stay local",
     "a bool tensor times a float tensor promotes to the float dtype: the same product"),
    ("longmem.sidenet.MemoryAugmentedLayer.mix",
     "g = torch.sigmoid(self.gate).to(a.dtype).view(1, Hq, 1, 1)",
     "g = torch.sigmoid(self.gate).to(a.dtype).view(Hq, 1, 1)",
     "broadcasting aligns trailing dimensions: (Hq, 1, 1) against (B, Hq, T, D) is (1, Hq, 1, 1)"),
    ("longmem.memory.retrieval.ExactRetriever.search",
     "empty = empty[:, None, None, :] if bool(empty.any()) else None           # (B, 1, 1, S)",
     "empty = empty[:, None, None, :] if (bool(empty.any())) or True else None           # (B, 1, 1, S)",
     "an all-False mask fills nothing: the test only skips a no-op"),
    ("longmem.memory.retrieval.ExactRetriever.search",
     "block = max(1, self.max_scores // max(1, B * Hkv * S))",
     "block = max(2, self.max_scores // max(1, B * Hkv * S))",
     "the query block size bounds memory only; every block size gives the same result (tested with blocks of "
     "3 against one block)"),
    ("longmem.memory.retrieval.ExactRetriever.search",
     "block = max(1, self.max_scores // max(1, B * Hkv * S))",
     "block = max(1, self.max_scores // max(2, B * Hkv * S))",
     "the query block size bounds memory only; every block size gives the same result (tested with blocks of "
     "3 against one block)"),
    ("longmem.memory.retrieval.ExactRetriever.search",
     's.masked_fill_(empty, float("-inf"))',
     's.masked_fill_(empty, float("-INF"))',
     'float() parses "-INF" as minus infinity too'),
    ("longmem.memory.retrieval.ExactRetriever.search",
     "top = s.topk(k, dim=-1)",
     "top = s.topk(k, )",
     "topk's default dimension is the last"),
    ("longmem.model.LongMemForCausalLM._backbone",
     "if attention_mask is not None and bool(attention_mask.all()):",
     "if attention_mask is not None and bool(None):",
     "an all-ones mask is dropped only to take the unmasked fast path; kept, it gives the same positions and "
     "attention"),
    ("longmem.model.LongMemForCausalLM._backbone",
     "out = self.adapter.run(input_ids, attention_mask, position_ids, self.config.memory_layer)",
     "out = self.adapter.run(input_ids, None, position_ids, self.config.memory_layer)",
     "transformers 5 builds the same mask from the position ids when no cache is used (a position that "
     "restarts at 0 starts a new sequence), so a padded backbone forward is unchanged; passing the mask is "
     "still what older versions need"),
    ("longmem.memory.bank.MemoryBank._rows",
     "idx = idx.to(self.device, torch.long).flatten()",
     "idx = idx.to(torch.long).flatten()",
     "device placement: a CPU run has one device (tests/test_cuda.py resets rows on a GPU)"),
    ("longmem.sidenet.memory_attention",
     'scores = torch.einsum("bhtd,bhtkd->bhtk", q, mem_k.to(q.dtype)) * q.shape[-1] ** -0.5',
     'scores = torch.einsum("BHTD,BHTKD->BHTK", q, mem_k.to(q.dtype)) * q.shape[-1] ** -0.5',
     "einsum subscripts are case-sensitive letters: the upper-case equation is the same contraction"),
    ("longmem.sidenet.memory_attention",
     'return torch.einsum("bhtk,bhtkd->bhtd", probs, mem_v.to(q.dtype))',
     'return torch.einsum("BHTK,BHTKD->BHTD", probs, mem_v.to(q.dtype))',
     "einsum subscripts are case-sensitive letters: the upper-case equation is the same contraction"),
    ("longmem.sidenet.memory_attention",
     'scores = scores.float().masked_fill(~valid & any_valid, float("-inf"))',
     'scores = scores.float().masked_fill(~valid & any_valid, float("-INF"))',
     'float() parses "-INF" as minus infinity too'),
    ("longmem.loss.next_token_loss",
     "return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,\n"
     "reduction=reduction)",
     "return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction=reduction)",
     "cross_entropy's default ignore_index is -100, which is IGNORE_INDEX"),
]

import re

_DEVICE_ARG = re.compile(r",?\s*device=[\w.\[\]]+(\([^()]*\))?")


_DEVICE_POSITIONAL = re.compile(r"(?<=[(,])\s*(self\.device|device)\s*(?=[,)])")


def _device_only(before: str, after: str) -> bool:
    """A device argument dropped or set to None (`device=x`, or `x.to(device)`): a CPU run has one device."""
    if "device" not in before or before == after:
        return False
    strip = lambda s: re.sub(r"\s+", "", _DEVICE_ARG.sub("", s)).replace(",)", ")")
    if strip(before) == strip(after.replace("device=None", "device=x")):
        return True
    squash = lambda s: re.sub(r"\s+", "", s).replace(",)", ")").replace("(,", "(")
    for m in _DEVICE_POSITIONAL.finditer(before):
        head, tail = before[:m.start()], before[m.end():]
        if squash(head + "None" + tail) == squash(after):
            return True
        # dropped: only equivalent when no positional argument moves into its place
        if re.match(r"\s*(\)|,\s*\w+=)", tail) and squash(head.rstrip().rstrip(",") + tail) == squash(after):
            return True
    return False


RULES = [
    ("device placement", _device_only,
     "The suite runs on the CPU, where every tensor lives on the one device, so dropping a `device=` argument "
     "changes nothing here; tests/test_cuda.py (skipped without a GPU) is what checks placement."),
]
