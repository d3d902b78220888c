"""`LongMemForCausalLM`: a frozen HuggingFace causal LM + a trainable SideNet + a passed-in memory.

One `forward` processes one segment: the frozen backbone runs once (no grad) and yields the
hidden states H[0..L] and the memory layer's keys/values; the SideNet retrieves from the
memory *before* this segment's keys/values are written into it (a segment never retrieves
itself), and predicts through the backbone's frozen LM head.

Shapes: B batch, T tokens in the segment, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from longmem.backbone import BackboneOutput, adapter_for
from longmem.config import LongMemConfig
from longmem.errors import LongMemError
from longmem.loss import next_token_loss, shift_labels
from longmem.memory import MemoryBank, MemorySpec, Retrieval, Retriever, held_span
from longmem.runtime import cast_unless_autocast
from longmem.retrieval_loss import RetrievalSupervision
from longmem.sidenet import SegmentContext, SideNet

if TYPE_CHECKING:
    from longmem.generation import GenerationOptions


@dataclass
class LongMemOutput(ModelOutput):
    loss: torch.Tensor | None = None
    """Mean next-token cross-entropy if labels were given: labels unshifted, shifted inside, -100 ignored, as in
    HuggingFace (`longmem.loss`, the function training uses too)."""
    logits: torch.Tensor | None = None
    """(B, T, V) next-token logits."""
    retrieval: Retrieval | None = None
    """What the memory-augmented layer retrieved (None when the memory was empty or absent)."""


@dataclass
class BackbonePass:
    """The frozen backbone's run on one segment (`LongMemForCausalLM.backbone_forward`), which several forwards of
    the same input reuse: with and without a memory, with memories of different sizes, and the backbone's own
    logits (`backbone_logits`). Read-only: forward never modifies it."""
    input_ids: torch.Tensor
    """(B, T) the segment it was run on."""
    output: BackboneOutput
    """H[0..L] (L+1 tensors (B, T, d)) and the memory layer's keys and values (B, T, Hkv, D)."""
    attention_mask: torch.Tensor | None
    """(B, T) 0/1 as given, or None when the input has no padding (an all-ones mask is dropped)."""
    position_ids: torch.Tensor
    """(B, T) each token's position, counting real tokens only."""


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) 0/1 mask -> (B, T) positions counting only real tokens (left padding starts at 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def causal_padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) 0/1 mask -> (B, 1, T, T) bool: causal, no padded keys (a pad query sees itself only)."""
    T = attention_mask.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=attention_mask.device).tril()
    allowed = causal & attention_mask.bool()[:, None, None, :]
    return allowed | torch.eye(T, dtype=torch.bool, device=attention_mask.device)


class LongMemForCausalLM(nn.Module):
    def __init__(self, backbone: nn.Module, config: LongMemConfig, tokenizer=None):
        super().__init__()
        self.adapter = adapter_for(backbone)
        self.config = config.resolve(self.adapter.num_layers)
        self.backbone = backbone
        backbone.requires_grad_(False).eval()
        c = self.config
        self.sidenet = SideNet(self.adapter, c.sidenet_layers, c.sidenet_memory_layer, c.topk_chunks)
        self.backbone_fingerprint = self.adapter.fingerprint()
        self.tokenizer = tokenizer  # the backbone's tokenizer, when known: saved with the model, used to stream text
        self.generation_config = generation_defaults(backbone)  # what generate uses unless told otherwise

    @classmethod
    def from_backbone(cls, backbone: nn.Module, config: LongMemConfig | None = None,
                      tokenizer=None) -> "LongMemForCausalLM":
        """Build a LongMem model around `backbone` (frozen in place; the SideNet copies its blocks). The backbone's
        tokenizer, if given, becomes `model.tokenizer`: save_pretrained writes it and generation can stream text."""
        return cls(backbone, config or LongMemConfig(), tokenizer)

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # the frozen backbone never uses dropout: cached memories stay consistent
        return self

    @property
    def device(self) -> torch.device:
        return next(self.sidenet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The SideNet's parameter dtype, like HF's `model.dtype`."""
        return next(self.sidenet.parameters()).dtype

    def num_parameters(self, only_trainable: bool = False) -> int:
        """Backbone + SideNet parameters, a tied tensor once (HF's `num_parameters`); only_trainable: the SideNet's."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not only_trainable)

    # ---- memory -----------------------------------------------------------------------
    def memory_spec(self, memory_size: int | None = None) -> MemorySpec:
        c, a = self.config, self.adapter
        return MemorySpec(num_kv_heads=a.num_kv_heads, head_dim=a.head_dim, chunk_size=c.chunk_size,
                          capacity=c.memory_size if memory_size is None else memory_size, dtype=c.memory_dtype,
                          fingerprint=f"{self.backbone_fingerprint}:layer{c.memory_layer}")

    def new_memory(self, batch_size: int, memory_size: int | None = None, retriever: Retriever | str | None = None,
                   device: torch.device | str | None = None, offload: bool = False,
                   pin_memory: bool | None = None) -> MemoryBank:
        """An empty memory with one bank per row (capacity `memory_size` tokens, default from the config; retriever:
        a backend name or index, default `config.retriever`). offload: keep it in CPU memory while the model runs
        elsewhere (a GPU): searched on the CPU, only the retrieved chunks move to the model; pin_memory (default:
        when the model is on CUDA) keeps it page-locked so those moves do not block."""
        spec, retriever = self.memory_spec(memory_size), retriever or self.config.retriever
        if not offload:
            if pin_memory:
                raise LongMemError("pin_memory=True is for an offloaded memory: pass offload=True too")
            return MemoryBank(spec, batch_size, device or self.device, retriever)
        if device is not None and torch.device(device).type != "cpu":
            raise LongMemError(f"an offloaded memory lives in CPU memory, not on {device}; drop device= or offload")
        pin = self.device.type == "cuda" if pin_memory is None else pin_memory
        return MemoryBank(spec, batch_size, "cpu", retriever, compute_device=self.device, pin_memory=pin)

    def load_memory(self, path: str | Path, retriever: Retriever | str | None = None, offload: bool = False,
                    pin_memory: bool | None = None) -> MemoryBank:
        """`MemoryBank.load` checked against this model, searched by `retriever` (default `config.retriever`);
        offload, pin_memory: as for `new_memory`."""
        retriever = retriever or self.config.retriever
        if not offload:
            if pin_memory:
                raise LongMemError("pin_memory=True is for an offloaded memory: pass offload=True too")
            return MemoryBank.load(path, self.device, expect=self.memory_spec(), retriever=retriever)
        pin = self.device.type == "cuda" if pin_memory is None else pin_memory
        return MemoryBank.load(path, "cpu", expect=self.memory_spec(), retriever=retriever,
                               compute_device=self.device, pin_memory=pin)

    def _check_memory(self, memory: MemoryBank, batch_size: int) -> None:
        self.memory_spec().check_compatible(memory.spec)
        if memory.batch_size != batch_size:
            raise LongMemError(f"the memory has {memory.batch_size} rows but the input has {batch_size}; "
                               f"create it with model.new_memory(batch_size={batch_size})")
        if memory.compute_device != self.device:  # an offloaded memory may live elsewhere, if it serves this device
            where = f"offloaded to {memory.device} for {memory.compute_device}" if memory.offload_to is not None \
                else f"on {memory.device}"
            raise LongMemError(f"the memory is {where} but the model on {self.device}; move it with "
                               f"memory.to(model.device), or keep it in CPU memory with memory.offload(model.device)")

    # ---- forward ----------------------------------------------------------------------
    def _backbone(self, input_ids, attention_mask):
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None
        B, T = input_ids.shape
        if attention_mask is None:
            position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        else:
            position_ids = position_ids_from_mask(attention_mask)
        out = self.adapter.run(input_ids, attention_mask, position_ids, self.config.memory_layer)
        return out, attention_mask, position_ids

    def backbone_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> BackbonePass:
        """Run the frozen backbone (no grad) on one segment, input_ids (B, T) with T <= segment_length, attention_mask
        (B, T) 0/1 or None. Pass the result to `forward(..., backbone_output=)` (any number of times, e.g. once per
        memory) and to `backbone_logits`: each then skips the backbone, with the same numbers as without it."""
        self._check_segment(input_ids)
        return BackbonePass(input_ids, *self._backbone(input_ids, attention_mask))

    def backbone_logits(self, backbone_output: BackbonePass) -> torch.Tensor:
        """(B, T, V) the frozen backbone's own next-token logits: its LM head on the final-normed H[L] (the same
        numbers as `model.backbone(input_ids).logits`; right padding never changes a real token's)."""
        return self.adapter.lm_head(backbone_output.output.hidden_states[-1])

    def _check_segment(self, input_ids: torch.Tensor) -> None:
        if input_ids.shape[1] > self.config.segment_length:
            raise LongMemError(f"a segment of {input_ids.shape[1]} tokens is longer than segment_length="
                               f"{self.config.segment_length}; split the input (memorize does it for long inputs)")

    def _check_reused(self, bb: BackbonePass, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        """Raise unless `bb` is the backbone pass of this input (and of this mask, when one is given)."""
        same = bb.input_ids.shape == input_ids.shape and torch.equal(bb.input_ids, input_ids.to(bb.input_ids.device))
        if same and attention_mask is not None:
            mask = None if bool(attention_mask.all()) else attention_mask
            same = (mask is None) == (bb.attention_mask is None) and (
                mask is None or torch.equal(mask.to(bb.attention_mask), bb.attention_mask))
        if not same:
            raise LongMemError("backbone_output was computed on other input_ids or another attention_mask; pass "
                               "the output of model.backbone_forward on this same input")

    def forward(self, input_ids: torch.Tensor, memory: MemoryBank | None = None,
                attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                update_memory: bool = True, backbone_output: BackbonePass | None = None,
                retrieval_supervision: RetrievalSupervision | None = None) -> LongMemOutput:
        """One segment: input_ids (B, T) with T <= segment_length; retrieve, then write into `memory`.

        backbone_output: `backbone_forward(input_ids, attention_mask)` computed earlier, to skip the backbone here
        (attention_mask may then be omitted; if given it must be the same). The logits, the retrieval and what is
        written into `memory` are exactly those of a forward without it.
        retrieval_supervision: training's auxiliary retrieval loss (`longmem.retrieval_loss`): the memory layer
        searches its `candidates` and sets its `loss`; the logits are those of a forward without it."""
        B, T = input_ids.shape
        self._check_segment(input_ids)
        if memory is not None:
            self._check_memory(memory, B)
        if backbone_output is None:
            backbone_output = BackbonePass(input_ids, *self._backbone(input_ids, attention_mask))
        else:
            self._check_reused(backbone_output, input_ids, attention_mask)
        bb, attention_mask = backbone_output.output, backbone_output.attention_mask
        position_ids = backbone_output.position_ids
        ctx = SegmentContext(positions=self.adapter.positions(bb.hidden_states[0], position_ids),
                             attn_mask=None if attention_mask is None else causal_padding_mask(attention_mask),
                             memory=memory, supervision=retrieval_supervision)
        hidden, retrieval = self.sidenet(bb.hidden_states, ctx)  # (B, T, d)
        head = self.adapter.lm_head
        logits = head(cast_unless_autocast(hidden, head.weight.dtype))
        if memory is not None and update_memory:
            memory.write(bb.memory_keys, bb.memory_values, attention_mask, token_ids=input_ids)
        loss = None
        if labels is not None:
            loss = next_token_loss(logits, shift_labels(labels))
        return LongMemOutput(loss=loss, logits=logits, retrieval=retrieval)

    @torch.no_grad()
    def memorize(self, input_ids: torch.Tensor, memory: MemoryBank, attention_mask: torch.Tensor | None = None,
                 show_progress: bool = False) -> MemoryBank:
        """Stream a long input (B, N) into `memory`, one segment at a time through the backbone only.

        Segments are independent backbone runs, so leading segments whose tokens the memory would evict anyway
        (every row's tokens older than what `held_span` keeps at the end) are not run: the bank only counts them
        (`MemoryBank.advance`). The result is the same as reading everything, and a long input costs about what
        its last `capacity` tokens cost."""
        B, N = input_ids.shape
        self._check_memory(memory, B)
        seg, C, capacity = self.config.segment_length, memory.spec.chunk_size, memory.spec.capacity
        K = -(-N // seg)  # segments
        real = torch.ones(B, N, dtype=torch.long, device=memory.device) if attention_mask is None \
            else attention_mask.to(memory.device, torch.long)
        counts = F.pad(real, (0, K * seg - N)).view(B, K, seg).sum(-1)  # (B, K) real tokens per segment
        ends = memory.written[:, None] + counts.cumsum(1)  # (B, K) stream position after each segment
        first_held, _ = held_span(ends[:, -1], capacity, C)  # (B,) what each row holds once all is written
        evicted = (counts == 0) | (ends <= first_held[:, None])  # (B, K) nothing of it survives in that row
        skip = int(evicted.all(0).long().cumprod(0).sum())  # leading segments evicted in every row
        if skip:
            memory.advance(counts[:, :skip].sum(1))
        starts = range(skip * seg, N, seg)
        if show_progress:
            from tqdm.auto import tqdm
            starts = tqdm(starts, desc="memorize", unit="seg")
        for s in starts:
            mask = None if attention_mask is None else attention_mask[:, s:s + seg]
            bb, mask, _ = self._backbone(input_ids[:, s:s + seg], mask)
            memory.write(bb.memory_keys, bb.memory_values, mask, token_ids=input_ids[:, s:s + seg])
        return memory

    # ---- generation ---------------------------------------------------------------------
    def split_prompt(self, n: int) -> tuple[int, int]:
        """How `generate` splits a prompt of n tokens: (memorized prefix, local context) lengths. The prefix is
        whole segments; 1..segment_length tokens stay in the local context."""
        if n < 1:
            raise LongMemError(f"a prompt of {n} tokens: generate needs at least one")
        seg = self.config.segment_length
        prefix = (n - 1) // seg * seg
        return prefix, n - prefix

    def _options(self, generation_config, options: dict, prompt_tokens: int) -> "GenerationOptions":
        """generation_config (None: self.generation_config) with `options` applied; max_length -> max_new_tokens."""
        from longmem.generation import GenerationOptions

        base = self.generation_config if generation_config is None else generation_config
        if not isinstance(base, GenerationOptions):
            if not hasattr(base, "to_diff_dict"):
                raise LongMemError(f"generation_config must be a longmem GenerationOptions or a transformers "
                                   f"GenerationConfig, not {type(base).__name__}")
            base = GenerationOptions.from_hf(base)
        options = dict(options)
        max_length = options.pop("max_length", None)
        if max_length is not None:
            if "max_new_tokens" in options:
                raise LongMemError("pass max_new_tokens or max_length, not both (max_length counts the prompt too)")
            if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < prompt_tokens:
                raise LongMemError(f"max_length={max_length!r} is shorter than the prompt ({prompt_tokens} tokens); "
                                   f"it counts the prompt too: give at least {prompt_tokens}, or use max_new_tokens")
            options["max_new_tokens"] = max_length - prompt_tokens
        return base.replace(**options).validate()

    def _steps(self, input_ids, attention_mask, memory, generation_config, streamer, tokenizer, generator,
               incremental, options):
        """The checked options, and an iterator of `longmem.generation.Step`s (streamer fed as HF's generate does)."""
        from longmem.decoding import make_decoder
        from longmem.generation import check_prompt, decode_steps

        check_prompt(input_ids, attention_mask)
        opts = self._options(generation_config, options, input_ids.shape[1])
        if input_ids.device != self.device:
            raise LongMemError(f"input_ids is on {input_ids.device} but the model on {self.device}; move it with "
                               f".to(model.device)")
        if attention_mask is not None:
            attention_mask = attention_mask.to(input_ids.device)
        decoder = make_decoder(self, memory if memory is not None else self.new_memory(input_ids.shape[0]),
                               incremental)
        steps = decode_steps(decoder, input_ids, attention_mask, opts, generator, tokenizer)
        return opts, steps if streamer is None else _streamed(steps, streamer, input_ids)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 memory: MemoryBank | None = None, generation_config=None, *, streamer=None, tokenizer=None,
                 generator: torch.Generator | None = None, incremental: bool = True, **options) -> torch.Tensor:
        """Continue input_ids (B, N) -> (B, N + new), like HF's generate; greedy unless do_sample=True.

        options: any `longmem.generation.GenerationOptions` field (max_new_tokens, do_sample, temperature, top_k,
        top_p, repetition_penalty, eos_token_id, pad_token_id, stop_strings, seed) or max_length (prompt included);
        they override generation_config (a GenerationOptions or a transformers GenerationConfig; default
        `model.generation_config`: the backbone's eos and pad tokens). Rows of different lengths are left-padded
        with an attention_mask; a row that finished gets pad_token_id while others continue. `memory` (one bank
        per row; default: a fresh one) is read and written: the prompt's whole segments before its last tokens are
        memorized first (`split_prompt`), and when the local context outgrows segment_length its older half goes
        into memory. streamer: HF's convention (`put` the prompt, then each step's tokens; `end`), e.g.
        transformers' TextStreamer. tokenizer (default model.tokenizer): needed for stop_strings.
        incremental: the KV-cached decoder (False: recompute the whole local context every step, the reference).
        """
        tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        _, steps = self._steps(input_ids, attention_mask, memory, generation_config, streamer, tokenizer, generator,
                               incremental, options)
        new = [step.tokens for step in steps]
        return torch.cat([input_ids, torch.stack(new, dim=1)], dim=1) if new else input_ids

    def generate_steps(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                       memory: MemoryBank | None = None, generation_config=None, *, tokenizer=None,
                       generator: torch.Generator | None = None, incremental: bool = True, **options) -> Iterator:
        """`generate` as an iterator of `longmem.generation.Step`s: each step's new tokens (B,), which rows are
        live, and what the memory-augmented layer retrieved for them (`Step.retrieval`, which
        `longmem.memory.readable.read_chunks` turns into stream positions and text)."""
        tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        return self._steps(input_ids, attention_mask, memory, generation_config, None, tokenizer, generator,
                           incremental, options)[1]

    def stream(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               memory: MemoryBank | None = None, generation_config=None, *, streamer=None, tokenizer=None,
               generator: torch.Generator | None = None, incremental: bool = True, **options) -> Iterator:
        """`generate`, as an iterator over what is produced, step by step. With a tokenizer (the argument, else
        model.tokenizer): text. For one row, its non-empty text pieces (str), which never split a character and
        end before a stop string; for B rows, a list of B pieces ("" for a row with nothing new). Their
        concatenation is the decoded continuation (special tokens skipped). Without a tokenizer: the new tokens
        (B,) of each step. Arguments are checked when stream is called; the work happens while iterating.
        """
        from longmem.generation import prompt_contexts
        from longmem.textstream import text_pieces

        tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        opts, steps = self._steps(input_ids, attention_mask, memory, generation_config, streamer, tokenizer,
                                  generator, incremental, options)
        if tokenizer is None:
            return (step.tokens for step in steps)
        return text_pieces(steps, tokenizer, prompt_contexts(input_ids, attention_mask), opts.stops)

    # ---- persistence ---------------------------------------------------------------------
    def save_pretrained(self, path: str | Path, backbone: Literal["save", "reference"] = "save", **kwargs) -> None:
        """Write the SideNet and config (and the backbone, unless backbone='reference'); kwargs: extra, tokenizer, dtype."""
        from longmem.checkpoint import save_pretrained
        save_pretrained(self, path, backbone, **kwargs)

    @classmethod
    def from_pretrained(cls, path: str | Path, backbone: nn.Module | None = None,
                        device: torch.device | str | None = None, dtype: torch.dtype | str | None = None,
                        **kwargs) -> "LongMemForCausalLM":
        """Load a checkpoint in eval mode; kwargs: torch_dtype, device_map ("auto" or a device), as in transformers."""
        from longmem.checkpoint import from_pretrained
        return from_pretrained(cls, path, backbone, device, dtype, **kwargs)


def _streamed(steps, streamer, input_ids: torch.Tensor):
    """`steps`, feeding an HF streamer on the way: the prompt (B, N) first, then each step's tokens (B,); end()."""
    streamer.put(input_ids.cpu())
    try:
        for step in steps:
            streamer.put(step.tokens.cpu())
            yield step
    finally:
        streamer.end()


def generation_defaults(backbone: nn.Module) -> "GenerationOptions":
    """HF's defaults for a model: the eos and pad tokens of the backbone's generation config (or its config)."""
    from longmem.generation import GenerationOptions

    source = getattr(backbone, "generation_config", None) or backbone.config
    eos, pad = getattr(source, "eos_token_id", None), getattr(source, "pad_token_id", None)
    return GenerationOptions(eos_token_id=list(eos) if isinstance(eos, (list, tuple)) else eos, pad_token_id=pad)
