"""Sentence splitting of raw document text (TFDS and Hugging Face documents)."""

from __future__ import annotations

from mlm.data.builtin_corpus import split_sentences


def text_to_sentences(text: str) -> list[str]:
    """Splits a document's text into sentences: first into lines (paragraphs), then sentences.

    Args:
      text: one document, e.g. a Wikipedia article with one paragraph or heading per line.

    Returns:
      The non-empty, whitespace-normalised sentences in order.
    """
    sentences = []
    for line in text.splitlines():
        sentences.extend(sentence for sentence in split_sentences(line) if sentence)
    return sentences
