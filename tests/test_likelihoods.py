"""Every likelihood the project reports, against a hand computation from the model's logits.

The references never reuse the code under test: a target's log-prob is read off a forward pass
over exactly the tokens before it (the last position of a truncated run predicts the next
token), training targets are "the next real input of the row's stream", and the split of a
long input into memory and local context is derived from the documented rule. Each test also
checks that the plausible wrong answer (one token off, another reduction) differs from the
reference by far more than the tolerance, so a broken implementation cannot pass by accident.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, small_config, tiny_backbone

from longmem import LongMemForCausalLM
from longmem.data.documents import LabelledText
from longmem.eval import passkey, suffix
from longmem.eval.icl import Prompter, Template, score_labels
from longmem.eval.passkey import PasskeyOptions, PasskeyPrompt
from longmem.training.streams import IGNORE_INDEX, StreamBatcher
from longmem.training.tokens import TokenizedCorpus
from longmem.training.train import next_token_loss

TOL = dict(rtol=1e-5, atol=1e-5)



def far_from(a: float, b: float, margin: float = 1e-3) -> bool:
    return abs(float(a) - float(b)) > margin


# ---- the model's own loss ---------------------------------------------------------------------------
@pytest.mark.parametrize("with_memory", [False, True])
def test_model_loss_is_the_mean_shifted_nll_over_labelled_targets(family, with_memory):
    model = LongMemForCausalLM.from_backbone(tiny_backbone(family), small_config()).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(1, VOCAB, (3, 12), generator=g)
    labels = x.clone()
    labels[0, 3:] = IGNORE_INDEX          # row 0: 2 targets (inputs 0, 1 predict x[0, 1], x[0, 2])
    labels[1, [2, 5, 9]] = IGNORE_INDEX   # row 1: 8 targets
    labels[2, 0] = IGNORE_INDEX           # row 2: 11 targets (position 0 is never a target)
    memory = None
    if with_memory:
        memory = model.new_memory(3)
        model.memorize(torch.randint(1, VOCAB, (3, 21), generator=g), memory)
    with torch.no_grad():
        out = model(x, memory=memory, labels=labels)
        logp = torch.log_softmax(out.logits.double(), dim=-1)  # (B, T, V)
        per_row = [[-logp[b, t, labels[b, t + 1]] for t in range(11) if labels[b, t + 1] != IGNORE_INDEX]
                   for b in range(3)]
        assert [len(r) for r in per_row] == [2, 8, 11]
        want = torch.stack([v for r in per_row for v in r]).mean()  # mean over tokens, not over rows
        torch.testing.assert_close(out.loss.double(), want, **TOL)
        # the plausible wrong formulas give other numbers
        row_means = torch.stack([torch.stack(r).mean() for r in per_row]).mean()
        unshifted = F.cross_entropy(out.logits.flatten(0, 1).double(), labels.flatten(), ignore_index=IGNORE_INDEX)
        assert far_from(want, row_means) and far_from(want, unshifted)
        # labels=input_ids: every next token counts
        plain = model(x, memory=None, labels=x).loss
        lp = torch.log_softmax(model(x).logits.double(), dim=-1)
        torch.testing.assert_close(plain.double(), -lp[:, :-1].gather(2, x[:, 1:, None]).mean(), **TOL)


def test_forward_and_training_share_one_loss():
    """forward(labels=x) (unshifted, HF) and the trainer's aligned targets give the same loss for the same targets."""
    from longmem.loss import shift_labels
    from longmem.training import step

    model = LongMemForCausalLM.from_backbone(tiny_backbone("llama"), small_config()).eval()
    x = torch.randint(1, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    targets = torch.full_like(x, IGNORE_INDEX)
    targets[:, :-1] = x[:, 1:]  # what a stream gives: the next input, none after the last
    assert torch.equal(shift_labels(x), targets)
    with torch.no_grad():
        out = model(x, labels=x)
        assert torch.equal(out.loss, step.next_token_loss(out.logits, targets))


# ---- the trainer's loss -------------------------------------------------------------------------------
def toy_corpus(lengths, seed=0, eos=0) -> TokenizedCorpus:
    """Documents of the given numbers of text tokens (ids 1..VOCAB-1, never eos)."""
    rng = np.random.default_rng(seed)
    pieces, offsets = [np.array([eos])], [0]
    for n in lengths:
        pieces.append(np.append(rng.integers(1, VOCAB, n), eos))
        offsets.append(offsets[-1] + n + 1)
    return TokenizedCorpus(np.concatenate(pieces).astype(np.int32), np.array(offsets),
                           [f"d{i}" for i in range(len(lengths))], eos)


def stream_targets(batches) -> torch.Tensor:
    """(S, B, T) targets of the first S = len(batches) - 1 batches, derived from the inputs alone.

    A row's real inputs, concatenated over steps, are its documents [eos, text...] back to back,
    so each input's target is simply the next real input of the row (the eos opening the next
    document is the closing eos of this one). IGNORE_INDEX where the input is padding.
    """
    S, (B, T) = len(batches) - 1, batches[0].input_ids.shape
    out = torch.full((S, B, T), IGNORE_INDEX, dtype=torch.long)
    for j in range(B):
        flat = [(s, t, int(b.input_ids[j, t])) for s, b in enumerate(batches) for t in range(T)
                if b.attention_mask[j, t]]
        for (s, t, _), (_, _, nxt) in zip(flat, flat[1:]):
            if s < S:
                out[s, j, t] = nxt
    return out


def hand_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B, T, V), (B, T) -> (B, T) float64 -log p(target), 0 where IGNORE_INDEX."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    keep = targets != IGNORE_INDEX
    nll = -logp.gather(2, targets.clamp(min=0)[..., None])[..., 0]
    return nll * keep


def test_next_token_loss_against_the_stream_and_every_reduction():
    model = LongMemForCausalLM.from_backbone(tiny_backbone("llama"), small_config()).eval()
    corpus = toy_corpus([5, 30, 3, 16, 9, 40, 1, 22])  # short documents: rows pad, switch documents, desync
    batcher = StreamBatcher(corpus, batch_size=3, seq_len=16, seed=2)
    batches = [next(batcher) for _ in range(7)]
    targets = stream_targets(batches)
    memory = model.new_memory(3)
    checked, gaps = {"padded": False, "uneven": False}, []
    with torch.no_grad():
        for s, batch in enumerate(batches[:-1]):
            assert torch.equal(batch.labels, targets[s])  # the batcher's shifted labels are the stream's next tokens
            memory.reset(rows=batch.new_document.nonzero().flatten().tolist())
            logits = model(batch.input_ids, memory=memory, attention_mask=batch.attention_mask).logits
            nll, keep = hand_nll(logits, targets[s]), targets[s] != IGNORE_INDEX
            n = int(keep.sum())
            torch.testing.assert_close(next_token_loss(logits, batch.labels, "sum").double(), nll.sum(), **TOL)
            torch.testing.assert_close(next_token_loss(logits, batch.labels).double(), nll.sum() / n, **TOL)
            torch.testing.assert_close(next_token_loss(logits, batch.labels, "none").view_as(nll).double(), nll, **TOL)
            counts = keep.sum(1)
            if bool((counts < 16).any()):
                checked["padded"] = True
            if len(set(counts.tolist())) > 1:
                checked["uneven"] = True
                row_means = torch.stack([nll[j].sum() / counts[j] for j in range(3) if counts[j]]).mean()
                gaps.append(abs(float(nll.sum() / n - row_means)))
            # already-shifted labels: shifting again would score other tokens
            again = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch.labels[:, 1:].flatten(), ignore_index=-100)
            assert far_from(again, nll.sum() / n)
    assert checked == {"padded": True, "uneven": True}
    assert max(gaps) > 1e-3  # mean over tokens and mean of row means differ on these batches


# ---- passkey: the key's negative log-likelihood ----------------------------------------------------------
@pytest.fixture(scope="module")
def pk_model(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=4, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64, vocab_size=len(tok), max_position_embeddings=128, initializer_range=0.2)
    model = LongMemForCausalLM.from_backbone(LlamaForCausalLM(cfg).eval(), small_config(segment_length=32)).eval()
    with torch.no_grad():  # lean on the memory, so that reading it (or not) moves the likelihoods clearly
        model.sidenet.layers[model.config.sidenet_memory_layer].gate.fill_(4.0)
    return model


# question 29 tokens, key 6: the local segment shifted right by the key (n=30: 4 prompt tokens memorized although
# the prompt fits one segment; n=95: the prompt's last segment starts at 64, the window at 69); or just the last
# prompt segment and the key (n=65)
@pytest.mark.parametrize("n", [30, 65, 95])
def test_passkey_key_nll_is_the_mean_nll_of_the_key_tokens_after_the_prompt(pk_model, tok, n, monkeypatch):
    import longmem.runtime

    # trial runs under bf16 autocast; in float32 the reference can be compared at a tight tolerance
    monkeypatch.setattr(longmem.runtime, "autocast", lambda device: contextlib.nullcontext())
    model, T = pk_model, 32
    sentences, _ = passkey.filler_sentences(PasskeyOptions(), tok, need=0)
    question = passkey.encode(tok, passkey.QUESTION)
    filler = [t for _ in range(20) for s in sentences for t in s]
    ids = filler[:n - len(question)] + question
    key = "48213"
    answer = passkey.encode(tok, key)
    a = len(answer)
    assert len(ids) == n and len(question) == 29 and a == 6
    out = passkey.trial(model, tok, PasskeyPrompt(ids, key, 0, 1), memory_size=64, new_tokens=1)

    # reference: log p(key token i | prompt + key[:i]) from a run that ends right before token i. The local
    # segment is the prompt's last segment (as in generate), moved right just enough that it also holds the key
    # within segment_length tokens; everything before it is memorized.
    full = ids + answer
    start = max((n - 1) // T * T, n + a - T)
    assert start == {30: 4, 65: 64, 95: 69}[n]
    memory = model.new_memory(1, memory_size=64)
    with torch.no_grad():
        model.memorize(torch.tensor([full[:start]]), memory)
        for row, mem in (("longmem_memory", memory), ("longmem_no_memory", None)):
            lps = [next_logprob(model, full[start:n + i], answer[i], mem) for i in range(a)]
            want = -sum(lps) / a
            assert out["key_nll"][row] == pytest.approx(want, abs=1e-5), row
            late = -sum(next_logprob(model, full[start:n + i + 1], answer[i], mem) for i in range(a)) / a
            assert far_from(late, want, 1e-2)  # each key token read one position late
            assert far_from(-sum(lps), want, 1e-2)  # the mean, not the sum
    assert far_from(out["key_nll"]["longmem_memory"], out["key_nll"]["longmem_no_memory"], 1e-2)  # memory was read


# ---- suffix and icl: continuation scores ------------------------------------------------------------------
@pytest.fixture(scope="module")
def chars():
    from test_eval_suffix_icl import make_char_tokenizer

    return make_char_tokenizer()


@pytest.fixture(scope="module")
def lm():
    return LongMemForCausalLM.from_backbone(tiny_backbone("gpt2"), small_config(segment_length=96)).eval()


def next_logprob(model, tokens: list[int], target: int, memory=None) -> float:
    """log p(target | tokens): the last position of a run over exactly `tokens` (the memory is only read)."""
    logits = model(torch.tensor([tokens]), memory=memory, update_memory=False).logits
    return float(torch.log_softmax(logits[0, -1].double(), -1)[target])


def truncated_logprobs(model, context: list[int], continuation: list[int], memory=None, shift: int = 0) -> list[float]:
    """log p(continuation[i] | (context + continuation)[:len(context) + i + shift]); shift=0 is the right one."""
    seq = context + continuation
    return [next_logprob(model, seq[:len(context) + i + shift], t, memory) for i, t in enumerate(continuation)]


def test_suffix_scores_are_log_likelihoods_after_the_documented_local_context(lm, chars):
    from test_eval_suffix_icl import BOOK

    T, opening = 96, 40
    ex = suffix.book_examples("b", BOOK, chars, opening_tokens=opening, negatives=3, max_prefix=10_000, seed=0)[2]
    assert all(len(c) == opening for c in ex.candidates) and len(ex.prefix) > T
    with torch.no_grad():
        d = suffix.evaluate(lm, ex, memory_size=None)
        # documented: the prefix's last segment_length - opening_tokens tokens are the local context, the rest is
        # memorized into a fresh memory (the model's capacity)
        local, past = ex.prefix[len(ex.prefix) - (T - opening):], ex.prefix[:len(ex.prefix) - (T - opening)]
        memory = lm.new_memory(1)
        lm.memorize(torch.tensor([past]), memory)
        assert d["local_tokens"] == len(local) and d["memory_tokens"] == len(memory) > 0
        for cond, mem in (("memory", memory), ("no_memory", None)):
            for i, c in enumerate(ex.candidates):
                lps = truncated_logprobs(lm, local, c, mem)
                assert d[cond]["sum"][i] == pytest.approx(sum(lps), abs=1e-4)
                assert d[cond]["mean"][i] == pytest.approx(sum(lps) / len(c), abs=1e-5)
            # one token off: each candidate token scored from the position before (or after) its own
            for shift in (-1, 1):
                assert far_from(sum(truncated_logprobs(lm, local, ex.candidates[0], mem, shift)), d[cond]["sum"][0], 1e-2)
        assert d["memory"]["sum"] != d["no_memory"]["sum"]  # the memory was read


def test_icl_label_scores_are_log_likelihoods_after_the_prompt(lm, chars):
    labels = ["negative", "neutral", "positive"]
    p = Prompter(chars, Template("Review:", "\nSentiment:"), labels, max_text_tokens=20)
    demos = [p.demo(LabelledText("positive", "a fine film")), p.demo(LabelledText("negative", "dull"))]
    prompt, _ = p.context(demos, p.query("what a lovely story"), 96)
    g = torch.Generator().manual_seed(5)
    memory = lm.new_memory(1)
    lm.memorize(torch.randint(1, VOCAB, (1, 90), generator=g), memory)
    with torch.no_grad():
        for mem in (None, memory):
            scores = score_labels(lm, p, prompt, mem)
            last = lm(torch.tensor([prompt]), memory=mem, update_memory=False).logits[0, -1]
            first = torch.log_softmax(last.double(), -1)
            for label in labels:
                ids = chars(" " + label, add_special_tokens=False)["input_ids"]
                lps = truncated_logprobs(lm, prompt, ids, mem)
                assert scores["label_logprob"][label] == pytest.approx(sum(lps), abs=1e-4)
                assert scores["next_token_logprob"][label] == pytest.approx(float(first[ids[0]]), abs=1e-5)
                for shift in (-1, 1):  # one token off
                    assert far_from(sum(truncated_logprobs(lm, prompt, ids, mem, shift)), sum(lps), 1e-2)
