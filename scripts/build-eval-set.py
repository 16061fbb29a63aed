#!/usr/bin/env python3
"""Build Bruno's labelled retrieval set from the Rust standard library's docs.

usage: scripts/build-eval-set.py OUT_DIR [--docs N] [--queries N] [--html DIR]

The corpus is the toolchain's own rustdoc HTML (`rustc --print sysroot`/
share/doc/rust/html/std): one markdown document per item page (struct,
enum, trait, function, macro, type, constant, primitive), written as
OUT_DIR/corpus/<path>.md. Each document is the item's path as its title,
its documentation without its first paragraph, and its methods' one-line
summaries.

The queries are items' one-line summaries (rustdoc's `<meta
name="description">`, which is the first paragraph the document left out),
the relevant document being the item's page: "find the page this sentence
describes". Summaries shared by two pages are not asked (which page is
meant is ambiguous); such pages stay in the corpus as distractors.

Everything is chosen by sorting and hashing paths, so the same toolchain
gives the same files byte for byte. Writes OUT_DIR/queries.jsonl
({"query", "relevant": [doc id]}), with doc ids relative to OUT_DIR/corpus.
Standard library only.
"""

import argparse
import hashlib
import html
import json
import os
import pathlib
import re
import subprocess
import sys
from html.parser import HTMLParser

KINDS = ("struct", "enum", "trait", "fn", "macro", "type", "constant", "primitive", "union")
# Platform intrinsics: thousands of near-identical pages, not what an operator's documents look like.
SKIP_MODULES = ("arch", "intrinsics", "simd", "os")
MAX_BODY_CHARS = 2400
MAX_METHODS_CHARS = 1200


class Page(HTMLParser):
    """Collects the top documentation block (as markdown-ish text) and the
    one-line summaries of the methods."""

    BLOCKS = {"p", "pre", "li", "h2", "h3", "h4", "h5", "blockquote", "tr"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.depth = 0  # open <div>s inside the top docblock (0: outside)
        self.in_top = False
        self.top_done = False
        self.blocks = []  # (tag, text)
        self.current = None  # [tag, parts]
        self.in_pre = False
        self.method = None  # method name whose summary is awaited
        self.method_doc = False
        self.method_div_depth = 0
        self.methods = []  # (name, summary)
        self.method_text = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "details" and "top-doc" in (a.get("class") or "") and not self.top_done:
            self.in_top = True
        if self.in_top and tag == "div":
            self.depth += 1
        if self.in_top and self.depth >= 1 and tag in self.BLOCKS and self.current is None:
            self.current = [tag, []]
            self.in_pre = tag == "pre"
        if tag == "section" and (a.get("id") or "").startswith("method.") and self.method is None:
            self.method = a["id"][len("method."):]
        if self.method is not None and tag == "div" and "docblock" in (a.get("class") or ""):
            self.method_doc = True
            self.method_div_depth = 1
            self.method_text = []
        elif self.method_doc and tag == "div":
            self.method_div_depth += 1
        if self.method_doc and tag == "p" and self.method_text is not None and not self.method_text:
            self.method_text = []

    def handle_endtag(self, tag):
        if self.current is not None and tag == self.current[0]:
            text = "".join(self.current[1])
            if not self.in_pre:
                text = re.sub(r"\s+", " ", text).strip()
            else:
                text = text.strip("\n")
            if text:
                self.blocks.append((self.current[0], text))
            self.current = None
            self.in_pre = False
        if self.in_top and tag == "div":
            self.depth -= 1
        if self.in_top and tag == "details":
            self.in_top = False
            self.top_done = True
        if self.method_doc and tag == "p" and self.method is not None:
            summary = re.sub(r"\s+", " ", "".join(self.method_text or [])).strip()
            if summary:
                self.methods.append((self.method, summary))
            self.method = None
            self.method_doc = False
        elif self.method_doc and tag == "div":
            self.method_div_depth -= 1
            if self.method_div_depth == 0:
                self.method = None
                self.method_doc = False

    def handle_data(self, data):
        if self.current is not None:
            self.current[1].append(data)
        if self.method_doc and self.method_text is not None:
            self.method_text.append(data)


def sysroot_html():
    root = subprocess.run(["rustc", "--print", "sysroot"], capture_output=True, text=True, check=True)
    return pathlib.Path(root.stdout.strip()) / "share" / "doc" / "rust" / "html"


def item_pages(std):
    for path in sorted(std.rglob("*.html")):
        rel = path.relative_to(std)
        if rel.parts[0] in SKIP_MODULES:
            continue
        kind = path.name.split(".", 1)[0]
        if kind in KINDS and path.name.count(".") == 2:
            yield rel, kind, path


def title_of(rel, kind):
    module = "::".join(("std",) + rel.parts[:-1])
    name = rel.name.split(".")[1]
    return name if kind == "primitive" else f"{module}::{name}"


def document(rel, kind, text, keep_summary=False):
    summary = re.search(r'<meta name="description" content="([^"]*)"', text)
    summary = html.unescape(summary.group(1)).strip() if summary else ""
    page = Page()
    page.feed(text)
    blocks = page.blocks
    # The first paragraph is the summary: it becomes the query, not the
    # document (unless --with-summary).
    if blocks and blocks[0][0] == "p" and not keep_summary:
        blocks = blocks[1:]
    title = title_of(rel, kind)
    out = [f"# {title}", "", f"{kind} `{title}`", ""]
    used = 0
    for tag, body in blocks:
        if used >= MAX_BODY_CHARS:
            break
        if tag in ("h2", "h3", "h4", "h5"):
            line = "#" * int(tag[1]) + " " + body.lstrip("§").strip()
        elif tag == "pre":
            line = "```rust\n" + body + "\n```"
        elif tag == "li":
            line = "- " + body
        else:
            line = body
        out += [line, ""]
        used += len(line)
    methods = []
    used = 0
    for name, s in page.methods:
        line = f"- `{name}`: {s}"
        if used + len(line) > MAX_METHODS_CHARS:
            break
        methods.append(line)
        used += len(line)
    if methods:
        out += ["## Methods", ""] + methods + [""]
    return summary, "\n".join(out).rstrip() + "\n"


def key(s):
    return hashlib.sha256(s.encode()).hexdigest()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=pathlib.Path)
    ap.add_argument("--docs", type=int, default=800, help="documents in the corpus")
    ap.add_argument("--queries", type=int, default=300, help="queries asked")
    ap.add_argument("--html", type=pathlib.Path, help="rustdoc HTML root (default: the toolchain's)")
    ap.add_argument("--with-summary", action="store_true",
                    help="keep each page's summary in its document (the query is then a sentence of its page)")
    args = ap.parse_args()
    root = args.html or sysroot_html()
    std = root / "std"
    if not std.is_dir():
        sys.exit(f"{std}: no standard library docs (rustup component add rust-docs)")

    pages = []
    for rel, kind, path in item_pages(std):
        summary, body = document(rel, kind, path.read_text(encoding="utf-8"), args.with_summary)
        if len(summary.split()) < 4 or len(body) < 80:
            continue
        doc_id = str(rel.with_suffix(".md"))
        pages.append((doc_id, summary, body))
    # One page per item (re-exports render the same page at several paths):
    # the shortest path of the same title and summary wins.
    seen = {}
    for doc_id, summary, body in sorted(pages, key=lambda p: (len(p[0]), p[0])):
        seen.setdefault((body.split("\n", 1)[0].rsplit("::", 1)[-1], summary), (doc_id, summary, body))
    pages = sorted(seen.values(), key=lambda p: key(p[0]))[: args.docs]
    pages.sort()

    shared = {}
    for _, summary, _ in pages:
        shared[summary] = shared.get(summary, 0) + 1
    askable = [p for p in pages if shared[p[1]] == 1]
    asked = sorted(askable, key=lambda p: key("query\0" + p[0]))[: args.queries]
    asked.sort(key=lambda p: key("order\0" + p[0]))

    corpus = args.out / "corpus"
    if corpus.exists():
        for f in sorted(corpus.rglob("*.md"), reverse=True):
            f.unlink()
    for doc_id, _, body in pages:
        target = corpus / doc_id
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(body, encoding="utf-8")
    with open(args.out / "queries.jsonl", "w", encoding="utf-8") as f:
        for doc_id, summary, _ in asked:
            f.write(json.dumps({"query": summary, "relevant": [doc_id]}, ensure_ascii=False) + "\n")
    total = sum(len(b) for _, _, b in pages)
    print(f"{len(pages)} documents ({total // 1024} KiB), {len(asked)} queries into {args.out}"
          f" (from {root}, {len(askable)} askable)")


if __name__ == "__main__":
    main()
