"""Generation: options, logits processing, the decoding loop, streaming, and the tokenizer that travels with the model.

References: transformers' own LogitsProcessor classes; argmax / multinomial over a manual forward of the model
(one `model(...)` call per step over the growing context); a scripted decoder whose tokens are written by hand
(eos, pad, stop strings, max_new_tokens); the tokenizer's own `decode`; transformers' streamers.
"""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import VOCAB, small_config, tiny_backbone
from transformers import (GenerationConfig, LogitsProcessorList, RepetitionPenaltyLogitsProcessor,
                          TemperatureLogitsWarper, TextIteratorStreamer, TextStreamer, TopKLogitsWarper,
                          TopPLogitsWarper)

from longmem import LongMemError, LongMemForCausalLM
from longmem.runtime import autocast
from longmem.generation import (GenerationOptions, apply_repetition_penalty, apply_top_k, apply_top_p,
                                decode_steps, process_logits, stream_tokens)
from longmem.textstream import Detokenizer, StopText, text_pieces


# ---- logits processing against transformers' processors ------------------------------------------------------
def seen_of(input_ids: torch.Tensor, V: int) -> torch.Tensor:
    return torch.zeros(input_ids.shape[0], V, dtype=torch.bool).scatter_(1, input_ids, True)


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_is_transformers(penalty):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g) * 3   # both signs
    ids = torch.randint(0, 50, (3, 20), generator=g)  # with repeats
    expected = RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone())
    torch.testing.assert_close(apply_repetition_penalty(logits, seen_of(ids, 50), penalty), expected, rtol=0, atol=0)


@pytest.mark.parametrize("k", [1, 3, 50, 80])
def test_top_k_is_transformers_with_ties(k):
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(1)).round()  # many ties
    expected = TopKLogitsWarper(k)(None, logits.clone())
    assert torch.equal(apply_top_k(logits, k), expected)


@pytest.mark.parametrize("p", [0.01, 0.3, 0.9, 0.999, 1.0])
def test_top_p_is_transformers(p):
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(2)) * 2
    expected = logits if p == 1.0 else TopPLogitsWarper(p)(None, logits.clone())
    assert torch.equal(apply_top_p(logits, p), expected)
    assert bool((apply_top_p(logits, p) > -torch.inf).sum(-1).ge(1).all())  # at least one token stays


def test_top_p_keeps_the_tokens_until_the_mass_is_reached_exactly():
    logits = torch.tensor([[0.25, 0.25, 0.5]]).log()  # ascending cumulative mass 0.25, 0.5, 1.0
    kept = apply_top_p(logits, 0.5) > -torch.inf
    assert kept.tolist() == [[False, False, True]] == (TopPLogitsWarper(0.5)(None, logits.clone()) > -torch.inf).tolist()


def test_processing_chain_is_transformers_in_its_order():
    g = torch.Generator().manual_seed(3)
    logits, ids = torch.randn(3, 60, generator=g) * 2, torch.randint(0, 60, (3, 12), generator=g)
    opts = GenerationOptions(do_sample=True, temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.2)
    hf = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.2), TemperatureLogitsWarper(0.7),
                              TopKLogitsWarper(20), TopPLogitsWarper(0.8)])
    torch.testing.assert_close(process_logits(logits, opts, seen_of(ids, 60)), hf(ids, logits.clone()))
    greedy = GenerationOptions(repetition_penalty=1.2)  # greedy: only the penalty applies
    torch.testing.assert_close(process_logits(logits, greedy, seen_of(ids, 60)),
                               RepetitionPenaltyLogitsProcessor(1.2)(ids, logits.clone()))


# ---- greedy and sampling against a manual forward --------------------------------------------------------------
def manual(model, prompt, memory, steps, pick):
    """The reference loop: one full forward of the model over the whole context per new token."""
    ctx = prompt
    for _ in range(steps):
        logits = model(ctx, memory=memory, update_memory=False).logits[:, -1].float()  # (B, V)
        ctx = torch.cat([ctx, pick(logits, ctx)[:, None]], dim=1)
    return ctx


@pytest.fixture
def filled(family):
    """A tiny model and a memory holding two segments, and a prompt that fits in the local context."""
    model = LongMemForCausalLM.from_backbone(tiny_backbone(family), small_config())
    g = torch.Generator().manual_seed(5)
    memory = model.new_memory(2)
    model.memorize(torch.randint(1, VOCAB, (2, 32), generator=g), memory)
    return model, memory, torch.randint(1, VOCAB, (2, 6), generator=g)


def copy(memory):
    return memory.select([0, 1])


def test_greedy_is_the_argmax_of_a_manual_forward(filled):
    model, memory, prompt = filled
    with torch.no_grad():
        expected = manual(model, prompt, copy(memory), 8, lambda logits, ctx: logits.argmax(-1))
    out = model.generate(prompt, memory=memory, max_new_tokens=8, eos_token_id=None)
    assert torch.equal(out, expected)
    assert torch.equal(model.generate(prompt, memory=copy(memory), max_new_tokens=8, eos_token_id=None,
                                      temperature=0), expected)  # the old spelling of greedy still means greedy


def test_greedy_with_repetition_penalty_is_transformers(filled):
    model, memory, prompt = filled
    hf = RepetitionPenaltyLogitsProcessor(1.5)
    with torch.no_grad():
        expected = manual(model, prompt, copy(memory), 8, lambda logits, ctx: hf(ctx, logits).argmax(-1))
    out = model.generate(prompt, memory=memory, max_new_tokens=8, eos_token_id=None, repetition_penalty=1.5)
    assert torch.equal(out, expected)
    assert not torch.equal(out, model.generate(prompt, memory=copy(memory), max_new_tokens=8, eos_token_id=None))


def test_sampling_is_transformers_warpers_and_multinomial_with_the_seed(filled):
    model, memory, prompt = filled
    hf = LogitsProcessorList([TemperatureLogitsWarper(1.5), TopKLogitsWarper(30), TopPLogitsWarper(0.9)])
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        expected = manual(model, prompt, copy(memory), 10,
                          lambda logits, ctx: torch.multinomial(hf(ctx, logits).softmax(-1), 1, generator=g)[:, 0])
    kw = dict(max_new_tokens=10, eos_token_id=None, do_sample=True, temperature=1.5, top_k=30, top_p=0.9)
    assert torch.equal(model.generate(prompt, memory=copy(memory), seed=11, **kw), expected)
    assert torch.equal(model.generate(prompt, memory=copy(memory), generator=torch.Generator().manual_seed(11), **kw),
                       expected)
    assert not torch.equal(model.generate(prompt, memory=copy(memory), seed=12, **kw), expected)
    with pytest.raises(LongMemError, match="pass either seed= or generator=, not both"):
        model.generate(prompt, seed=1, generator=g, **kw)


# ---- the loop on hand-written examples ----------------------------------------------------------------------
class Scripted:
    """A decoder whose next token is written by hand: row r's step i puts all probability on script[r][i]."""

    def __init__(self, script: list[list[int]], V: int = VOCAB):
        self.script, self.V, self.i = script, V, 0
        self.fed: list[list[int]] = []

    def _logits(self):
        logits = torch.full((len(self.script), self.V), -10.0)
        for r, row in enumerate(self.script):
            logits[r, row[self.i]] = 10.0
        return logits

    def prefill(self, input_ids, attention_mask=None):
        self.prompt = input_ids
        return self._logits()

    def step(self, tokens):
        self.fed.append(tokens.tolist())
        self.i += 1
        return self._logits()


def run(script, prompt=None, V=VOCAB, tokenizer=None, attention_mask=None, **kw):
    decoder = Scripted(script, V)
    prompt = torch.ones(len(script), 3, dtype=torch.long) if prompt is None else prompt
    tokens = list(stream_tokens(decoder, prompt, attention_mask, GenerationOptions(**kw), tokenizer=tokenizer))
    return torch.stack(tokens, 1).tolist() if tokens else [], decoder.fed


def test_eos_pad_and_the_last_token_is_never_fed_back():
    out, fed = run([[5, 6, 9, 7, 8], [5, 9, 4, 4, 4]], eos_token_id=9, pad_token_id=1, max_new_tokens=5)
    assert out == [[5, 6, 9], [5, 9, 1]]           # a finished row is padded; all done -> the loop ends
    assert fed == [[5, 5], [6, 9]]                  # the last token (9 / pad) was never fed back
    out, _ = run([[5, 6, 9, 7], [5, 2, 4, 4]], eos_token_id=[9, 2], max_new_tokens=4)  # any of several eos
    assert out == [[5, 6, 9], [5, 2, 9]]            # pad defaults to the first eos
    out, fed = run([[5, 6, 9, 7], [5, 2, 4, 4]], max_new_tokens=4)  # no eos: max_new_tokens
    assert out == [[5, 6, 9, 7], [5, 2, 4, 4]] and len(fed) == 3
    out, fed = run([[5]], max_new_tokens=0)
    assert out == [] and fed == []


def test_stop_strings_on_hand_examples(tok):
    text = "Hi. Done 日本 here"
    ids = tok(text)["input_ids"]
    V = len(tok)

    def stop_after(stop):
        out, _ = run([ids + [0] * 3], V=V, tokenizer=tok, stop_strings=stop, max_new_tokens=len(ids) + 3)
        return tok.decode(out[0])

    def brute_force(stops):  # the shortest prefix of tokens whose text contains a stop string
        n = next(i for i in range(1, len(ids) + 1) if any(s in tok.decode(ids[:i]) for s in stops))
        return tok.decode(ids[:n])

    assert stop_after(".") == brute_force(["."]) == "Hi."  # the token that completes it is kept (as in HF)
    assert stop_after(["zzz", "e 日"]) == brute_force(["e 日"])
    assert stop_after("本 h") == brute_force(["本 h"])      # across tokens and multi-byte characters
    assert stop_after("本 h").startswith("Hi. Done 日本 h") and len(stop_after("本 h")) < len(text)
    assert stop_after("nowhere") == text + "<|endoftext|>" * 3  # no stop string, no eos: max_new_tokens
    # several rows: the one that stops is padded while the other continues
    other = tok("and so on and on")["input_ids"][:6]
    out, _ = run([ids[:6], other], V=V, tokenizer=tok, stop_strings=["Hi.", "zz"], pad_token_id=7, max_new_tokens=6)
    n = len(tok("Hi.")["input_ids"])
    assert out == [ids[:n] + [7] * (6 - n), other]
    # the text outputs end before the stop string
    steps = decode_steps(Scripted([ids], V), torch.tensor([[1]]), None, GenerationOptions(
        stop_strings="本 h", max_new_tokens=len(ids)), tokenizer=tok)
    assert "".join(text_pieces(steps, tok, [[1]], ["本 h"])) == "Hi. Done 日"


def test_repetition_penalty_ignores_padding():
    V = 10
    logits = torch.zeros(1, V)
    logits[0, 3], logits[0, 4] = 2.0, 1.9

    class Fixed(Scripted):
        def _logits(self):
            return logits.expand(2, V).clone()

    prompt = torch.tensor([[3, 3, 5], [3, 6, 5]])  # row 0: the 3s are padding; row 1: a real 3
    mask = torch.tensor([[0, 0, 1], [1, 1, 1]])
    out = list(stream_tokens(Fixed([[0], [0]], V), prompt, mask, GenerationOptions(repetition_penalty=2.0,
                                                                                     max_new_tokens=1)))
    assert out[0].tolist() == [3, 4]


# ---- streaming text -----------------------------------------------------------------------------------------
def test_detokenizer_never_splits_a_character(tok):
    text = "café 日本語 🙂 and plain words"
    ids = tok(text)["input_ids"]
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # the tokenizer does split characters into byte tokens
    d = Detokenizer(tok)
    pieces = [d.push(i) for i in ids] + [d.flush()]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    assert sum(1 for p in pieces if p) > 5  # it streams, not everything at the end
    broken = Detokenizer(tok)  # a truncated character at the very end comes out as U+FFFD on flush
    pieces = [broken.push(i) for i in tok("ab 日")["input_ids"][:-1]]
    assert not any("\ufffd" in p for p in pieces) and "".join(pieces) + broken.flush() == "ab \ufffd"


def test_text_of_a_finished_row_stops_with_it(tok):
    a, b = tok("Hi. More")["input_ids"], tok("and so on and on")["input_ids"]
    n = len(tok("Hi.")["input_ids"])
    x = tok("X")["input_ids"][0]
    script = [a[:n] + [0] * 6, b[:n + 6]]  # row 0 ends with the eos token 0 and is padded with "X" after it
    opts = GenerationOptions(eos_token_id=0, pad_token_id=x, max_new_tokens=n + 6)
    steps = decode_steps(Scripted(script, len(tok)), torch.tensor([[1], [1]]), None, opts)
    rows = ["", ""]
    for pieces in text_pieces(steps, tok, [[1], [1]]):
        rows = [r + p for r, p in zip(rows, pieces)]
    assert rows == [tok.decode(a[:n]), tok.decode(b[:n + 6])] and "X" not in rows[0]


def test_stop_text_holds_back_what_may_start_a_stop_string():
    s = StopText(["o w", "xyz"])
    assert [s.push("Hel"), s.push("lo"), s.push(" wo"), s.push("rld")] == ["Hel", "l", "", ""]
    s = StopText(["cd"])
    assert [s.push("ab"), s.push("c"), s.flush()] == ["ab", "", "c"]


@pytest.fixture(scope="module")
def lm(checkpoint):
    return LongMemForCausalLM.from_pretrained(checkpoint)


def test_keyword_style_of_hf(lm, tok):
    """model.generate(**tokenizer(...)) works; max_length counts the prompt; an HF GenerationConfig is read."""
    assert lm.tokenizer is not None and lm.tokenizer("Hi there")["input_ids"] == tok("Hi there")["input_ids"]
    enc = tok("The old house", return_tensors="pt")
    N = enc["input_ids"].shape[1]
    out = lm.generate(**enc, max_new_tokens=5, eos_token_id=None)
    assert out.shape == (1, N + 5) and torch.equal(out[:, :N], enc["input_ids"])
    assert torch.equal(lm.generate(**enc, max_length=N + 5, eos_token_id=None), out)
    assert torch.equal(lm.generate(**enc, generation_config=GenerationConfig(max_new_tokens=5), eos_token_id=None),
                       out)
    assert torch.equal(lm.generate(**enc, generation_config=GenerationOptions(max_new_tokens=5)), out)
    with pytest.raises(LongMemError, match=f"max_length=2 is shorter than the prompt \\({N} tokens\\)"):
        lm.generate(**enc, max_length=2)
    with pytest.raises(LongMemError, match="pass max_new_tokens or max_length, not both"):
        lm.generate(**enc, max_length=9, max_new_tokens=3)


def test_batch_with_left_padding_equals_each_row_alone(lm, tok):
    texts = ["The old house stood", "A cat"]
    enc = tok(texts, return_tensors="pt", padding=True, padding_side="left")
    out = lm.generate(**enc, max_new_tokens=6, eos_token_id=None)
    for r, text in enumerate(texts):
        alone = lm.generate(tok(text, return_tensors="pt").input_ids, max_new_tokens=6, eos_token_id=None)
        assert out[r, -6:].tolist() == alone[0, -6:].tolist()
    right = tok(texts, return_tensors="pt", padding=True, padding_side="right")
    with pytest.raises(LongMemError, match="padding on the right .* tokenizer.padding_side = 'left'"):
        lm.generate(**right)


def test_stream_and_streamers_give_the_decoded_continuation(lm, tok, capsys):
    enc = tok("The old house", return_tensors="pt")
    N = enc["input_ids"].shape[1]
    kw = dict(max_new_tokens=12, eos_token_id=None)
    out = lm.generate(**enc, **kw)
    text = tok.decode(out[0, N:], skip_special_tokens=True)
    assert "".join(lm.stream(**enc, **kw)) == text  # model.tokenizer, by default
    lm.tokenizer = None
    try:
        tokens = list(lm.stream(**enc, **kw))  # no tokenizer: the tokens (B,) of each step
    finally:
        lm.tokenizer = tok
    assert torch.equal(torch.stack(tokens, 1), out[:, N:])
    lm.generate(**enc, streamer=TextStreamer(tok, skip_prompt=True), **kw)
    assert capsys.readouterr().out == text + "\n"
    streamer = TextIteratorStreamer(tok, skip_prompt=True)
    thread = threading.Thread(target=lm.generate, kwargs=dict(**enc, streamer=streamer, **kw))
    thread.start()
    assert "".join(streamer) == text
    thread.join()

    class Recorder:
        def __init__(self):
            self.shapes, self.ended = [], False

        def put(self, value):
            self.shapes.append(tuple(value.shape))

        def end(self):
            self.ended = True

    rec = Recorder()
    lm.generate(**enc, streamer=rec, **kw)
    assert rec.shapes == [(1, N)] + [(1,)] * 12 and rec.ended  # HF's convention: the prompt, then each step


def test_batch_stream_gives_one_piece_per_row(lm, tok):
    enc = tok(["The old house stood", "A cat"], return_tensors="pt", padding=True, padding_side="left")
    out = lm.generate(**enc, max_new_tokens=8, eos_token_id=None)
    rows = ["", ""]
    for pieces in lm.stream(**enc, max_new_tokens=8, eos_token_id=None):
        assert isinstance(pieces, list) and len(pieces) == 2
        rows = [a + b for a, b in zip(rows, pieces)]
    assert rows == [tok.decode(out[r, -8:], skip_special_tokens=True) for r in range(2)]


def test_stream_ends_text_before_a_stop_string_and_generate_keeps_its_tokens(lm, tok):
    enc = tok("The old house", return_tensors="pt")
    N = enc["input_ids"].shape[1]
    full = tok.decode(lm.generate(**enc, max_new_tokens=20, eos_token_id=None)[0, N:], skip_special_tokens=True)
    stop = full[4:6]  # two characters the continuation produces
    cut = full[:full.index(stop)]
    assert "".join(lm.stream(**enc, max_new_tokens=20, eos_token_id=None, stop_strings=stop)) == cut
    kept = tok.decode(lm.generate(**enc, max_new_tokens=20, eos_token_id=None, stop_strings=stop)[0, N:],
                      skip_special_tokens=True)
    assert kept.startswith(cut + stop) and len(kept) < len(full)


# ---- invalid options: one clear error, never a substitute ---------------------------------------------------------
BAD = [
    (dict(top_k=0, do_sample=True), "top_k=0: give the number of candidate tokens, at least 1"),
    (dict(top_k=-5, do_sample=True), "top_k=-5"),
    (dict(top_k=2.5, do_sample=True), "top_k=2.5"),
    (dict(top_p=0.0, do_sample=True), "top_p=0.0: give a probability mass in (0, 1]"),
    (dict(top_p=1.5, do_sample=True), "top_p=1.5"),
    (dict(top_p=float("nan"), do_sample=True), "top_p=nan"),
    (dict(temperature=-1.0, do_sample=True), "temperature=-1.0: give a finite number > 0"),
    (dict(temperature=float("nan"), do_sample=True), "temperature=nan"),
    (dict(temperature=float("inf"), do_sample=True), "temperature=inf"),
    (dict(temperature=0, do_sample=True), "temperature=0 with do_sample=True: sampling needs a temperature > 0"),
    (dict(temperature=0.7), "temperature=0.7 only applies when sampling; pass do_sample=True"),
    (dict(top_k=5), "top_k=5 only applies when sampling"),
    (dict(top_p=0.9), "top_p=0.9 only applies when sampling"),
    (dict(max_new_tokens=-1), "max_new_tokens=-1: give the number of new tokens, 0 or more"),
    (dict(max_new_tokens=2.0), "max_new_tokens=2.0"),
    (dict(repetition_penalty=0.0), "repetition_penalty=0.0: give a finite number > 0"),
    (dict(repetition_penalty=-1.2), "repetition_penalty=-1.2"),
    (dict(eos_token_id=-1), "eos_token_id=-1: give a token id or a non-empty list of token ids"),
    (dict(eos_token_id=[]), "eos_token_id=[]"),
    (dict(eos_token_id="</s>"), "eos_token_id='</s>'"),
    (dict(pad_token_id=-3), "pad_token_id=-3"),
    (dict(stop_strings=""), "stop_strings='': give a non-empty string"),
    (dict(stop_strings=["a", ""]), "stop_strings=['a', '']"),
    (dict(seed=-1), "seed=-1: give a whole number >= 0"),
    (dict(do_sample="yes"), "do_sample='yes'"),
    (dict(topk=3), "unknown generation option 'topk'; the options are max_new_tokens, do_sample"),
]


@pytest.mark.parametrize("options, message", BAD, ids=[m.split(":")[0][:40] for _, m in BAD])
def test_invalid_options_are_one_clear_error(options, message):
    model = LongMemForCausalLM.from_backbone(tiny_backbone("gpt2"), small_config())
    with pytest.raises(LongMemError) as e:
        model.generate(torch.ones(1, 3, dtype=torch.long), **options)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_invalid_inputs_are_one_clear_error():
    model = LongMemForCausalLM.from_backbone(tiny_backbone("gpt2"), small_config())
    ids = torch.ones(1, 3, dtype=torch.long)
    for call, message in [
        (lambda: model.generate(ids[0]), "input_ids must be a (batch, tokens) tensor"),
        (lambda: model.generate(ids[:, :0]), "the prompt is empty"),
        (lambda: model.generate(ids, attention_mask=torch.ones(1, 4)), "attention_mask has shape (1, 4)"),
        (lambda: model.generate(ids, model.new_memory(1)), "pass the memory by name"),
        (lambda: model.generate(ids, stop_strings="."), "stop_strings need a tokenizer"),
        (lambda: model.generate(ids, eos_token_id=500), "eos_token_id=500 is outside the vocabulary (0..96)"),
        (lambda: model.generate(ids, generation_config={"max_new_tokens": 3}), "generation_config must be"),
        (lambda: model.stream(ids, do_sample=True, top_k=0), "top_k=0"),  # checked when stream is called
    ]:
        with pytest.raises(LongMemError) as e:
            call()
        assert message in str(e.value), str(e.value)


def test_the_defaults_are_the_backbones_eos_and_greedy():
    model = LongMemForCausalLM.from_backbone(tiny_backbone("llama"), small_config())
    assert model.generation_config == GenerationOptions(eos_token_id=0, pad_token_id=0)
    assert GenerationOptions.from_hf(GenerationConfig(do_sample=False, temperature=0.6, top_p=0.9, eos_token_id=[1, 2])) \
        == GenerationOptions(eos_token_id=[1, 2])  # transformers ignores sampling fields when not sampling


# ---- the tokenizer travels with the model ----------------------------------------------------------------------
def test_readme_save_example_gives_a_checkpoint_the_cli_can_use(tok, tmp_path, capsys):
    """README: a backbone folder with its tokenizer -> from_backbone(tokenizer=) -> save_pretrained -> CLI generate."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    import longmem
    from longmem.cli import main

    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=4, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64, vocab_size=len(tok), max_position_embeddings=128)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    backbone = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    model = LongMemForCausalLM.from_backbone(backbone, small_config(segment_length=32),
                                             tokenizer=AutoTokenizer.from_pretrained(tmp_path / "hf"))
    model.save_pretrained(tmp_path / "ckpt")
    assert main(["generate", "--model", str(tmp_path / "ckpt"), "--prompt", "The old house", "--max-new-tokens",
                 "6", "--ignore-eos", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    ids = tok("The old house", return_tensors="pt").input_ids
    with autocast("cpu"):  # what the CLI runs under
        expected = model.generate(ids, max_new_tokens=6, eos_token_id=None)
    assert printed == tok.decode(expected[0, ids.shape[1]:], skip_special_tokens=True) + "\n"
    # a checkpoint that references its backbone keeps the tokenizer in tokenizer/
    model.save_pretrained(tmp_path / "ref", backbone="reference")
    assert (tmp_path / "ref" / "tokenizer" / "tokenizer.json").is_file()
    loaded = LongMemForCausalLM.from_pretrained(tmp_path / "ref")
    assert loaded.tokenizer("The old house")["input_ids"] == ids[0].tolist()
    assert longmem.load_tokenizer(tmp_path / "ref")("The old house")["input_ids"] == ids[0].tolist()
    # without any tokenizer, loading says what to do
    LongMemForCausalLM.from_backbone(backbone, small_config(segment_length=32)).save_pretrained(tmp_path / "none")
    assert LongMemForCausalLM.from_pretrained(tmp_path / "none").tokenizer is None
    with pytest.raises(LongMemError, match="saved without a tokenizer; save it again with one"):
        longmem.load_tokenizer(tmp_path / "none")


def test_default_tokenizer_is_the_default_models():
    import longmem

    tok = longmem.load_tokenizer("default")
    assert len(tok) == 8192 and tok.decode(tok("Persuasion")["input_ids"]) == "Persuasion"


def test_cli_generate_streams_the_text_and_echoes_the_prompt(checkpoint, lm, tok, capsys):
    from longmem.cli import main

    argv = ["generate", "--model", checkpoint, "--prompt", "The old house", "--max-new-tokens", "10", "--threads", "1"]
    ids = tok("The old house", return_tensors="pt").input_ids
    for extra, kw in (([], {}), (["--do-sample", "--seed", "3", "--top-p", "0.9", "--temperature", "1.5"],
                                  dict(do_sample=True, seed=3, top_p=0.9, temperature=1.5))):
        assert main(argv + ["--echo", "--ignore-eos"] + extra) == 0
        with autocast("cpu"):  # what the CLI runs under
            expected = lm.generate(ids, max_new_tokens=10, eos_token_id=None, **kw)
        assert capsys.readouterr().out == "The old house" + tok.decode(expected[0, ids.shape[1]:],
                                                                       skip_special_tokens=True) + "\n"


def test_each_step_reports_the_retrieval_that_chose_its_token(filled):
    """Step.retrieval equals the memory layer's retrieval of a full forward over the context at that step."""
    from longmem.decoding import newest_position

    model, memory, prompt = filled
    steps = list(model.generate_steps(prompt, memory=copy(memory), max_new_tokens=6, eos_token_id=None))
    ctx = prompt
    with torch.no_grad():
        for step in steps:  # 6 + 6 tokens stay inside the 16-token window: the memory is never written
            ref = newest_position(model(ctx, memory=memory, update_memory=False).retrieval, ctx.shape[1])
            assert torch.allclose(step.retrieval.scores, ref.scores, atol=1e-5)
            assert torch.equal(step.retrieval.valid, ref.valid)
            ctx = torch.cat([ctx, step.tokens[:, None]], dim=1)


def test_cli_show_retrieval_prints_what_each_token_read(checkpoint, lm, tok, tmp_path, capsys):
    from conftest import TEXT
    from longmem.cli import main
    from longmem.memory.readable import describe_reads, read_chunks

    book = tmp_path / "book.txt"
    book.write_text(TEXT * 3)
    argv = ["generate", "--model", checkpoint, "--prompt", "The old house", "--memorize", str(book),
            "--max-new-tokens", "4", "--ignore-eos", "--show-retrieval", "2", "--threads", "1"]
    assert main(argv) == 0
    printed = capsys.readouterr().out.splitlines()
    memory = lm.new_memory(1)
    G = lm.adapter.num_heads // memory.spec.num_kv_heads
    expected = []
    with torch.no_grad(), autocast("cpu"):  # what the CLI runs under
        lm.memorize(torch.tensor([tok(TEXT * 3)["input_ids"]]), memory)
        prompt = tok("The old house", return_tensors="pt").input_ids
        for i, step in enumerate(lm.generate_steps(prompt, memory=memory, max_new_tokens=4, eos_token_id=None)):
            chunks = read_chunks(step.retrieval, memory, G, top=2)
            assert len(chunks) == 2 and all(c.token_ids for c in chunks)  # it read memorized text
            t = int(step.tokens[0])
            expected.append(f"{tok.decode([t])!r}: {describe_reads(chunks, i, tok.decode)}")
    assert printed == expected
