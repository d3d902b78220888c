"""The `suffix` and `icl` evaluation tasks on tiny random models and a character-level tokenizer."""

import copy
import json

import pytest
import torch
from conftest import VOCAB, small_config, tiny_backbone

from longmem import LongMemForCausalLM
from longmem.data.documents import LabelledText
from longmem.eval import icl, suffix
from longmem.eval.icl import IclOptions, Prompter, Template, predict, score_labels
from longmem.eval.suffix import (
    SuffixOptions,
    book_examples,
    find_chapters,
    score_continuations,
)

BOOK = """THE TEST BOOK

A preface that is not a chapter.

CHAPTER I

It was a dark and stormy night, and the rain fell in torrents upon the roofs.

Chapter 2

Morning came slowly over the hills, grey and cold and full of quiet promise.

Chapter 3 of the old edition was lost, the editor said, so this line is text.

SCENE: a room, which is not a heading either.

ACT II.

SCENE I. A street.

Two servants argue loudly about a borrowed horse and a missing silver spoon.

Chapter Four

The letter arrived at noon; nobody in the house dared to open it before dinner.

CHAPTER V.--The Return

He came back at last, thinner than before, with a story nobody believed at all.

CHAPTER 6

A short one.

CHAPTER 7

The wedding was small, and the cake was enormous, and the dog ate half of it.

CHAPTER 8

Years later the house still stood, though the garden had gone wild with roses.

CHAPTER 9

In the end they all agreed that the spoon had never been silver in the first place.
"""


def make_char_tokenizer():
    """One token per character (newline and printable ASCII but ` and ~) plus two merges, " n" and " p":
    exactly the tiny models' 97 tokens. " negative" and " neutral" share their first token, " positive" not."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = ["\n"] + [chr(c) for c in range(32, 127) if chr(c) not in "`~"]
    vocab = {t: i for i, t in enumerate(["<|endoftext|>", *chars, " n", " p"])}
    assert len(vocab) == VOCAB
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(" ", "n"), (" ", "p")], unk_token="<|endoftext|>"))
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")



@pytest.fixture(scope="module")
def tok():
    return make_char_tokenizer()


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    return LongMemForCausalLM.from_backbone(tiny_backbone("gpt2"), small_config(segment_length=96)).eval()


def filled_memory(model, n=150, seed=1):
    g = torch.Generator().manual_seed(seed)
    memory = model.new_memory(1)
    model.memorize(torch.randint(1, VOCAB, (1, n), generator=g), memory)
    return memory


def memory_state(memory):
    return {k: v.clone() for k, v in vars(memory).items() if torch.is_tensor(v)}


# ---- suffix: chapters and candidates ------------------------------------------------------------
def test_find_chapters_on_a_hand_made_book():
    chapters = find_chapters(BOOK)
    assert [c.heading for c in chapters] == [
        "CHAPTER I", "Chapter 2", "ACT II. / SCENE I. A street.", "Chapter Four", "CHAPTER V.--The Return",
        "CHAPTER 6", "CHAPTER 7", "CHAPTER 8", "CHAPTER 9"]
    assert BOOK[chapters[0].body_start:].startswith("It was a dark")
    assert BOOK[chapters[1].body_start:chapters[1].end].rstrip().endswith("is not a heading either.")  # not headings
    assert BOOK[chapters[2].body_start:].startswith("Two servants")  # ACT + SCENE form one boundary
    assert BOOK[:chapters[0].start].rstrip().endswith("not a chapter.")
    assert chapters[-1].end == len(BOOK)


def test_negatives_come_from_the_same_book_and_never_include_the_gold(tok):
    examples = book_examples("b", BOOK, tok, opening_tokens=40, negatives=3, max_prefix=10_000, seed=0)
    chapters = find_chapters(BOOK)
    openings = [tok(BOOK[c.body_start:c.end], add_special_tokens=False)["input_ids"][:40] for c in chapters]
    # chapter 0 has no chapter before it, chapter 5 ("A short one.") is too short to be a candidate,
    # and the last chapters have fewer than 3 eligible later chapters
    assert [ex.chapter for ex in examples] == [1, 2, 3, 4]
    for ex in examples:
        assert len(ex.candidates) == 4 and ex.candidate_chapters[ex.gold] == ex.chapter
        assert ex.candidate_chapters.count(ex.chapter) == 1
        negatives = [c for c in ex.candidate_chapters if c != ex.chapter]
        assert all(c > ex.chapter and c != 5 for c in negatives)  # later chapters of this book, all eligible
        assert ex.candidates == [openings[c] for c in ex.candidate_chapters]
        assert tok.decode(ex.prefix) == BOOK[:chapters[ex.chapter].start]
    anywhere = book_examples("b", BOOK, tok, 40, 3, 10_000, seed=0, negatives_from="any")
    assert all(ex.chapter not in [c for i, c in enumerate(ex.candidate_chapters) if i != ex.gold] for ex in anywhere)
    again = book_examples("b", BOOK, tok, 40, 3, 10_000, seed=0)
    assert [e.candidate_chapters for e in again] == [e.candidate_chapters for e in examples]
    capped = book_examples("b", BOOK, tok, 40, 3, max_prefix=50, seed=0)
    assert all(len(e.prefix) == 50 and e.prefix == f.prefix[-50:] for e, f in zip(capped, examples))


# ---- scoring against direct computations ---------------------------------------------------------
def direct_logprobs(model, ids, memory=None):
    """log-softmax of one forward pass over the whole sequence (with a throwaway copy of the memory)."""
    logits = model(torch.tensor([ids]), memory=copy.deepcopy(memory)).logits[0]  # (T, V); the copy is written
    return torch.log_softmax(logits.float(), dim=-1)


@pytest.mark.parametrize("with_memory", [False, True])
def test_candidates_are_scored_as_one_sequence_and_never_change_the_memory(lm, with_memory):
    g = torch.Generator().manual_seed(3)
    context = torch.randint(1, VOCAB, (30,), generator=g).tolist()
    cands = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in (20, 7, 1)]
    memory = filled_memory(lm) if with_memory else None
    before = memory_state(memory) if with_memory else None
    with torch.no_grad():
        s = score_continuations(lm, context, cands, memory)
        for c, lp in zip(cands, s.logprobs):
            ref = direct_logprobs(lm, context + c, memory)
            want = torch.stack([ref[len(context) - 1 + i, t] for i, t in enumerate(c)])
            torch.testing.assert_close(lp, want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(s.next_token, direct_logprobs(lm, context, memory)[-1], rtol=1e-4, atol=1e-4)
    if with_memory:
        after = memory_state(memory)
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_suffix_evaluate_leaves_memory_part_and_local_context_right(lm, tok):
    ex = book_examples("b", BOOK, tok, opening_tokens=40, negatives=3, max_prefix=10_000, seed=0)[2]
    with torch.no_grad():
        d = suffix.evaluate(lm, ex, memory_size=None)
    assert d["local_tokens"] == 96 - 40 and d["prefix_tokens"] == len(ex.prefix) > 96
    assert d["memory_tokens"] == min(64, (len(ex.prefix) - 56) // 2 * 2)  # FIFO: at most the capacity, whole chunks
    assert len(d["memory"]["sum"]) == len(d["no_memory"]["mean"]) == 4


# ---- icl: label scoring ----------------------------------------------------------------------------
LABELS = ["negative", "neutral", "positive"]  # "negative" and "neutral" share their first character token


def test_label_scoring_equals_a_direct_log_prob_of_the_concatenated_prompt(lm, tok):
    p = Prompter(tok, Template("Review:", "\nSentiment:"), LABELS, max_text_tokens=20)
    demos = [p.demo(LabelledText("positive", "a fine film")), p.demo(LabelledText("negative", "dull"))]
    prompt, kept = p.context(demos, p.query("what a lovely and long story it was, truly"), 96)
    # the test text is cut to 20 tokens, and the first demonstration does not fit (96 tokens)
    assert kept == 1
    assert tok.decode(prompt) == "Review: dull\nSentiment: negative\n\nReview: what a lovely and l\nSentiment:"
    for memory in (None, filled_memory(lm)):
        with torch.no_grad():
            scores = score_labels(lm, p, prompt, memory)
            last = direct_logprobs(lm, prompt, memory)[-1]  # (V,)
            for label in LABELS:
                ids = tok(" " + label)["input_ids"]
                ref = direct_logprobs(lm, prompt + ids, memory)
                want = sum(float(ref[len(prompt) - 1 + i, t]) for i, t in enumerate(ids))  # hand-computed sum
                assert scores["label_logprob"][label] == pytest.approx(want, abs=1e-3)
                assert scores["next_token_logprob"][label] == pytest.approx(float(last[ids[0]]), abs=1e-4)
        # argmax next token: the label whose first token is most probable (ties: the first label in order)
        firsts = {label: tok(" " + label)["input_ids"][0] for label in LABELS}
        best = max(LABELS, key=lambda label: (float(last[firsts[label]]), -LABELS.index(label)))
        assert predict(scores["next_token_logprob"], LABELS) == best
        assert predict(scores["next_token_logprob"], LABELS) != "neutral"  # it ties with "negative", which comes first


def test_context_drops_demonstrations_from_the_front(tok):
    p = Prompter(tok, Template("T:", "\nL:"), ["a", "b"], max_text_tokens=50)
    demos = [p.demo(LabelledText("a", str(i) * 10)) for i in range(5)]
    n, query = len(demos[0]), p.query("x")
    for T, kept in ((200, 5), (2 * n + len(query) + 2, 2), (2 * n + len(query) + 1, 1), (len(query) + 2, 0)):
        prompt, k = p.context(demos, query, T)
        assert k == kept and prompt == [t for d in demos[5 - kept:] for t in d] + query
    with pytest.raises(Exception, match="max-demo-tokens"):
        p.context(demos, query, len(query) + 1)


def test_memory_stats_agree_with_a_real_memory(lm):
    lengths = [10, 13, 9, 12, 11, 10, 14]  # 79 tokens: 78 in whole chunks of 2, the capacity 64 keeps 14..78
    assert icl.memory_stats(lengths, capacity=64, chunk_size=2) == \
        {"demo_tokens": 79, "held_tokens": 64, "demos_held": 5, "evicted": True}  # demo 2 spans 23..31: held
    assert icl.memory_stats(lengths[:4], capacity=64, chunk_size=2) == \
        {"demo_tokens": 44, "held_tokens": 44, "demos_held": 4, "evicted": False}
    memory = lm.new_memory(1)
    lm.memorize(torch.arange(79)[None] % 90 + 1, memory)
    keys, _ = memory.tokens(0)  # (Hkv, N, D)
    assert keys.shape[1] == 64


# ---- end to end: result files, resume, determinism -------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, lm, tok):
    path = tmp_path_factory.mktemp("ckpt") / "model"
    lm.save_pretrained(path, tokenizer=tok)
    return str(path)


@pytest.fixture(scope="module")
def labelled_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("icl") / "toy.tsv"
    words = ["good", "bad", "fine", "poor", "great", "awful", "nice", "grim"]
    lines = [f"{'pos' if i % 2 == 0 else 'neg'}\t{words[i % 8]} movie number {i}" for i in range(60)]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def counting(monkeypatch, module, name):
    calls = []
    fn = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or fn(*a, **k))
    return calls


def test_icl_run_resumes_and_is_deterministic(checkpoint, labelled_file, tmp_path, monkeypatch):
    opts = IclOptions(model=checkpoint, data=labelled_file, out=str(tmp_path / "a.json"), device="cpu", seeds=2,
                      examples=3, memory_demos=12, context_demos=3, max_demo_tokens=20)
    summary = icl.run(opts)
    s = summary["toy"]
    assert s["seeds"] == [0, 1] and s["examples_per_seed"] == 3 and s["labels"] == ["neg", "pos"]
    assert s["memory_bank"]["evicted"] and s["memory_bank"]["demos_held"] < 12  # 12 demos > 64 memory tokens
    data = json.loads((tmp_path / "a.json").read_text())
    assert len(data["examples"]) == 6 and data["table"] and data["summary"] == summary
    for d in data["examples"].values():
        assert set(d["memory"]["label_logprob"]) == {"neg", "pos"} and 0 <= d["context_demos"] <= 3
    # resume: a lost example is recomputed, the others are not
    first = copy.deepcopy(data["examples"])
    del data["examples"][sorted(first)[1]]
    (tmp_path / "a.json").write_text(json.dumps(data))
    calls = counting(monkeypatch, icl, "score_labels")
    assert icl.run(opts) == summary and len(calls) == 2  # one example, with and without memory
    assert json.loads((tmp_path / "a.json").read_text())["examples"] == first
    # determinism: a fresh run gives the same results, and --limit evaluates a prefix of the same tests
    limited = icl.run(IclOptions(**{**vars(opts), "out": str(tmp_path / "b.json"), "limit": 2}))
    assert limited["toy"]["seeds"] == [0, 1] and limited["toy"]["examples_per_seed"] == 2
    b = json.loads((tmp_path / "b.json").read_text())["examples"]
    assert sorted(b) == ["toy/0/0", "toy/0/1", "toy/1/0", "toy/1/1"] and all(b[k] == first[k] for k in b)
    # another seed samples other demonstrations and tests; the same seed the same ones
    ds = icl.load_datasets(opts)[0]
    plan = lambda seed: icl.plan_seed(ds, seed, 12, 3, 5)
    assert plan(0) == plan(0) and plan(0).tests != plan(7).tests and plan(0).memory != plan(7).memory
    assert not {e.text for e in plan(0).memory + plan(0).context} & {e.text for _, e in plan(0).tests}


def test_suffix_run_resumes_and_is_deterministic(checkpoint, tmp_path, monkeypatch):
    books = tmp_path / "books"
    books.mkdir()
    (books / "test_book.txt").write_text(BOOK)
    (books / "no_chapters.txt").write_text("Just some text without any headings at all.\n")
    opts = SuffixOptions(model=checkpoint, data=str(books), out=str(tmp_path / "s.json"), device="cpu",
                         opening_tokens=40, negatives=3)
    summary = suffix.run(opts)
    assert summary["examples"] == 4 and summary["books"] == ["test_book"] and summary["chance"] == 25.0
    data = json.loads((tmp_path / "s.json").read_text())
    assert sorted(data["examples"]) == [f"test_book#{i}" for i in (1, 2, 3, 4)]
    calls = counting(monkeypatch, suffix, "evaluate")
    assert suffix.run(opts) == summary and calls == []  # everything was done already
    limited = suffix.run(SuffixOptions(**{**vars(opts), "out": str(tmp_path / "t.json"), "limit": 2}))
    assert limited["examples"] == 2 and len(calls) == 2
    t = json.loads((tmp_path / "t.json").read_text())["examples"]
    assert all(t[k] == data["examples"][k] for k in t)  # the same examples score identically in a fresh run
    with pytest.raises(Exception, match="different run"):
        suffix.run(SuffixOptions(**{**vars(opts), "seed": 1}))


def test_suffix_intervals_match_hand_computed_values():
    lo, hi = suffix.wilson(5, 20)  # textbook Wilson interval of 5/20: (0.1119, 0.4687)
    assert (round(lo, 2), round(hi, 2)) == (11.19, 46.87)
    assert suffix.wilson(0, 0) == (0.0, 100.0)
    # differences 1, 1, 0, 0: mean 0.5, sample variance 1/3, half-width 1.96 * sqrt(1/12)
    g = suffix.paired_difference([True, True, True, False], [False, False, True, False])
    assert g["points"] == 50.0 and (g["only_a"], g["only_b"]) == (2, 0)
    assert g["high"] - 50.0 == pytest.approx(100 * 1.96 * (1 / 12) ** 0.5) and g["low"] == pytest.approx(100 - g["high"])
    g = suffix.paired_difference([True, False], [False, True])
    assert (g["points"], g["only_a"], g["only_b"]) == (0.0, 1, 1)


def test_suffix_summary_reports_the_paired_gain():
    def detail(gold, mem_best, plain_best):
        m = [0.0] * 3
        p = [0.0] * 3
        m[mem_best], p[plain_best] = 1.0, 1.0
        return {"book": "b", "gold": gold, "memory_tokens": 10, "local_tokens": 5,
                "memory": {"sum": m, "mean": m}, "no_memory": {"sum": p, "mean": p}}
    details = [detail(0, 0, 1), detail(0, 0, 0), detail(1, 1, 2), detail(2, 0, 2)]
    summary, table = suffix.summarize(details, negatives=2)
    assert summary["accuracy"]["memory"]["mean"] == 75.0 and summary["accuracy"]["no_memory"]["mean"] == 50.0
    gain = summary["memory_minus_no_memory"]["mean"]
    assert (gain["points"], gain["only_a"], gain["only_b"]) == (25.0, 2, 1)
    assert "+25.0" in table and "(2 vs 1)" in table
