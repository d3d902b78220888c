"""Data preparation, loading and the default tokenizer, on tiny fixtures (no network)."""

import base64
import gzip
import hashlib
import json
import struct
import sys
import zlib

import pytest

from longmem.data import prepare as prep
from longmem.data.documents import Document, load_documents, load_labelled
from longmem.data.sources import Extracted, Source, brown_paragraphs, clean, fetch, read_lazyload_db, read_r, stdlib, strip_gutenberg
from longmem.data.tokenizer import EOT, train_tokenizer
from longmem.errors import LongMemError

# ---------------------------------------------------------------- R serialization


def r_serialize(obj) -> bytes:
    """Reference writer: XDR version-2 R serialization of character vectors (lists of str/None),
    integer vectors (lists of int) and named lists (dicts)."""
    out = [b"X\n", struct.pack(">iii", 2, 0x040201, 0x020300)]

    def char(s):
        out.append(struct.pack(">ii", 9, -1) if s is None else struct.pack(">ii", 9 | (1 << 3) << 12, len(s.encode())) + s.encode())

    def item(o):
        if isinstance(o, dict):  # VECSXP with attributes: pairlist(names = <STRSXP>)
            out.append(struct.pack(">ii", 19 | 1 << 9, len(o)))
            for v in o.values():
                item(v)
            out.append(struct.pack(">ii", 2 | 1 << 10, 1))  # LISTSXP with tag, then SYMSXP
            char("names")
            item(list(o))
            out.append(struct.pack(">i", 254))
        elif all(isinstance(v, int) for v in o) and o:
            out.append(struct.pack(f">ii{len(o)}i", 13, len(o), *o))
        else:
            out.append(struct.pack(">ii", 16, len(o)))
            for s in o:
                char(s)

    item(obj)
    return b"".join(out)


def lazyload_db(objects: dict, gzip_index: bool) -> tuple[bytes, bytes]:
    """(rdx, rdb) bytes of an R lazy-load database holding `objects`."""
    rdb, index = b"", {}
    for name, obj in objects.items():
        payload = r_serialize(obj)
        blob = struct.pack(">i", len(payload)) + zlib.compress(payload)
        index[name], rdb = [len(rdb), len(blob)], rdb + blob
    raw = r_serialize({"variables": index, "compressed": [1]})
    return (gzip.compress(raw) if gzip_index else struct.pack(">i", len(raw)) + zlib.compress(raw)), rdb


@pytest.mark.parametrize("gzip_index", [True, False])
def test_r_lazyload_round_trip(gzip_index):
    books = {"emma": ["EMMA", "", "CHAPTER I", "", "Emma Woodhouse, handsome,", "clever, and rich", None, "Ç'est très bien"],
             "persuasion": ["Persuasion", ""]}
    assert read_lazyload_db(*lazyload_db(books, gzip_index)) == books


# The real janeaustenr Rdata.rdx index as R wrote it (format version 3, symbols shared by reference).
JANEAUSTENR_RDX = base64.b64decode(
    "H4sIAAAAAAAAA1WQ0UrDMBSG/6apsEJnxT3BLhXvBYeXPoGCFxNJ2zMXbdKSbMIewjfxAQTxKXwcQU3TkLGLk/z/d8LJn9znAFJw"
    "liDNnER2d3tzcQmwU98Y9yNXhSsGf+TxPPpBZ8u36PPPD7D3ZfTFegb2fRZ9eXUNPv+KfvbwA36ygEvgfAKOyXCDFoqsE6W/fISc"
    "lBJBF0pou5LUNr0wLwEe685s1kI/kRFVRbuA856M3QorOx3ItDeyod7Q87aRNQVaWtKWhkVWspWbnWO/4QMwBkz+QiaMPeQ+tK+D"
    "fhpmTl6FkaJq3WNCGEMrMqTrPak75aJYS80w9B/7URx+kQEAAA==")


def test_r_reader_on_real_index():
    index = read_r(gzip.decompress(JANEAUSTENR_RDX))
    assert list(index["variables"]) == ["emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility"]
    assert index["variables"]["emma"][0] == 0 and index["compressed"] == [1]


# ---------------------------------------------------------------- text clean-up


def test_brown_tags_stripped_and_detokenised():
    tagged = ("\n\n\tThe/at jury/nn said/vbd ``/`` no/at ''/'' ,/, Mr./np Allen/np Jr./np ./.\n\n\n"
              "Merger/nn-hl proposed/vbn-hl\nHowever/wrb (/( 1/2/cd )/) it/pps ended/vbd ./.\n")
    assert brown_paragraphs(tagged) == ['The jury said "no", Mr. Allen Jr.', "Merger proposed", "However (1/2) it ended."]


def test_gutenberg_boilerplate_stripped():
    text = ("The Project Gutenberg EBook of Hamlet\nLicense blah\n*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\n\r\n"
            "ACT I.\r\nWho's there?\n\nEnd of the Project Gutenberg EBook of Hamlet\n*** END OF THIS PROJECT GUTENBERG EBOOK ***\nmore\n")
    assert clean(strip_gutenberg(text)) == "ACT I.\nWho's there?\n"
    assert strip_gutenberg("ACT I.\nno boilerplate\n") == "ACT I.\nno boilerplate\n"


def test_stdlib_source_skips_tests(tmp_path):
    ids = stdlib(tmp_path).documents.keys()
    assert "json/__init__" in ids and "asyncio/base_events" in ids
    assert not [i for i in ids if i.startswith("test/") or "/tests/" in i or i.rsplit("/", 1)[-1].startswith("test_")]


# ---------------------------------------------------------------- split and prepare


def test_split_is_fixed_and_hash_based():
    split = prep.Split.load()
    assert split("austen/persuasion") == split("shakespeare/hamlet") == "dev"
    assert split("austen/emma") == split("milton/comus") == "train"
    ids = [f"{source}/doc{i}" for source in ("brown", "linux-docs") for i in range(2000)]
    reference = ["dev" if int(hashlib.sha256(i.encode()).hexdigest()[:8], 16) % 1000 < 50 else "train" for i in ids]
    assert [split(i) for i in ids] == [prep.Split.load()(i) for i in ids] == reference
    assert 0.03 < reference.count("dev") / len(ids) < 0.07


def toy_source(calls: list) -> Source:
    def extract(cache):
        calls.append(cache)
        documents = {f"c{i:02d}": f"Paragraph {i}.\n" for i in range(60)}
        return Extracted(documents, {"brown-genres": [("news", "A\tlong\nstory"), ("fiction", "Once upon")]})
    return Source("brown", "public-domain", extract)


def test_prepare_writes_splits_and_is_idempotent(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setitem(prep.SOURCES, "brown", toy_source(calls))
    manifest = prep.prepare(tmp_path, ["brown"], show_progress=False)
    assert len(calls) == 1 and len(manifest.documents) == 60
    train, dev = load_documents(tmp_path, "train"), load_documents(tmp_path, "dev")
    assert {d.id for d in dev} == {d.id for d in manifest.documents if prep.Split.load()(d.id) == "dev"} and dev
    assert len(train) + len(dev) == 60 and train[0].text == "Paragraph 0.\n"
    assert [(e.label, e.text) for e in load_labelled("brown-genres", tmp_path)] == [("news", "A long story"), ("fiction", "Once upon")]
    summary = manifest.summary()["brown"]
    assert summary["train"]["documents"] + summary["dev"]["documents"] == 60

    before = (tmp_path / "manifest.json").read_bytes()
    prep.prepare(tmp_path, ["brown"], show_progress=False)
    assert len(calls) == 1 and (tmp_path / "manifest.json").read_bytes() == before  # skipped
    (tmp_path / "train" / f"{train[0].id}.txt").write_text("tampered")
    prep.prepare(tmp_path, ["brown"], show_progress=False)
    assert len(calls) == 2 and load_documents(tmp_path)[0].text == "Paragraph 0.\n"  # redone


def test_failed_source_names_it_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setitem(prep.SOURCES, "brown", toy_source([]))
    failing = [sys.executable, "-c", "import sys; sys.exit('registry unreachable')"]
    monkeypatch.setitem(prep.SOURCES, "vader", Source("vader", "MIT", lambda cache: Extracted({"x": str(fetch(cache, "pip-x", failing))})))
    with pytest.raises(LongMemError, match="source 'vader'.*registry unreachable"):
        prep.prepare(tmp_path, ["brown", "vader"], show_progress=False)
    assert json.loads((tmp_path / "manifest.json").read_text())["sources"] == ["brown"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "dev", "labelled", "manifest.json", "train"]
    assert list((tmp_path / "cache").iterdir()) == []
    with pytest.raises(LongMemError, match="unknown source"):
        prep.prepare(tmp_path, ["nope"], show_progress=False)


# ---------------------------------------------------------------- loading user files


def test_user_txt_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("first document\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text('{"text": "line one"}\n\n{"text": "line two", "id": 7}\n')
    (tmp_path / ".hidden.txt").write_text("skipped")
    docs = load_documents(tmp_path)
    assert [(d.id, d.text, d.split) for d in docs] == [
        ("a", "first document\n", "train"), ("sub/b#1", "line one", "train"), ("sub/b#3", "line two", "train")]
    assert [d.id for d in load_documents(tmp_path / "a.txt", split="dev")] == ["a"]


@pytest.mark.parametrize("name, content, message", [
    ("empty.txt", b"  \n", "is empty"),
    ("nul.txt", b"abc\x00def", "binary"),
    ("latin1.txt", "caf\xe9".encode("latin-1"), "not UTF-8"),
    ("bad.jsonl", b'{"text": "ok"}\n{"body": "no text"}\n', 'line 2 has no non-empty "text"'),
    ("broken.jsonl", b'{"text": "ok"\n', "line 1 is not valid JSON"),
])
def test_bad_user_files_name_the_file(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(LongMemError, match=message) as err:
        load_documents(tmp_path)
    assert str(tmp_path / name) in str(err.value) and "\n" not in str(err.value)


def test_missing_paths(tmp_path):
    with pytest.raises(LongMemError, match="nowhere.*does not exist"):
        load_documents(tmp_path / "nowhere")
    with pytest.raises(LongMemError, match="no .txt or .jsonl"):
        load_documents(tmp_path)
    with pytest.raises(LongMemError, match="'vader-movies' is not in"):
        load_labelled("vader-movies", tmp_path)
    (tmp_path / "l.tsv").write_text("pos\tgood\nno tab here\n")
    with pytest.raises(LongMemError, match="l.tsv, line 2 is not 'label<TAB>text'"):
        load_labelled(tmp_path / "l.tsv")


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip_loads_and_is_deterministic(tmp_path):
    from transformers import PreTrainedTokenizerFast

    texts = ["It is a truth universally acknowledged, that a single man in possession of a good fortune",
             "def f(x):\n    return x  # comment\n", "To be, or not to be: that is the question."] * 20
    docs = [Document(f"toy/{i}", t, "toy", "train") for i, t in enumerate(texts)]
    train_tokenizer(docs, tmp_path / "a", vocab_size=300)
    train_tokenizer(docs, tmp_path / "b", vocab_size=300)
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    tok = PreTrainedTokenizerFast.from_pretrained(tmp_path / "a")
    assert len(tok) == 300 and tok.eos_token == tok.bos_token == tok.pad_token == EOT
    for text in [texts[0], "  leading spaces\n\ttabs\r\nand ünïcödé — 漢字 😀", f"one{EOT}two", "xyz ,. !?"]:
        assert tok.decode(tok(text)["input_ids"]) == text
    with pytest.raises(LongMemError, match="dev documents"):
        train_tokenizer([Document("toy/0", "x", "toy", "dev")], tmp_path / "c")
