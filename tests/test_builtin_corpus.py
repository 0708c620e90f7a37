"""Tests for mlm.data.builtin_corpus: docstring cleaning and the built-in stdlib corpus."""

import os
import textwrap

import pytest

from mlm import paths
from mlm.data import builtin_corpus as corpus
from mlm.data.corpus import read_documents
from mlm.errors import WorkdirError


def write(path, text, mode="w"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, mode) as file:
        file.write(text)
    return str(path)


# ------------------------------------------------------------------------ docstring cleaning


def test_split_sentences_keeps_abbreviations_and_initials():
    text = (
        "Options, e.g. Foo and Bar, are kept (i.e. Not split).  Files, dirs, etc. Are fine.\n"
        "Written by J. Smith! Is it done? Yes, see section 3.2 of the PEP."
    )
    assert corpus.split_sentences(text) == [
        "Options, e.g. Foo and Bar, are kept (i.e. Not split).",
        "Files, dirs, etc. Are fine.",
        "Written by J. Smith!",
        "Is it done?",
        "Yes, see section 3.2 of the PEP.",
    ]
    assert corpus.split_sentences("no capital after. the period") == [
        "no capital after. the period"
    ]


def test_strip_markup_renders_rest_inline_text():
    text = "Use :func:`os.path.join`, :class:`~email.message.Message`, ``repr(x)`` or `link <u>`_."
    assert corpus.strip_markup(text) == "Use os.path.join, Message, repr(x) or link."
    assert corpus.strip_markup("The *first* and **second** of *args") == (
        "The first and second of *args"
    )


DOCSTRING = textwrap.dedent(
    """\
    Summarise the records of a ledger.

    The ledger is read line by line, and each record is checked
    against the schema before it is added.  Bad records are skipped.

    >>> summarise(Ledger())
    Summary(total=0)
    this output line belongs to the doctest

    Example::

        ledger = Ledger("path")
        print(summarise(ledger))

    Another paragraph follows the literal block and it is kept.

    =======  ===========
    Column   Meaning
    =======  ===========
    total    the sum
    =======  ===========

    -v, --verbose   print every record
    --quiet         print nothing

    .. note::
       Directive bodies are never prose for this corpus.

    - The first bullet item is a sentence,
      continued on a second line.
    - Short bullet.

    Keyword arguments:
    strict -- when true, raise an error for
        every record that fails the check
    """
)


def test_docstring_sentences_keep_only_prose():
    assert corpus.docstring_sentences(DOCSTRING) == [
        "Summarise the records of a ledger.",
        "The ledger is read line by line, and each record is checked against the schema "
        "before it is added.",
        "Bad records are skipped.",
        "Another paragraph follows the literal block and it is kept.",
        "The first bullet item is a sentence, continued on a second line.",
        "strict -- when true, raise an error for every record that fails the check",
    ]


def test_docstring_paragraphs_drop_code_but_keep_wrapped_prose():
    docstring = textwrap.dedent(
        """\
        Read the file and return
        for each line the parsed value.

            for line in lines:
                total = total + parse(line)
            return total
        """
    )
    assert corpus.docstring_paragraphs(docstring) == [
        "Read the file and return for each line the parsed value."
    ]


def test_module_docstrings_in_source_order_and_unparsable_files(tmp_path):
    source = textwrap.dedent(
        '''\
        """Module doc."""


        class Thing:
            """Class doc."""

            def method(self):
                """Method doc."""

                def inner():
                    """Inner doc."""


        async def later():
            """Coroutine doc."""


        def no_docstring():
            return 1
        '''
    )
    path = write(tmp_path / "mod.py", source)
    assert corpus.module_docstrings(path) == [
        "Module doc.",
        "Class doc.",
        "Method doc.",
        "Inner doc.",
        "Coroutine doc.",
    ]
    assert corpus.module_docstrings(write(tmp_path / "broken.py", "def (:\n")) == []


# --------------------------------------------------------------------------- built-in corpus


def test_stdlib_modules_skips_tests_tools_and_non_packages(tmp_path):
    for relative in [
        "os.py",
        "json/__init__.py",
        "json/decoder.py",
        "test/test_os.py",
        "json/tests/test_x.py",
        "site-packages/pkg/__init__.py",
        "idlelib/editor.py",
        "lib2to3/main.py",
        "turtledemo/demo.py",
        "lib-dynload/x.py",
        "config-3.11-x86_64-linux-gnu/python-config.py",
        "email/readme.txt",
        "email/mime/text.py",
    ]:
        write(tmp_path / relative, '"""Doc."""\n')
    names = [name for name, _ in corpus.stdlib_modules(str(tmp_path))]
    assert names == ["email.mime.text", "json", "json.decoder", "os"]


def test_real_stdlib_modules_and_eval_share():
    modules = dict(corpus.stdlib_modules())
    assert {"json", "email.message", "collections", "argparse"} <= set(modules)
    assert not [name for name in modules if name.split(".")[0] in {"test", "idlelib", "lib2to3"}]
    eval_share = sum(corpus.is_eval_module(name) for name in modules) / len(modules)
    assert 0.04 < eval_share < 0.2
    assert corpus.is_eval_module("json") == corpus.is_eval_module("json")
    json_sentences = [
        sentence
        for docstring in corpus.module_docstrings(modules["json"])
        for sentence in corpus.docstring_sentences(docstring)
    ]
    assert len(json_sentences) > 20
    assert not [s for s in json_sentences if ">>>" in s or "import json" in s]


@pytest.fixture(scope="module")
def builtin_corpus(tmp_path_factory):
    return corpus.write_builtin_corpus(str(tmp_path_factory.mktemp("corpus")))


def test_builtin_corpus_files_hold_clean_disjoint_documents(builtin_corpus):
    train_path, eval_path = builtin_corpus
    assert os.path.basename(train_path) == "train.txt"
    assert os.path.basename(eval_path) == "eval.txt"
    assert os.path.getsize(train_path) > 500_000
    assert os.path.getsize(eval_path) > 20_000
    train_documents = read_documents([train_path])
    eval_documents = read_documents([eval_path])
    for documents in (train_documents, eval_documents):
        assert min(len(document) for document in documents) >= corpus.MIN_DOCUMENT_SENTENCES
        sentences = [sentence for document in documents for sentence in document]
        assert min(len(s.split()) for s in sentences) >= corpus.MIN_SENTENCE_WORDS
        assert not [s for s in sentences if s.startswith((">>>", "...")) or "\t" in s]
    train_sentences = {s for document in train_documents for s in document}
    assert not [s for document in eval_documents for s in document if s in train_sentences]
    eval_modules = [path for name, path in corpus.stdlib_modules() if corpus.is_eval_module(name)]
    eval_module_sentences = {
        sentence
        for path in eval_modules
        for docstring in corpus.module_docstrings(path)
        for sentence in corpus.docstring_sentences(docstring)
    }
    assert {s for document in eval_documents for s in document} <= eval_module_sentences


def test_builtin_corpus_is_byte_identical_across_builds(builtin_corpus, tmp_path):
    second = corpus.write_builtin_corpus(str(tmp_path / "again"))
    for first_path, second_path in zip(builtin_corpus, second, strict=True):
        with open(first_path, "rb") as first, open(second_path, "rb") as again:
            assert first.read() == again.read()
    assert sorted(os.listdir(tmp_path / "again")) == ["eval.txt", "train.txt"]  # no temp files


def test_write_builtin_corpus_reuses_existing_files(tmp_path):
    write(tmp_path / "train.txt", "Kept train.\nAs is.\n")
    write(tmp_path / "eval.txt", "Kept eval.\nAs is.\n")
    train_path, eval_path = corpus.write_builtin_corpus(str(tmp_path))
    assert read_documents([train_path, eval_path]) == [
        ["Kept train.", "As is."],
        ["Kept eval.", "As is."],
    ]


def test_unwritable_out_dir_raises_workdir_error(tmp_path):
    blocker = write(tmp_path / "file", "not a directory")
    with pytest.raises(WorkdirError, match="file/corpus: cannot create"):
        corpus.write_builtin_corpus(os.path.join(blocker, "corpus"))
    with pytest.raises(WorkdirError, match="cannot write"):
        paths.write_text_atomically(os.path.join(blocker, "x.txt"), "text")
