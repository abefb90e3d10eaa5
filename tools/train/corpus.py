"""The training corpus of the bundled model: Jane Austen's six novels as
Debian's r-cran-janeaustenr ships them, read without R.

The package stores each novel as a character vector (one element per
printed line) in an R lazy-load database (data/Rdata.rdx + Rdata.rdb).
This module reads that format: the .rdx index is a gzip'd serialized R
list naming, for each variable, an (offset, length) pair in the .rdb;
each .rdb record is a 4-byte big-endian length followed by a zlib stream
holding one serialized R object (XDR format, version 2 or 3).  Only the
object types the package uses are decoded (vectors, pairlists, symbols,
strings, references); anything else is refused with the type named.

Lines are then joined into paragraphs (blank lines separate them), and a
fixed part of every novel is set aside as the held-out split.
"""

import glob
import gzip
import os
import re
import shutil
import struct
import subprocess
import tempfile
import zlib

PACKAGE = "r-cran-janeaustenr"
INSTALLED_DIR = "/usr/lib/R/site-library/janeaustenr"
LICENCE = ("novels: public domain (first published 1811-1818); "
           "packaging: MIT (Julia Silge; Debian: Andreas Tille)")

# Variable names in the package, in publication order, with titles.
NOVELS = (
    ("sensesensibility", "Sense & Sensibility"),
    ("prideprejudice", "Pride & Prejudice"),
    ("mansfieldpark", "Mansfield Park"),
    ("emma", "Emma"),
    ("northangerabbey", "Northanger Abbey"),
    ("persuasion", "Persuasion"),
)


class CorpusError(Exception):
    pass


# ------------------------------------------------------- R serialization
# SEXP type numbers (R internals manual, "Serialization formats").
_NILSXP, _SYMSXP, _LISTSXP, _CLOSXP, _ENVSXP = 0, 1, 2, 3, 4
_LGLSXP, _INTSXP, _REALSXP, _CPLXSXP, _STRSXP = 10, 13, 14, 15, 16
_CHARSXP, _VECSXP, _EXPRSXP, _RAWSXP = 9, 19, 20, 24
_REFSXP, _NILVALUE_SXP, _GLOBALENV_SXP = 255, 254, 253
_EMPTYENV_SXP, _BASEENV_SXP, _MISSINGARG_SXP = 242, 241, 251
_BASENAMESPACE_SXP, _UNBOUNDVALUE_SXP = 247, 252
_ALTREP_SXP = 238


class RList(list):
    """A decoded R list or vector; R attributes (names, class, ...) are
    kept in .attrs."""
    attrs = None


class _RReader:
    def __init__(self, buf):
        self.b = buf
        self.p = 0
        self.refs = []

    def int(self):
        v = struct.unpack_from(">i", self.b, self.p)[0]
        self.p += 4
        return v

    def bytes(self, n):
        if self.p + n > len(self.b):
            raise CorpusError("serialized R object truncated")
        s = self.b[self.p:self.p + n]
        self.p += n
        return s

    def header(self):
        fmt = self.bytes(2)
        if fmt != b"X\n":
            raise CorpusError("R serialization format %r is not XDR" % fmt)
        version = self.int()
        self.int()          # R version that wrote it
        self.int()          # oldest R version that can read it
        if version == 3:
            n = self.int()
            self.bytes(n)   # native encoding name
        elif version != 2:
            raise CorpusError("R serialization version %d" % version)

    def item(self):
        flags = self.int()
        t = flags & 0xFF
        has_attr = flags & (1 << 9)
        has_tag = flags & (1 << 10)
        if t == _NILVALUE_SXP:
            return None
        if t in (_EMPTYENV_SXP, _BASEENV_SXP, _GLOBALENV_SXP,
                 _UNBOUNDVALUE_SXP, _MISSINGARG_SXP, _BASENAMESPACE_SXP):
            return None
        if t == _REFSXP:
            idx = flags >> 8
            if idx == 0:
                idx = self.int()
            return self.refs[idx - 1]
        if t == _SYMSXP:
            name = self.item()
            self.refs.append(name)
            return name
        if t == _CHARSXP:
            n = self.int()
            if n == -1:
                return None
            return self.bytes(n).decode("utf-8", errors="replace")
        if t == _LISTSXP:
            out = RList()
            attrs = self.item() if has_attr else None
            tag = self.item() if has_tag else None
            out.append((tag, self.item()))
            rest = self.item()
            if isinstance(rest, RList):
                out.extend(rest)
            out.attrs = attrs
            return out
        if t in (_LGLSXP, _INTSXP):
            n = self.int()
            v = RList(struct.unpack_from(">%di" % n, self.b, self.p))
            self.p += 4 * n
        elif t == _REALSXP:
            n = self.int()
            v = RList(struct.unpack_from(">%dd" % n, self.b, self.p))
            self.p += 8 * n
        elif t == _STRSXP:
            n = self.int()
            v = RList(self.item() for _ in range(n))
        elif t in (_VECSXP, _EXPRSXP):
            n = self.int()
            v = RList(self.item() for _ in range(n))
        elif t == _RAWSXP:
            n = self.int()
            v = RList(self.bytes(n))
        else:
            raise CorpusError("R object type %d not supported here" % t)
        if has_attr:
            v.attrs = self.item()
        return v


def unserialize(buf):
    """Decode one XDR-serialized R object from @buf (bytes)."""
    r = _RReader(buf)
    r.header()
    return r.item()


def _pairs(plist):
    return {tag: val for tag, val in plist} if plist else {}


def _named(vec):
    """Named R list -> dict."""
    names = _pairs(vec.attrs).get("names")
    if names is None or len(names) != len(vec):
        raise CorpusError("R list without names")
    return dict(zip(names, vec))


def read_lazyload(base):
    """Every variable of the lazy-load database @base (.rdx/.rdb without
    the extension), as {name: decoded object}."""
    with open(base + ".rdx", "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    else:
        raw = zlib.decompress(raw[4:])
    index = _named(unserialize(raw))
    variables = _named(index["variables"])
    out = {}
    with open(base + ".rdb", "rb") as f:
        rdb = f.read()
    for name, (off, length) in variables.items():
        rec = rdb[int(off):int(off) + int(length)]
        n = struct.unpack(">I", rec[:4])[0]
        body = zlib.decompress(rec[4:])
        if len(body) != n:
            raise CorpusError("%s: record %s is %d bytes, header says %d"
                              % (base, name, len(body), n))
        out[name] = unserialize(body)
    return out


# ------------------------------------------------------------ the package
def find_package(workdir=None):
    """Directory of the installed janeaustenr R package.  When it is not
    installed, the Debian package is fetched with `apt-get download` into
    @workdir (or a temporary folder) and unpacked there; nothing is
    installed."""
    if os.path.exists(os.path.join(INSTALLED_DIR, "data", "Rdata.rdb")):
        return INSTALLED_DIR
    workdir = workdir or tempfile.mkdtemp(prefix="kvq-corpus-")
    os.makedirs(workdir, exist_ok=True)
    debs = glob.glob(os.path.join(workdir, PACKAGE + "_*.deb"))
    if not debs:
        if shutil.which("apt-get") is None:
            raise CorpusError("%s is not installed and apt-get is missing"
                              % PACKAGE)
        r = subprocess.run(["apt-get", "download", PACKAGE], cwd=workdir,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        debs = glob.glob(os.path.join(workdir, PACKAGE + "_*.deb"))
        if r.returncode or not debs:
            raise CorpusError("apt-get download %s failed:\n%s"
                              % (PACKAGE, r.stdout.decode(errors="replace")))
    root = os.path.join(workdir, "root")
    subprocess.run(["dpkg-deb", "-x", debs[0], root], check=True)
    d = os.path.join(root, INSTALLED_DIR.lstrip("/"))
    if not os.path.exists(os.path.join(d, "data", "Rdata.rdb")):
        raise CorpusError("%s holds no data/Rdata.rdb" % debs[0])
    return d


def package_version(pkgdir):
    """Version field of the R package's DESCRIPTION."""
    with open(os.path.join(pkgdir, "DESCRIPTION"), encoding="utf-8") as f:
        for line in f:
            if line.startswith("Version:"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def read_novels(pkgdir):
    """[(title, [line, ...]), ...] in publication order."""
    data = read_lazyload(os.path.join(pkgdir, "data", "Rdata"))
    out = []
    for var, title in NOVELS:
        if var not in data:
            raise CorpusError("variable %s missing from the package" % var)
        lines = [s if s is not None else "" for s in data[var]]
        out.append((title, lines))
    return out


# ------------------------------------------------------------- cleaning
_CHAPTER = re.compile(r"^\s*(CHAPTER|Chapter|VOLUME|Volume)\b[\s\w.]*$")
_SPACES = re.compile(r"[ \t]+")


def paragraphs(lines):
    """Join printed lines into paragraphs; drop chapter and volume
    headings and the underscores used for italics."""
    out, cur = [], []
    for line in lines + [""]:
        s = line.strip()
        if not s or _CHAPTER.match(s):
            if cur:
                p = _SPACES.sub(" ", " ".join(cur)).replace("_", "")
                p = p.strip()
                if p:
                    out.append(p)
                cur = []
            continue
        cur.append(s)
    return out


def split_novel(paras, every=20, blocks=100):
    """Cut a novel's paragraphs into @blocks contiguous blocks of about
    equal size; of each run of @every blocks the middle one goes to the
    validation split and the last one to the held-out split, so both come
    from all parts of the book.  Returns (train, val, heldout) lists of
    paragraphs."""
    n = len(paras)
    out = ([], [], [])
    for b in range(blocks):
        part = paras[b * n // blocks:(b + 1) * n // blocks]
        k = b % every
        out[2 if k == every - 1 else 1 if k == every // 2 - 1 else 0] \
            .extend(part)
    return out


def build(outdir, workdir=None, every=20):
    """Write @outdir/train.txt, val.txt and heldout.txt (one paragraph a
    line, UTF-8) and return a dict describing the corpus."""
    pkgdir = find_package(workdir)
    novels = read_novels(pkgdir)
    os.makedirs(outdir, exist_ok=True)
    splits = {"train": [], "val": [], "heldout": []}
    for _, lines in novels:
        for key, part in zip(("train", "val", "heldout"),
                             split_novel(paragraphs(lines), every)):
            splits[key] += part
    info = {
        "package": PACKAGE,
        "package_version": package_version(pkgdir),
        "licence": LICENCE,
        "novels": [t for t, _ in novels],
        "split_rule": "100 contiguous blocks per novel; of every %d, "
                      "block %d is validation and block %d held out"
                      % (every, every // 2, every),
    }
    for key, paras in splits.items():
        with open(os.path.join(outdir, key + ".txt"), "w",
                  encoding="utf-8") as f:
            f.write("\n".join(paras) + "\n")
        info[key + "_paragraphs"] = len(paras)
        info[key + "_bytes"] = sum(len(p.encode()) + 1 for p in paras)
    return info
