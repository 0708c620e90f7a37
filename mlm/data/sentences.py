"""Sentence splitting of raw document text (TFDS and Hugging Face documents), in any script.

A document is split into lines (paragraphs) and each line into sentences by one rule for every
language; the language of a document is never needed. A sentence ends:

- after ``。 ｡ ！ ？ ‼ ⁇ ⁈ ⁉`` (Chinese, Japanese), ``। ॥`` (Devanagari and the other Indic
  scripts), ``؟ ۔`` (Arabic, Urdu), ``።`` (Ethiopic), ``။`` (Myanmar), ``។`` (Khmer) and the
  Greek question mark ``;`` (U+037E), with or without a space after them;
- after ``!`` or ``?`` followed by a space, or directly by a Chinese or Japanese character,
  and after ``.`` between two such characters (half-width punctuation in Chinese text);
- after ``.`` followed by a space, whatever letter comes next (lower-cased text and scripts
  without capitals split too), except after a known abbreviation ("e.g.", "Dr.", "vs." ...,
  ``ABBREVIATIONS``) or an initial ("A. Smith", any single letter), and, before a lower-case
  letter, after "etc.", a word with inner periods ("U.S.", "т.д.") or an ellipsis ("...", ``…``);
- after ``;`` that follows a Greek letter and a space (Greek writes its question mark as ``;``);
- at a space between two Thai letters: Thai has no sentence punctuation and writes a space where
  other languages end a sentence or a clause, so Thai "sentences" are clauses (a space after
  the repetition mark ``ๆ`` or the abbreviation mark ``ฯ`` does not split).

Closing quotes and brackets after the punctuation stay with the sentence, and punctuation
closed by a bracket before a lower-case letter ends none ("(on screen!) and"); decimals
("3.14"), URLs and other periods without a space after them never split. Known misses:
Japanese quoted speech (``「…。」と言った`` splits after the quote), abbreviations of other
languages that are not initials ("usw."), a domain name ending a sentence before a lower-case
letter, and text without any sentence punctuation at all. The last is what
``SplitStats`` counts so that a reader can report it: a paragraph that did not split reaches
next-sentence pairs as one long "sentence" (truncated to one segment) and is cut mid-sentence
into chunks.

The built-in corpus keeps its own splitter (`mlm.data.builtin_corpus.split_sentences`, a
capital letter after the period), which its cleaned English docstrings were tuned with, so the
corpus stays exactly as it was.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from collections.abc import Iterable, Iterator, Sequence

from mlm.data.instances import Document
from mlm.data.tokenizer import Vocab, encode_sentences
from mlm.errors import DataError
from mlm.paths import write_text_atomically

# Words whose final period does not end a sentence (compared lower-cased).
ABBREVIATIONS = frozenset(
    {
        "al.",
        "approx.",
        "cf.",
        "co.",
        "dept.",
        "dr.",
        "e.g.",
        "eg.",
        "esp.",
        "fig.",
        "figs.",
        "i.e.",
        "ie.",
        "inc.",
        "jr.",
        "ltd.",
        "mr.",
        "mrs.",
        "ms.",
        "mt.",
        "no.",
        "nos.",
        "prof.",
        "resp.",
        "sec.",
        "sr.",
        "st.",
        "viz.",
        "vol.",
        "vs.",
    }
)
# Abbreviations that often end a sentence too: their period ends one before all but a
# lower-case letter, like that of a word with inner periods.
FINAL_ABBREVIATIONS = frozenset({"etc."})
# A paragraph longer than this that stayed one sentence found no sentence end: real sentences
# are far shorter in every script (an English one averages about 120 characters).
LONG_SENTENCE_CHARS = 1000

_CLOSED_ENDS = "。｡！？‼⁇⁈⁉।॥؟۔።။។\u037e"  # end a sentence with or without a space after
_CLOSERS = "\"'”’»›)\\]}」』】）〕》〉"
_OPENERS = "\"'“‘«‹([{¿¡「『【（〔《〈"
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff66-\uff9f"  # kana, han
_GREEK = "\u0370-\u03ff\u1f00-\u1fff"
_THAI = "\u0e01-\u0e3a\u0e3f-\u0e5b"
_THAI_BEFORE_BREAK = "\u0e01-\u0e2e\u0e30-\u0e3a\u0e3f-\u0e45\u0e47-\u0e5b"  # not ฯ ๆ
# The first character is looked ahead for alone so that the engine skips to candidates quickly.
_BOUNDARY_RE = re.compile(
    rf"(?=[{_CLOSED_ENDS}!?.…;])(?:"
    rf"(?P<closed>[{_CLOSED_ENDS}]+[{_CLOSERS}]*) ?"
    rf"|(?P<bang>(?:[!?]+|(?<=[{_CJK}])\.)[{_CLOSERS}]*)(?=[{_CJK}])"
    rf"|(?P<open>(?:[.!?…]+|(?<=[{_GREEK}]);)[{_CLOSERS}]*) )"
)
_THAI_BREAK_RE = re.compile(rf"[{_THAI_BEFORE_BREAK}] (?=[{_THAI}])")
_THAI_SPLIT_RE = re.compile(rf"(?<=[{_THAI_BEFORE_BREAK}]) (?=[{_THAI}])")


def split_sentences(text: str) -> list[str]:
    """Splits one paragraph into sentences by the rule in the module docstring.

    Args:
      text: one paragraph in any script; any whitespace (newlines included) separates words.

    Returns:
      The non-empty sentences, whitespace-normalised, in order.
    """
    text = " ".join(text.split())
    if _THAI_BREAK_RE.search(text):
        return [s for piece in _THAI_SPLIT_RE.split(text) for s in _split_punctuated(piece)]
    return _split_punctuated(text)


def _split_punctuated(text: str) -> list[str]:
    """Splits whitespace-normalised text at sentence punctuation (all but the Thai rule)."""
    sentences = []
    start = 0
    for match in _BOUNDARY_RE.finditer(text):
        if match.lastgroup == "open" and not _ends_sentence(text, start, match):
            continue
        sentences.append(text[start : match.end(match.lastgroup)])
        start = match.end()
    if start < len(text):
        sentences.append(text[start:])
    return [sentence for sentence in sentences if sentence]


def _ends_sentence(text: str, start: int, match: re.Match) -> bool:
    """Whether ``.``, ``!``, ``?``, ``…`` or Greek ``;`` and the space after end a sentence."""
    punctuation = match.group("open").rstrip(_CLOSERS)
    following = text[match.end() : match.end() + 2].lstrip(_OPENERS)[:1]
    before_lower = following.islower()
    if before_lower and match.group("open")[-1] in ")]}）":  # "(on screen!) and", "(i.e.) the"
        return False
    if "!" in punctuation or "?" in punctuation or punctuation == ";":
        return True
    if punctuation != ".":  # an ellipsis: a pause before a lower-case word
        return not before_lower
    word = text[start : match.start()].rsplit(" ", 1)[-1].lstrip(_OPENERS)
    if (word + ".").lower() in ABBREVIATIONS or (len(word) == 1 and word.isalpha()):
        return False
    if "." in word or (word + ".").lower() in FINAL_ABBREVIATIONS:  # "U.S.", "etc."
        return not before_lower
    return True


def text_to_sentences(text: str) -> list[str]:
    """Splits a document's text into sentences: first into lines (paragraphs), then sentences.

    Args:
      text: one document, e.g. a Wikipedia article with one paragraph or heading per line.

    Returns:
      The non-empty, whitespace-normalised sentences in order.
    """
    sentences = []
    for line in text.splitlines():
        sentences.extend(split_sentences(line))
    return sentences


def is_unsplit(sentences: Sequence[str], max_chars: int = LONG_SENTENCE_CHARS) -> bool:
    """Whether a document's sentences include one of over `max_chars` characters.

    Such a "sentence" is a paragraph in which no sentence end was found. A document is split
    into lines first, so one of several paragraphs yields several "sentences" even when none of
    them split: the length of the longest is the sign, not how many there are.
    """
    return any(len(sentence) > max_chars for sentence in sentences)


@dataclasses.dataclass
class SplitStats:
    """Counts the documents a reader split and those that did not split (`is_unsplit`).

    A reader adds each document's sentences as it splits them and reports `warning(source)`
    once, e.g. after the documents it samples to train a vocabulary.
    """

    documents: int = 0
    unsplit: int = 0

    def add(self, sentences: Sequence[str]) -> None:
        """Counts one document, given the sentences it was split into."""
        self.documents += 1
        self.unsplit += is_unsplit(sentences)

    def warning(self, source: str) -> str | None:
        """One line saying how many documents did not split; None when all did.

        Args:
          source: names where the documents came from, e.g. ``data.tfds_name=wikipedia/...``.
        """
        if not self.unsplit:
            return None
        return (
            f"{self.unsplit} of {self.documents} documents sampled from {source} did not split "
            f"into sentences (a paragraph of over {LONG_SENTENCE_CHARS:,} characters has no "
            "sentence punctuation); next-sentence pairs truncate such a paragraph to one "
            "segment and chunks cut it mid-sentence: a line break between sentences splits them"
        )


class TokenizeText:
    """Turns a document's text into its WordPiece sentences; a picklable grain map function.

    Sentences that encode to nothing are dropped, so a document of no text becomes an empty
    list (the pipeline skips it).
    """

    def __init__(self, vocab: Vocab):
        self._vocab = vocab

    def __call__(self, text: str) -> Document:
        ids = encode_sentences(self._vocab, text_to_sentences(text))
        return [sentence for sentence in ids if sentence.size]


def write_sentence_sample(
    texts: Iterable[str], out_path: str, *, source: str, no_sentences: str
) -> str:
    """Writes documents' sentences as a text file in the BERT layout, to train a vocab on.

    One sentence per line and a blank line between documents; documents without sentences are
    skipped. The file is written atomically. Documents that did not split (`SplitStats`) are
    counted and reported as one `warning:` line on stderr.

    Args:
      texts: the documents' raw text.
      out_path: the text file to write; its directory must exist.
      source: names the documents in the warning (e.g. "data.tfds_name=wiki split 'train'").
      no_sentences: the DataError message when no document holds a sentence.

    Returns:
      `out_path`.

    Raises:
      DataError: no document holds a sentence.
    """
    stats = SplitStats()

    def pieces() -> Iterator[str]:
        written = 0
        for text in texts:
            sentences = text_to_sentences(text)
            stats.add(sentences)
            if sentences:
                yield ("\n" if written else "") + "\n".join(sentences) + "\n"
                written += 1
        if not written:
            raise DataError(no_sentences)

    write_text_atomically(out_path, pieces())
    warning = stats.warning(source)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    return out_path
