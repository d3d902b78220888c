"""`longmem eval report` on real (tiny) result files: tables copied, plots drawn, bad input refused."""

import json

import pytest

from longmem.errors import LongMemError
from longmem.eval import passkey, ppl
from longmem.eval.passkey import PasskeyOptions
from longmem.eval.ppl import PplOptions
from longmem.eval.report import write_report


def test_report_from_ppl_and_passkey(checkpoint, docs, tmp_path):
    pp = ppl.run(PplOptions(model=checkpoint, data=docs, out=str(tmp_path / "ppl.json"), device="cpu",
                            memory_sizes="32,64"))
    pk = passkey.run(PasskeyOptions(model=checkpoint, out=str(tmp_path / "pk.json"), device="cpu",
                                    lengths="128,256", depths="0.1,0.9", trials=1, new_tokens=2))
    out = write_report([tmp_path / "ppl.json", tmp_path / "pk.json"], tmp_path / "report.md")
    text = out.read_text()
    assert json.loads((tmp_path / "ppl.json").read_text())["table"] in text
    assert json.loads((tmp_path / "pk.json").read_text())["table"] in text
    for name in ("ppl-buckets", "ppl-memory", "passkey-grid"):
        png = tmp_path / f"report-{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({png.name})" in text
    assert pp["rows"] and pk["accuracy"]
    (tmp_path / "bad.json").write_text(json.dumps({"task": "ppl", "summary": None}))
    with pytest.raises(LongMemError, match="not a finished"):
        write_report([tmp_path / "bad.json"], tmp_path / "r2.md")
