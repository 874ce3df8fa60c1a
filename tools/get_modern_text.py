"""Modern English texts for the SmolLM2 table (the analogue of the paper's WikiText / C4), from Debian packages.

- debian-handbook (The Debian Administrator's Handbook, GPL-2+ or CC-BY-SA-3.0), English HTML, split by chapter:
  assets/data/handbook_train.jsonl: QAT-real (modern)'s training text;
  assets/data/handbook_heldout.jsonl: the held-out chapters (HELDOUT_CHAPTERS), never trained on.
- python3.11-doc (the Python documentation, PSF License), the tutorial and HOWTO sources (reST), prose only:
  assets/data/pydocs_heldout.jsonl: the tutorial, a held-out text from a second source;
  assets/data/pydocs_howto.jsonl: the HOWTOs, one text each, the source of the pydocs_nextsentence task
  (tools/make_nextline_task.py --task pydocs_nextsentence).

    python tools/get_modern_text.py                 # apt-get download (Debian's archive), or:
    python tools/get_modern_text.py --deb_dir DIR   # the two .deb files already here (offline)

The repository ships the outputs (assets/data/MODERN_TEXT_LICENSES.md); this tool remakes them. Every .deb is
checked against its recorded sha256, everything is read before anything is written, each file is written
atomically, and a second run with the same packages writes the same bytes.
"""
import argparse
import glob
import hashlib
import html
import os
import re
import shutil
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from make_tiny_model import chunk_text  # noqa: E402  (~1500-3000 characters at paragraph breaks, as the plays)
from utils.data import write_texts  # noqa: E402
from utils.errors import InputError, cli  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "assets" / "data"
PACKAGES = {  # name: (version, sha256 of the .deb)
    "debian-handbook": ("11.20220922", "3d5dbeac1f1afc9c094eab9d0f701f6ecff99c4927d5a4794cf6c85678134faa"),
    "python3.11-doc": ("3.11.2-6+deb12u9", None),  # security updates change it: the version is checked, not the hash
}
HANDBOOK = "usr/share/doc/debian-handbook/html/en-US"
PYDOCS = "usr/share/doc/python3.11/html/_sources"
# Three chapters spread over the book (7, 9, 13; ~14% of its words) are held out: enough for 64 windows of 256
# tokens, while the rest still holds the table's 153,600 training tokens.
HELDOUT_CHAPTERS = ("solving-problems.html", "unix-services.html", "workstation.html")
TITLE = "The Debian Administrator's Handbook"  # every page's running header
BLOCK = {"p", "div", "h1", "h2", "h3", "h4", "h5", "li", "dt", "dd", "tr", "table", "br", "blockquote"}
SKIP = {"pre", "script", "style", "head", "title"}  # command lines and terminal output are not prose


class Prose(HTMLParser):
    """The text of a DocBook page's body: paragraphs and headings, without <pre> blocks or navigation."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts, self.skip = [], 0

    def handle_starttag(self, tag, attrs):
        if tag in SKIP:
            self.skip += 1
        elif tag in BLOCK and not self.skip:
            self.parts.append("\n\n")

    def handle_endtag(self, tag):
        if tag in SKIP:
            self.skip = max(0, self.skip - 1)
        elif tag in BLOCK and not self.skip:
            self.parts.append("\n\n")

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(data)

    def text(self):
        pars = (re.sub(r"\s+", " ", p).strip() for p in "".join(self.parts).split("\n\n"))
        return "\n\n".join(p for p in pars if len(p.split()) >= 4 and p != TITLE)  # no lone labels, no running title


def page_prose(path):
    """A handbook page's prose: the content between the navigation header and footer."""
    page = Path(path).read_text(encoding="utf-8")
    body = re.sub(r'<div class="navheader">.*?</div>|<div class="navfooter">.*?</div>\s*</body>', "", page,
                  flags=re.S)
    body = re.sub(r'<div class="toc">.*?</dl></div>', "", body, flags=re.S)  # a chapter page's table of contents
    parser = Prose()
    parser.feed(body)
    return parser.text()


def handbook_chapters(root):
    """[(chapter page, title, prose)] in the book's order, each chapter with its section pages."""
    index = Path(root, "index.html").read_text(encoding="utf-8")
    toc = index[index.find('class="toc"'):]
    entries = re.findall(r'<span class="(chapter|appendix|preface|section)"><a href="([^"#]+)(?:#[^"]*)?">([^<]+)</a>',
                         toc)
    chapters = []
    for kind, page, title in entries:
        if kind in ("chapter", "appendix", "preface"):
            chapters.append([page, html.unescape(title), [page]])
        elif chapters and page not in chapters[-1][2]:
            chapters[-1][2].append(page)
    return [(page, title, "\n\n".join(filter(None, (page_prose(Path(root, p)) for p in pages))))
            for page, title, pages in chapters]


ROLE = re.compile(r":[a-z:]+:`([^`]*)`")  # :func:`abs`, :ref:`text <label>`, :meth:`~a.b` -> abs, text, a.b


def rst_prose(text):
    """The prose paragraphs of a reST source: no code blocks, directives, tables, titles or interactive examples;
    inline markup reduced to its text."""
    pars, out = re.split(r"\n\s*\n", text), []
    in_literal = False
    for par in pars:
        lines = par.split("\n")
        indented = all(l.startswith((" ", "\t")) for l in lines if l.strip())
        if in_literal and indented:
            continue  # the indented block after "::"
        in_literal = False
        first = lines[0].strip()
        if (indented or first.startswith(("..", ">>>", "+", "|", "=", "*", "-", "$", "#")) or
                re.fullmatch(r"[=\-~^*#\"'`+]{3,}", lines[-1].strip() or "x")):
            in_literal = par.rstrip().endswith("::")
            continue
        in_literal = par.rstrip().endswith("::")
        p = " ".join(l.strip() for l in lines)
        p = ROLE.sub(lambda m: m.group(1).split("<")[0].strip().lstrip("~"), p)
        p = re.sub(r"`([^`<]+?)\s*<[^>]+>`_+", r"\1", p)  # `link text <url>`_
        p = re.sub(r"\s*\[#?\w*\]_", "", p)  # footnote references
        p = re.sub(r"``([^`]+)``", r"\1", p)
        p = re.sub(r"\*\*?([^*]+)\*\*?", r"\1", p)
        p = re.sub(r"`([^`]+)`_*", r"\1", p).replace("::", ":").replace("\\", "")
        p = re.sub(r"\s+", " ", p).strip()
        if len(p.split()) >= 8 and re.search(r"[a-z]{3}", p):
            out.append(p)
    return "\n\n".join(out)


def sha256_of(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def find_debs(deb_dir, tmp):
    """{package: .deb path}: from deb_dir, else downloaded with apt-get (Debian's archive)."""
    if deb_dir is None:
        if shutil.which("apt-get") is None:
            raise InputError("apt-get not found: download the .deb files of "
                             f"{', '.join(f'{k}={v[0]}' for k, v in PACKAGES.items())} and pass --deb_dir DIR")
        specs = [f"{k}={v}" for k, (v, _) in PACKAGES.items()]
        proc = subprocess.run(["apt-get", "download", *specs], cwd=tmp, capture_output=True, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise InputError(f"apt-get download {' '.join(specs)} failed ({last}); run 'apt-get update' first, "
                             "or pass --deb_dir DIR holding the two .deb files")
        deb_dir = tmp
    debs = {}
    for name, (version, digest) in PACKAGES.items():
        found = sorted(glob.glob(os.path.join(deb_dir, f"{name}_*.deb")))
        if not found:
            raise InputError(f"--deb_dir {deb_dir!r}: no {name}_*.deb in it (wanted version {version})")
        deb = found[-1]
        got = Path(deb).name.split("_")[1].replace("%2b", "+")
        if got != version:
            raise InputError(f"{deb}: version {got}, wanted {version} (the shipped texts were made from it)")
        if digest and sha256_of(deb) != digest:
            raise InputError(f"{deb}: sha256 is not the recorded {digest}; not using it")
        debs[name] = deb
    return debs


def extract(deb, into):
    if shutil.which("dpkg-deb") is None:
        raise InputError("dpkg-deb not found (Debian's dpkg): needed to unpack the .deb files")
    subprocess.run(["dpkg-deb", "-x", deb, into], check=True)
    return into


def make_texts(handbook_root, pydocs_root):
    """{output file name: texts}: the handbook split by chapter, the tutorial, the HOWTOs' prose (one text each)."""
    train, heldout = [], []
    for page, _title, prose in handbook_chapters(handbook_root):
        (heldout if page in HELDOUT_CHAPTERS else train).extend(chunk_text(prose))
    tutorial = [rst_prose(Path(f).read_text(encoding="utf-8"))
                for f in sorted(glob.glob(os.path.join(pydocs_root, "tutorial", "*.rst.txt")))]
    howto = [rst_prose(Path(f).read_text(encoding="utf-8"))
             for f in sorted(glob.glob(os.path.join(pydocs_root, "howto", "*.rst.txt")))]
    out = {"handbook_train.jsonl": train, "handbook_heldout.jsonl": heldout,
           "pydocs_heldout.jsonl": [c for t in tutorial for c in chunk_text(t)],
           "pydocs_howto.jsonl": [t for t in howto if t]}
    for name, texts in out.items():
        if not texts or not any(texts):
            raise InputError(f"{name}: no text extracted (an unexpected package layout)")
    return out


def prepare(deb_dir=None, out_dir=OUT):
    """Write the modern texts into out_dir; returns {file: (texts, characters)}."""
    with tempfile.TemporaryDirectory() as tmp:
        debs = find_debs(deb_dir, tmp)
        hb = extract(debs["debian-handbook"], os.path.join(tmp, "hb"))
        py = extract(debs["python3.11-doc"], os.path.join(tmp, "py"))
        texts = make_texts(os.path.join(hb, HANDBOOK), os.path.join(py, PYDOCS))
    os.makedirs(out_dir, exist_ok=True)
    done = {}
    for name, items in texts.items():
        path = os.path.join(out_dir, name)
        write_texts(path, items)
        done[path] = (len(items), sum(map(len, items)))
        print(f"{path}: {len(items)} texts, {done[path][1]} characters")
    return done


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--deb_dir", default=None, help="a directory holding the .deb files (default: apt-get download)")
    p.add_argument("--out_dir", default=str(OUT))
    a = p.parse_args()
    prepare(a.deb_dir, a.out_dir)


if __name__ == "__main__":
    cli(main)
