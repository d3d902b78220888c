"""The default tokenizer: byte-level BPE (GPT-2 style) trained on the train split.

Byte-level means every string round-trips exactly (`decode(encode(text)) == text`), with no
unknown token. `<|endoftext|>` is the only special token and serves as bos, eos and pad;
nothing is added to encodings automatically. The result is saved with
`PreTrainedTokenizerFast.save_pretrained`, so `PreTrainedTokenizerFast.from_pretrained(out_dir)`
(or `AutoTokenizer`) loads it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from longmem.data.documents import Document
from longmem.errors import LongMemError

EOT = "<|endoftext|>"


def train_tokenizer(documents: Sequence[Document], out_dir: str | os.PathLike, vocab_size: int = 8192,
                    show_progress: bool = False) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE of `vocab_size` tokens (256 bytes + merges + `<|endoftext|>`) on
    `documents` (which must not include dev documents) and save it to `out_dir`; deterministic."""
    if not documents:
        raise LongMemError("no documents to train the tokenizer on; pass a non-empty train split")
    if dev := [d.id for d in documents if d.split == "dev"]:
        raise LongMemError(f"{len(dev)} dev documents (e.g. {dev[0]}) were passed to train the tokenizer; "
                           "load the train split instead")
    if vocab_size <= 257:
        raise LongMemError(f"vocab_size {vocab_size} is too small; use more than 257 (256 bytes + {EOT})")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=show_progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator((d.text for d in documents), trainer, length=len(documents))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=EOT, eos_token=EOT, pad_token=EOT,
                                        clean_up_tokenization_spaces=False)
    _save(tokenizer, Path(out_dir))
    return tokenizer


def _save(tokenizer: PreTrainedTokenizerFast, out_dir: Path) -> None:
    """`save_pretrained`, each file moved into `out_dir` atomically (other files there are kept)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tokenizer-", dir=out_dir))
    try:
        tokenizer.save_pretrained(staging)
        for f in staging.iterdir():
            os.replace(f, out_dir / f.name)
    except OSError as e:
        raise LongMemError(f"cannot save the tokenizer to {out_dir}: {e.strerror}; check the path and free disk space") from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)
