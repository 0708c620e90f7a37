"""The built-in corpus: English prose from the docstrings of Python's standard library.

Every Python install has it. Each module, class and function docstring is one document;
doctests, literal blocks, tables and code-like lines are dropped, wrapped lines are joined and
paragraphs are split into sentences. Documents need at least ``MIN_DOCUMENT_SENTENCES`` (2)
sentences: a one-sentence document gives next-sentence prediction only "NotNext" pairs, and
dropping them costs about a sixth of the words. Whole modules go to either the train or the
eval split by a stable hash of their dotted name, and an eval document that shares a sentence
with the train split is dropped, so eval text is never trained on. The files are written in the
layout `mlm.data.corpus.read_documents` reads.
"""

from __future__ import annotations

import ast
import hashlib
import os
import re
import sysconfig
import warnings
from collections.abc import Sequence

from mlm.errors import DataError, WorkdirError
from mlm.paths import write_text_atomically

TRAIN_FILE_NAME = "train.txt"
EVAL_FILE_NAME = "eval.txt"
EVAL_PERCENT = 10  # share of stdlib modules whose docstrings form the eval split
MIN_SENTENCE_WORDS = 4
MAX_SENTENCE_WORDS = 120  # longer "sentences" are run-on lists and tables, not prose
MIN_LETTER_FRACTION = 0.75  # letters among the non-space characters of a kept sentence
MIN_DOCUMENT_SENTENCES = 2

# Stdlib directories without prose docstrings (tests, tools, demos, generated code, codecs).
SKIPPED_STDLIB_DIRS = frozenset(
    {
        "__pycache__",
        "__phello__",
        "dist-packages",
        "encodings",
        "ensurepip",
        "idlelib",
        "lib2to3",
        "pydoc_data",
        "site-packages",
        "test",
        "tests",
        "turtledemo",
    }
)

# Abbreviations whose final period does not end a sentence (compared lowercased).
NON_TERMINAL_ABBREVIATIONS = frozenset(
    {
        "al.",
        "approx.",
        "cf.",
        "dr.",
        "e.g.",
        "eg.",
        "esp.",
        "etc.",
        "fig.",
        "i.e.",
        "ie.",
        "mr.",
        "mrs.",
        "ms.",
        "no.",
        "resp.",
        "sec.",
        "st.",
        "vs.",
        "viz.",
    }
)

_SENTENCE_END_RE = re.compile(r"[.!?]+[\"')\]]*(?=\s+[\"'(\[`]?[A-Z])")
_BULLET_RE = re.compile(r"(?:[-*+\u2022]|\d{1,2}[.)]|\(\d{1,2}\)|[a-z][)])\s+")
_TABLE_RULE_RE = re.compile(r"[-=+|~^*#_:. ]+")
_COLUMN_GAP_RE = re.compile(r"[^.!?:;,)\"'\s]\s{2,}\S")
# Code recognised at the start of a paragraph only: continuation lines of prose may start so.
_CODE_START_RE = re.compile(
    r"(?:def|class)\s+\w+\s*[(:]"
    r"|(?:import|from)\s+[\w.]+(?:\s+import\b.*)?$"
    r"|(?:if|elif|else|for|while|with|try|except|finally)\b.*:$"
    r"|(?:return|raise|yield|print|assert|del|pass|break|continue)\b\s*[\w.]*\s*(?:[-+*/%<>=!(\[,]|$)"
    r"|[\w.\[\]'\"]+\s*[-+*/%|&]?=\s*\S"
    r"|[\w.]+\(.*\)\s*(?:->.*)?$"
    r"|[#$%@{}<]"
)
_ROLE_RE = re.compile(r":[\w.:+-]+:`([^`]*)`")
_LITERAL_RE = re.compile(r"``([^`]+)``")
_INTERPRETED_RE = re.compile(r"`([^`]+)`_{0,2}")
_LINK_TARGET_RE = re.compile(r"\s*<[^<>]*>$")
_STRONG_RE = re.compile(r"(?<![\w*])\*\*([^*\s](?:[^*]*[^*\s])?)\*\*(?![\w*])")
_EMPHASIS_RE = re.compile(r"(?<![\w*])\*([^*\s](?:[^*]*[^*\s])?)\*(?![\w*])")


# ----------------------------------------------------------------------- docstring cleaning


def split_sentences(text: str) -> list[str]:
    """Splits a paragraph into sentences on ``.``, ``!`` and ``?`` followed by a capital.

    Periods of abbreviations such as "e.g.", "i.e." and "etc." and of initials ("A. Smith") do
    not end a sentence. This rule is for the cleaned English docstrings of the built-in corpus
    (kept so that the corpus stays the same); documents of other sources, lower-cased or in any
    script, are split by `mlm.data.sentences.split_sentences`.

    Args:
      text: one paragraph; any whitespace (newlines included) separates words.

    Returns:
      The sentences, whitespace-normalised.
    """
    text = " ".join(text.split())
    sentences = []
    start = 0
    for match in _SENTENCE_END_RE.finditer(text):
        word = text[start : match.end()].rsplit(" ", 1)[-1].lstrip("\"'([`")
        if _is_abbreviation(word):
            continue
        sentences.append(text[start : match.end()])
        start = match.end() + 1
    if start < len(text):
        sentences.append(text[start:])
    return sentences


def _is_abbreviation(word: str) -> bool:
    """Whether the word ending in a period is an abbreviation or an initial."""
    word = word.rstrip("\"')]")
    if word.lower() in NON_TERMINAL_ABBREVIATIONS:
        return True
    return len(word) == 2 and word[0].isupper() and word[1] == "."


def strip_markup(text: str) -> str:
    """Replaces reST inline markup (roles, literals, links, emphasis) by its text."""
    text = _ROLE_RE.sub(lambda match: _role_text(match.group(1)), text)
    text = _LITERAL_RE.sub(r"\1", text)
    text = _INTERPRETED_RE.sub(lambda match: _LINK_TARGET_RE.sub("", match.group(1)), text)
    text = _STRONG_RE.sub(r"\1", text)
    return _EMPHASIS_RE.sub(r"\1", text)


def _role_text(target: str) -> str:
    """The text a reST role such as ``:class:`~a.B``` renders as."""
    target = _LINK_TARGET_RE.sub("", target) if "<" in target else target
    if target.startswith("~"):
        return target[1:].rsplit(".", 1)[-1]
    return target.lstrip("!")


def is_prose_line(line: str, continues_paragraph: bool = False) -> bool:
    """Whether a stripped docstring line reads as prose rather than code, a table or options.

    Args:
      line: the stripped line.
      continues_paragraph: the line continues a prose paragraph, so it is not checked for code
        (wrapped prose may start with "for", "if" or "import").

    Returns:
      False for table rules and rows, option lists, column layouts, code and lines with few
      letters.
    """
    if _TABLE_RULE_RE.fullmatch(line) or line.startswith(("|", "+-")):
        return False
    if line.startswith("-") and not line.startswith("- "):  # an option such as -v or --help
        return False
    if _COLUMN_GAP_RE.search(line):
        return False
    if not continues_paragraph and _CODE_START_RE.match(line):
        return False
    return _letter_fraction(line) >= 0.5


def is_prose_sentence(sentence: str) -> bool:
    """Whether a sentence has enough words and letters to be kept."""
    words = sentence.split()
    if not MIN_SENTENCE_WORDS <= len(words) <= MAX_SENTENCE_WORDS:
        return False
    if sentence.endswith((":", ",", ";")):
        return False
    if not (sentence[0].isalnum() or sentence[0] in "\"'("):
        return False
    return _letter_fraction(sentence) >= MIN_LETTER_FRACTION


def _letter_fraction(text: str) -> float:
    """Fraction of letters among the non-space characters of ``text``."""
    characters = "".join(text.split())  # str.split() splits at exactly the str.isspace ones.
    if not characters:
        return 0.0
    return sum(map(str.isalpha, characters)) / len(characters)


def docstring_paragraphs(docstring: str) -> list[str]:
    """Splits a cleaned (dedented) docstring into prose paragraphs.

    Drops doctests (``>>>`` up to the next blank line), literal blocks after ``::``, reST
    directives with their bodies and lines that are not prose (``is_prose_line``). A change of
    indentation starts a new paragraph; list bullets start one and are removed.

    Args:
      docstring: a docstring as ``ast.get_docstring(node, clean=True)`` returns it.

    Returns:
      The paragraphs, each with its wrapped lines joined by spaces.
    """
    paragraphs: list[str] = []
    lines: list[str] = []
    continuation_indent = 0
    skip_deeper_than: int | None = None  # inside a literal block or directive body
    in_doctest = False

    def flush() -> None:
        if lines:
            paragraphs.append(" ".join(lines))
            lines.clear()

    for raw_line in docstring.expandtabs().splitlines():
        line = raw_line.strip()
        indent = len(raw_line) - len(raw_line.lstrip())
        if skip_deeper_than is not None:
            if not line or indent > skip_deeper_than:
                continue
            skip_deeper_than = None
        if in_doctest:
            in_doctest = bool(line)
            continue
        if not line:
            flush()
            continue
        if line.startswith((">>>", "...")):
            flush()
            in_doctest = True
            continue
        if line.startswith(".. "):
            flush()
            skip_deeper_than = indent
            continue
        bullet = _BULLET_RE.match(line)
        hanging_indent = (  # "name -- text that\n        wraps deeper" continues its first line
            len(lines) == 1 and not lines[0].endswith(":") and indent > continuation_indent
        )
        continues_paragraph = not bullet and (
            hanging_indent or (bool(lines) and indent == continuation_indent)
        )
        if hanging_indent and continues_paragraph:
            continuation_indent = indent
        if not is_prose_line(line, continues_paragraph):
            flush()
            continue
        if not continues_paragraph:
            flush()
            continuation_indent = indent + (bullet.end() if bullet else 0)
            line = line[bullet.end() :] if bullet else line
        if line.endswith("::"):  # "Example::" renders as "Example:" and starts a literal block
            line = line[:-2].rstrip() + (":" if line[-3:-2].strip() else "")
            if line:
                lines.append(line)
            flush()
            skip_deeper_than = continuation_indent
            continue
        lines.append(line)
        if line.endswith(":"):  # introduces a list or an example, not more of this paragraph
            flush()
    flush()
    return paragraphs


def docstring_sentences(docstring: str) -> list[str]:
    """Turns a docstring into its prose sentences (see ``docstring_paragraphs``).

    Args:
      docstring: a cleaned docstring.

    Returns:
      The sentences that pass ``is_prose_sentence``, in order.
    """
    sentences = []
    for paragraph in docstring_paragraphs(docstring):
        for sentence in split_sentences(strip_markup(paragraph)):
            if is_prose_sentence(sentence):
                sentences.append(sentence)
    return sentences


# ------------------------------------------------------------------------ built-in corpus


def stdlib_modules(stdlib_dir: str | None = None) -> list[tuple[str, str]]:
    """Lists the stdlib's ``.py`` files that carry prose docstrings.

    Skips ``SKIPPED_STDLIB_DIRS`` and directories whose names are not identifiers
    (``lib-dynload``, ``config-3.11-...``).

    Args:
      stdlib_dir: the stdlib directory; default ``sysconfig.get_paths()["stdlib"]``.

    Returns:
      ``(dotted module name, path)`` pairs sorted by name.
    """
    root = stdlib_dir or sysconfig.get_paths()["stdlib"]
    modules = []
    for directory, subdirectories, file_names in os.walk(root):
        subdirectories[:] = [
            name
            for name in subdirectories
            if name.isidentifier() and name not in SKIPPED_STDLIB_DIRS
        ]
        for file_name in file_names:
            if file_name.endswith(".py") and file_name[:-3].isidentifier():
                path = os.path.join(directory, file_name)
                modules.append((_module_name(os.path.relpath(path, root)), path))
    return sorted(modules)


_STATEMENT_NODES = (ast.stmt, ast.excepthandler, ast.match_case)


def _module_name(relative_path: str) -> str:
    """``email/mime/text.py`` -> ``email.mime.text``; ``json/__init__.py`` -> ``json``."""
    parts = relative_path[: -len(".py")].split(os.sep)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def _parse(source: bytes, path: str, attempts: int = 3) -> ast.Module:
    """`ast.parse`, retried on CPython 3.11's spurious "AST constructor recursion depth mismatch"
    SystemError (python/cpython#106905, seen here with other threads running); skipping the file
    instead would silently change the corpus."""
    for attempt in range(attempts):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return ast.parse(source, filename=path)
        except SystemError as error:
            if "recursion depth mismatch" not in str(error) or attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def module_docstrings(path: str) -> list[str]:
    """The module, class and function docstrings of a Python file, in source order.

    Args:
      path: a ``.py`` file.

    Returns:
      The cleaned docstrings; empty when the file cannot be read or parsed.
    """
    try:
        with open(path, "rb") as file:
            source = file.read()
        tree = _parse(source, path)
    except (OSError, SyntaxError, ValueError):
        return []
    docstrings = []
    nodes: list[ast.AST] = [tree]
    while nodes:
        node = nodes.pop()
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            docstring = ast.get_docstring(node, clean=True)
            if docstring:
                docstrings.append(docstring)
        # Classes and functions are statements, nested only in statements (and in the except
        # and case clauses of try / match): expressions, which hold most of a tree's nodes,
        # are not walked.
        nodes.extend(
            child
            for child in reversed(list(ast.iter_child_nodes(node)))
            if isinstance(child, _STATEMENT_NODES)
        )
    return docstrings


def is_eval_module(module_name: str) -> bool:
    """Whether a module's docstrings go to the eval split (a stable hash of its name)."""
    digest = hashlib.sha256(module_name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 100 < EVAL_PERCENT


def builtin_corpus_documents(
    stdlib_dir: str | None = None,
) -> tuple[list[list[str]], list[list[str]]]:
    """Builds the train and eval documents of the built-in corpus.

    Repeated documents are kept once, and eval documents sharing a sentence with the train split
    are dropped.

    Args:
      stdlib_dir: the stdlib directory; default the running interpreter's.

    Returns:
      ``(train_documents, eval_documents)``, each a list of sentence lists.
    """
    train_documents: list[list[str]] = []
    eval_candidates: list[list[str]] = []
    seen: set[tuple[str, ...]] = set()
    for module_name, path in stdlib_modules(stdlib_dir):
        split = eval_candidates if is_eval_module(module_name) else train_documents
        for docstring in module_docstrings(path):
            sentences = docstring_sentences(docstring)
            if len(sentences) >= MIN_DOCUMENT_SENTENCES and tuple(sentences) not in seen:
                seen.add(tuple(sentences))
                split.append(sentences)
    train_sentences = {sentence for document in train_documents for sentence in document}
    eval_documents = [
        document
        for document in eval_candidates
        if not any(sentence in train_sentences for sentence in document)
    ]
    return train_documents, eval_documents


def format_documents(documents: Sequence[Sequence[str]]) -> str:
    """Writes documents in the pretraining layout: a sentence per line, blank line between."""
    return "".join("\n".join(document) + "\n\n" for document in documents)


def write_builtin_corpus(out_dir: str) -> tuple[str, str]:
    """Writes the built-in corpus to ``out_dir/train.txt`` and ``out_dir/eval.txt``.

    Files that both exist already are reused. Each file is written to a temporary file and then
    renamed, so an interrupted run never leaves a partial file.

    Args:
      out_dir: the directory for the two files; created if missing.

    Returns:
      ``(train_path, eval_path)``.
    """
    train_path = os.path.join(out_dir, TRAIN_FILE_NAME)
    eval_path = os.path.join(out_dir, EVAL_FILE_NAME)
    if os.path.isfile(train_path) and os.path.isfile(eval_path):
        return train_path, eval_path
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as error:
        raise WorkdirError(
            f"{out_dir}: cannot create the corpus directory ({error.strerror or error}); "
            "choose a writable workdir"
        ) from None
    train_documents, eval_documents = builtin_corpus_documents()
    if not train_documents or not eval_documents:
        raise DataError(
            "the built-in corpus found no docstrings in the Python standard library; "
            "set data.train_files and data.eval_files to your own text"
        )
    write_text_atomically(train_path, format_documents(train_documents))
    write_text_atomically(eval_path, format_documents(eval_documents))
    return train_path, eval_path
