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
    ("longmem.training.step.next_token_loss",
     "return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,\n"
     "reduction=reduction)",
     "return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction=reduction)",
     "cross_entropy's default ignore_index is -100, which is IGNORE_INDEX"),
    ("longmem.training.step.train_step",
     "with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):",
     "with torch.autocast(device.type, dtype=None, enabled=bf16):",
     "CPU autocast defaults to bfloat16 (CUDA's default, float16, is not run here)"),
    ("longmem.training.step.train_step",
     "with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):",
     "with torch.autocast(device.type, enabled=bf16):",
     "CPU autocast defaults to bfloat16 (CUDA's default, float16, is not run here)"),
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
