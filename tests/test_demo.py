"""`longmem demo` end to end on a tiny checkpoint (the book is replaced by a short text: no download)."""

import pytest

from conftest import TEXT
import longmem.demo as demo


@pytest.mark.parametrize("retriever", [None, "torch-ivf"])
def test_demo_runs_every_phase(checkpoint, monkeypatch, capsys, retriever):
    monkeypatch.setattr(demo, "load_book", lambda cfg: TEXT * 14)
    # the test tokenizer has no whole-word tokens, so no name to pick: take the first far-reference target
    monkeypatch.setattr(demo, "pick_example", lambda tok, ids, far, first: int(far.nonzero()[0]))
    demo.run_demo(demo.DemoConfig(model=checkpoint, score_tokens=96, device="cpu", retriever=retriever))
    out = capsys.readouterr().out
    for line in ("| frozen backbone, local segment only |", "| LongMem, memory disabled |",
                 "| LongMem, memory (64 tokens) |", "far-reference tokens:", "demo finished in"):
        assert line in out, out
    assert "  without memory :" in out and "  with memory    :" in out, out  # the generation phase ran
