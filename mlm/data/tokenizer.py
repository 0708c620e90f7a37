"""WordPiece vocabularies: training with `tokenizers`, loading BERT ``vocab.txt`` files, encoding.

A ``vocab.txt`` holds one token per line and the line number (from 0) is the token's id; special
tokens are written ``[XXX]`` and continuation pieces start with ``##``. Both our trained
vocabularies (``[PAD] [UNK] [CLS] [SEP] [MASK]`` = 0..4) and Google's original BERT files
(``[PAD]`` = 0, ``[unused0]``..., ``[UNK]`` = 100, ``[CLS]`` = 101, ``[SEP]`` = 102,
``[MASK]`` = 103) load the same way: ids are read from the file, never assumed.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
from collections.abc import Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from mlm.errors import ConfigError, DataError
from mlm.paths import write_text_atomically

PAD_TOKEN = "[PAD]"
UNK_TOKEN = "[UNK]"
CLS_TOKEN = "[CLS]"
SEP_TOKEN = "[SEP]"
MASK_TOKEN = "[MASK]"
SPECIAL_TOKENS = (PAD_TOKEN, UNK_TOKEN, CLS_TOKEN, SEP_TOKEN, MASK_TOKEN)
CONTINUATION_PREFIX = "##"
ALPHABET_LIMIT = 1000  # most frequent characters kept as single-character tokens
MIN_PAIR_FREQUENCY = 2
MAX_WORD_CHARACTERS = 100  # longer words encode to [UNK], as in BERT
ENCODE_CHUNK_SENTENCES = 8192  # sentences per Rust batch call, bounding memory

_BRACKETED_TOKEN_RE = re.compile(r"\[[^\[\]\s]+\]")


@dataclasses.dataclass(frozen=True, eq=False)
class Vocab:
    """A WordPiece vocabulary with its tokenizer and the ids the data pipeline needs.

    Attributes:
      tokenizer: the `tokenizers.Tokenizer` (BERT normaliser and pre-tokeniser, WordPiece model).
      tokens: the tokens by id.
      lowercase: whether text is lowercased (and accents stripped) before tokenisation.
      pad_id, unk_id, cls_id, sep_id, mask_id: ids of the special tokens.
      special_ids: int32 ids of all tokens written ``[XXX]`` (``[unusedN]`` included), sorted.
      is_continuation: bool [size], whether the token continues a word (starts with ``##``).
    """

    tokenizer: tokenizers.Tokenizer
    tokens: list[str]
    lowercase: bool
    pad_id: int
    unk_id: int
    cls_id: int
    sep_id: int
    mask_id: int
    special_ids: np.ndarray
    is_continuation: np.ndarray

    @property
    def size(self) -> int:
        """Number of tokens in the vocabulary."""
        return len(self.tokens)


def _bert_tokenizer(model: models.Model, lowercase: bool) -> tokenizers.Tokenizer:
    """A tokenizer with BERT's normaliser and pre-tokeniser around a WordPiece model."""
    tokenizer = tokenizers.Tokenizer(model)
    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=lowercase, lowercase=lowercase
    )
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix=CONTINUATION_PREFIX)
    return tokenizer


# ---------------------------------------------------------------------------------- training


def train_wordpiece(files: Sequence[str], vocab_size: int, lowercase: bool, out_path: str) -> str:
    """Trains a BERT WordPiece vocabulary and writes it as ``vocab.txt``.

    The special tokens come first (``[PAD]`` = 0, ``[UNK]``, ``[CLS]``, ``[SEP]``, ``[MASK]``),
    then the alphabet and its ``##`` continuations, sorted, then the learned pieces. When
    ``vocab_size`` is too small for the whole alphabet the rarest characters are left out (they
    encode as ``[UNK]``). The result depends only on the files' content: the Rust trainer numbers
    continuation characters in hash order and breaks ties between merges by id, so a first pass
    collects the alphabet and the second pass receives it, sorted, as fixed leading tokens.

    Args:
      files: UTF-8 text files (any layout; lines are read independently).
      vocab_size: the most tokens the vocabulary may hold (fewer when the text has few words).
      lowercase: lowercase and strip accents before training (an "uncased" vocabulary).
      out_path: where to write ``vocab.txt``; written atomically.

    Returns:
      ``out_path``.
    """
    for path in files:
        if not os.path.isfile(path):
            raise DataError(f"{path}: no such file to train the vocabulary on; check data.*_files")
    if not files:
        raise DataError("no text files to train the vocabulary on; set data.train_files")
    alphabet = _frequent_characters(files, lowercase, ALPHABET_LIMIT)
    if not alphabet:
        raise DataError(f"{', '.join(files)}: no text to train the vocabulary on; add text")
    characters = _run_trainer(files, lowercase, len(SPECIAL_TOKENS) + 1, alphabet, ())
    continued = {
        token[len(CONTINUATION_PREFIX) :]
        for token in characters
        if token.startswith(CONTINUATION_PREFIX) and len(token) > len(CONTINUATION_PREFIX)
    }
    alphabet = _fit_alphabet(alphabet, continued, vocab_size - len(SPECIAL_TOKENS))
    if not alphabet:
        raise ConfigError(
            f"model.vocab_size={vocab_size} leaves no room for characters beside the "
            f"{len(SPECIAL_TOKENS)} special tokens; raise it (BERT uses 30522)"
        )
    fixed_tokens = (
        *sorted(alphabet),
        *sorted(
            CONTINUATION_PREFIX + character for character in alphabet if character in continued
        ),
    )
    tokens = _run_trainer(files, lowercase, vocab_size, alphabet, fixed_tokens)
    write_text_atomically(out_path, "".join(token + "\n" for token in tokens))
    return out_path


def _frequent_characters(files: Sequence[str], lowercase: bool, limit: int) -> list[str]:
    """The ``limit`` most frequent non-space characters after normalisation, ties by code point."""
    normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=lowercase, lowercase=lowercase
    )
    counts: collections.Counter[str] = collections.Counter()
    for path in files:
        try:
            with open(path, encoding="utf-8") as file:
                while lines := file.readlines(1 << 20):
                    counts.update(normalizer.normalize_str("".join(lines)))
        except (OSError, UnicodeDecodeError) as error:
            raise DataError(
                f"{path}: cannot read as UTF-8 text ({error}); check the file"
            ) from None
    ranked = sorted(
        (character for character in counts if not character.isspace()),
        key=lambda character: (-counts[character], character),
    )
    return ranked[:limit]


def _fit_alphabet(alphabet: list[str], continued: set[str], room: int) -> list[str]:
    """The most frequent characters whose tokens and ``##`` forms fit in ``room`` tokens.

    Args:
      alphabet: characters by falling frequency.
      continued: characters that also occur inside words (and so get a ``##`` token).
      room: the number of tokens available.

    Returns:
      A prefix of ``alphabet``; characters left out encode as ``[UNK]``.
    """
    used = 0
    for index, character in enumerate(alphabet):
        used += 2 if character in continued else 1
        if used > room:
            return alphabet[:index]
    return alphabet


def _run_trainer(
    files: Sequence[str],
    lowercase: bool,
    vocab_size: int,
    alphabet: Sequence[str],
    fixed_tokens: Sequence[str],
) -> list[str]:
    """Runs the Rust WordPiece trainer; returns the tokens by id."""
    tokenizer = _bert_tokenizer(models.WordPiece(unk_token=UNK_TOKEN), lowercase)
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        min_frequency=MIN_PAIR_FREQUENCY,
        show_progress=False,
        special_tokens=[*SPECIAL_TOKENS, *fixed_tokens],
        limit_alphabet=len(alphabet),
        initial_alphabet=list(alphabet),
        continuing_subword_prefix=CONTINUATION_PREFIX,
    )
    tokenizer.train(list(files), trainer=trainer)
    token_ids = tokenizer.get_vocab(with_added_tokens=False)
    tokens = sorted(token_ids, key=token_ids.__getitem__)
    if [token_ids[token] for token in tokens] != list(range(len(tokens))):
        raise RuntimeError("the WordPiece trainer returned non-contiguous token ids")
    return tokens


# ----------------------------------------------------------------------------------- loading


def load_vocab(vocab_file: str, lowercase: bool) -> Vocab:
    """Loads a BERT ``vocab.txt`` (one token per line, line number = id).

    Args:
      vocab_file: the vocabulary file (ours or Google's BERT layout).
      lowercase: lowercase and strip accents before tokenising; must match how the vocabulary
        was made (True for "uncased" vocabularies).

    Returns:
      The ``Vocab``.

    Raises:
      DataError: the file is missing, unreadable, not UTF-8 text, or not a BERT vocab
        (see `vocab_tokens`); the message names the file and, where there is one, the line.
    """
    return vocab_from_tokens(vocab_tokens(read_vocab_text(vocab_file), vocab_file), lowercase)


def vocab_from_tokens(tokens: Sequence[str], lowercase: bool) -> Vocab:
    """Builds the ``Vocab`` of tokens checked by `vocab_tokens` (id = position)."""
    tokens = list(tokens)
    token_ids = {token: token_id for token_id, token in enumerate(tokens)}
    model = models.WordPiece(
        token_ids,
        unk_token=UNK_TOKEN,
        continuing_subword_prefix=CONTINUATION_PREFIX,
        max_input_chars_per_word=MAX_WORD_CHARACTERS,
    )
    tokenizer = _bert_tokenizer(model, lowercase)
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))  # "[MASK]" in text is the mask token
    special_ids = [i for i, token in enumerate(tokens) if _BRACKETED_TOKEN_RE.fullmatch(token)]
    return Vocab(
        tokenizer=tokenizer,
        tokens=tokens,
        lowercase=lowercase,
        pad_id=token_ids[PAD_TOKEN],
        unk_id=token_ids[UNK_TOKEN],
        cls_id=token_ids[CLS_TOKEN],
        sep_id=token_ids[SEP_TOKEN],
        mask_id=token_ids[MASK_TOKEN],
        special_ids=np.asarray(special_ids, dtype=np.int32),
        is_continuation=np.asarray(
            [
                token.startswith(CONTINUATION_PREFIX) and len(token) > len(CONTINUATION_PREFIX)
                for token in tokens
            ],
            dtype=bool,
        ),
    )


def read_vocab_text(vocab_file: str) -> str:
    """Reads a vocab file as UTF-8 text (a leading byte-order mark is dropped).

    Args:
      vocab_file: the file.

    Returns:
      Its text, with universal newlines turned into ``\\n``.

    Raises:
      DataError: the file is missing or unreadable, or a line is not UTF-8 (named by number).
    """
    try:
        with open(vocab_file, "rb") as file:
            data = file.read()
    except FileNotFoundError:
        raise DataError(
            f"vocab file {vocab_file} does not exist; check the path of the BERT vocab.txt"
        ) from None
    except OSError as error:
        raise DataError(
            f"vocab file '{vocab_file}' cannot be read ({error.strerror or error}); check the "
            "path and its permissions"
        ) from None
    data = data.removeprefix(b"\xef\xbb\xbf")  # Byte-order mark (Windows editors).
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line_number = data.count(b"\n", 0, error.start) + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1)
        raise DataError(
            f"{vocab_file}:{line_number}: not valid UTF-8 ({error.reason} at byte {column} of "
            "the line); re-encode the file as UTF-8 or give a BERT vocab.txt"
        ) from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def vocab_tokens(text: str, where: str) -> list[str]:
    """Splits a ``vocab.txt``'s text into its tokens and checks they make a BERT vocab.

    Each line is one token (surrounding whitespace dropped); trailing blank lines are ignored.

    Args:
      text: the file's text (`read_vocab_text`).
      where: the file, for messages.

    Returns:
      The tokens by id.

    Raises:
      DataError: no tokens, a blank line, a NUL byte (a binary file), a token holding
        whitespace (another tokenizer's vocab), a duplicate, or a missing special token.
    """
    tokens = [line.strip() for line in text.split("\n")]
    while tokens and not tokens[-1]:
        tokens.pop()
    if not tokens:
        raise DataError(f"vocab file '{where}' is empty; give a BERT vocab.txt (one token a line)")
    first_line: dict[str, int] = {}
    for line_number, token in enumerate(tokens, start=1):
        if not token:
            raise DataError(f"{where}:{line_number}: empty token; remove the blank line")
        if "\0" in token:
            raise DataError(
                f"{where}:{line_number}: a NUL byte; this is a binary file, not a BERT vocab.txt "
                "(UTF-8 text, one token a line)"
            )
        if any(character.isspace() for character in token):
            raise DataError(
                f"{where}:{line_number}: token {token!r} holds whitespace; a BERT vocab.txt has "
                "one token a line and nothing else (is it another tokenizer's vocab?)"
            )
        if token in first_line:
            raise DataError(
                f"{where}:{line_number}: duplicate token {token!r} (first on line "
                f"{first_line[token]}); each token must appear once"
            )
        first_line[token] = line_number
    missing = [token for token in SPECIAL_TOKENS if token not in first_line]
    if missing:
        raise DataError(
            f"{where}: the special token{'s' if len(missing) > 1 else ''} "
            f"{' '.join(missing)} {'are' if len(missing) > 1 else 'is'} missing; a BERT "
            f"vocab.txt needs all of {' '.join(SPECIAL_TOKENS)}"
        )
    return tokens


# ---------------------------------------------------------------------------------- encoding


def encode_sentences(vocab: Vocab, sentences: Sequence[str]) -> list[np.ndarray]:
    """Encodes sentences to WordPiece ids with the Rust batch encoder; no special tokens added.

    Args:
      vocab: the vocabulary.
      sentences: the texts.

    Returns:
      One int32 array of ids per sentence (empty for text with no tokens).
    """
    encode_batch = getattr(vocab.tokenizer, "encode_batch_fast", vocab.tokenizer.encode_batch)
    ids: list[np.ndarray] = []
    for start in range(0, len(sentences), ENCODE_CHUNK_SENTENCES):
        chunk = list(sentences[start : start + ENCODE_CHUNK_SENTENCES])
        for encoding in encode_batch(chunk, add_special_tokens=False):
            ids.append(np.asarray(encoding.ids, dtype=np.int32))
    return ids


def encode_documents(vocab: Vocab, documents: Sequence[Sequence[str]]) -> list[list[np.ndarray]]:
    """Encodes documents sentence by sentence, dropping sentences that encode to nothing.

    Args:
      vocab: the vocabulary.
      documents: each a list of sentences.

    Returns:
      Per document, one int32 id array per non-empty sentence; documents left with no
      sentences are dropped.
    """
    flat_ids = encode_sentences(
        vocab, [sentence for document in documents for sentence in document]
    )
    encoded = []
    start = 0
    for document in documents:
        sentence_ids = [ids for ids in flat_ids[start : start + len(document)] if ids.size]
        start += len(document)
        if sentence_ids:
            encoded.append(sentence_ids)
    return encoded


def decode(vocab: Vocab, ids: Sequence[int] | np.ndarray, skip_special_tokens: bool = True) -> str:
    """Joins WordPiece ids back into text (``##`` pieces glued to their word).

    Args:
      vocab: the vocabulary.
      ids: token ids.
      skip_special_tokens: drop ``[PAD] [UNK] [CLS] [SEP] [MASK]`` from the text.

    Returns:
      The text (lowercased if the vocabulary is).
    """
    return vocab.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
