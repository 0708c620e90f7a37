"""Tests for mlm.data.sentences: sentence splitting in many scripts, and unsplit documents."""

import pytest

from mlm.data import builtin_corpus
from mlm.data.sentences import (
    LONG_SENTENCE_CHARS,
    SplitStats,
    is_unsplit,
    split_sentences,
    text_to_sentences,
)

SCRIPTS = {
    "english": (
        "The cat sat on the mat. It was warm! Was it? Yes.",
        ["The cat sat on the mat.", "It was warm!", "Was it?", "Yes."],
    ),
    "english lower-cased": (
        "the cat sat on the mat. it was warm! was it? yes.",
        ["the cat sat on the mat.", "it was warm!", "was it?", "yes."],
    ),
    "chinese, no spaces": (
        "今天天气很好。我们去公园吧！你去吗？他说：“好的。”然后走了。",
        ["今天天气很好。", "我们去公园吧！", "你去吗？", "他说：“好的。”", "然后走了。"],
    ),
    "chinese, half-width punctuation": (
        "你好.我很好!你呢?好的",
        ["你好.", "我很好!", "你呢?", "好的"],
    ),
    "japanese": (
        "今日は晴れです。公園に行きましょう！行きますか？",
        ["今日は晴れです。", "公園に行きましょう！", "行きますか？"],
    ),
    "hindi (devanagari)": (
        "यह एक वाक्य है। यह दूसरा वाक्य है॥ क्या यह तीसरा है? हाँ।",
        ["यह एक वाक्य है।", "यह दूसरा वाक्य है॥", "क्या यह तीसरा है?", "हाँ।"],
    ),
    "arabic": (
        "هذه جملة. هل هذه جملة ثانية؟ نعم!",
        ["هذه جملة.", "هل هذه جملة ثانية؟", "نعم!"],
    ),
    "urdu": (
        "یہ ایک جملہ ہے۔ کیا یہ دوسرا جملہ ہے؟ ہاں!",
        ["یہ ایک جملہ ہے۔", "کیا یہ دوسرا جملہ ہے؟", "ہاں!"],
    ),
    "russian (cyrillic), mixed case": (
        "это первое предложение. Это второе! а это третье? да, т. е. так.",
        ["это первое предложение.", "Это второе!", "а это третье?", "да, т. е. так."],
    ),
    "greek, ; as question mark": (
        "αυτή είναι μια πρόταση. είναι αυτή ερώτηση; ναι! και αυτή\u037e ναι.",
        ["αυτή είναι μια πρόταση.", "είναι αυτή ερώτηση;", "ναι!", "και αυτή\u037e", "ναι."],
    ),
    "thai, split at spaces (clauses)": (
        "วันนี้อากาศดีมาก เด็กๆ เล่นกัน ปี 2020 เป็นปีที่ดี",
        ["วันนี้อากาศดีมาก", "เด็กๆ เล่นกัน", "ปี 2020 เป็นปีที่ดี"],
    ),
    "spanish, inverted marks": (
        "¿Qué hora es? son las tres. ¡vamos!",
        ["¿Qué hora es?", "son las tres.", "¡vamos!"],
    ),
    "khmer, myanmar, ethiopic ends": (
        "ខ្ញុំ​ទៅ។ကျွန်တော် သွားမယ်။ ሰላም ነው። ደህና",
        ["ខ្ញុំ​ទៅ។", "ကျွန်တော် သွားမယ်။", "ሰላም ነው።", "ደህና"],
    ),
}


@pytest.mark.parametrize("script", SCRIPTS)
def test_splits_each_script(script):
    text, sentences = SCRIPTS[script]
    assert split_sentences(text) == sentences


@pytest.mark.parametrize(
    "text",
    [
        "Dr. Smith met A. Smith in the U.S. yesterday, e.g. at 3.14 pm.",
        "we met dr. smith, i.e. the one from the u.s. army, at no. 5 st. james street.",
        "Prices rose approx. 3.5% vs. last year (see fig. 2) etc. and more.",
        "Visit example.com or www.python.org/3.12/index.html for more.",
        "The paper by Smith et al. shows it (see above!) and more.",
        "He paused... then went on.",
    ],
)
def test_abbreviations_initials_decimals_and_urls_do_not_split(text):
    assert split_sentences(text) == [text]


def test_capitals_after_dotted_abbreviations_and_ellipses_split():
    assert split_sentences("I live in the U.S. It is big. We waited… Then it came.") == [
        "I live in the U.S.",
        "It is big.",
        "We waited…",
        "Then it came.",
    ]


def test_quotes_and_brackets_stay_with_their_sentence():
    assert split_sentences('He said "go." She left. (It rained.) "Why?" she asked.') == [
        'He said "go."',
        "She left.",
        "(It rained.)",
        '"Why?"',
        "she asked.",
    ]


def test_text_to_sentences_splits_lines_first_and_normalises_whitespace():
    text = "Title\n\n  first one.\tsecond one!\n \nlast paragraph\u2028End.\n"
    assert text_to_sentences(text) == [
        "Title",
        "first one.",
        "second one!",
        "last paragraph",
        "End.",
    ]
    assert text_to_sentences(" \n\n") == []
    assert split_sentences("") == []


def test_builtin_corpus_keeps_its_own_capital_letter_rule():
    # The docstring corpus is split as before (the same corpus); documents use the new rule.
    text = "returns the path. path may be relative. Raises OSError."
    assert builtin_corpus.split_sentences(text) == [
        "returns the path. path may be relative.",
        "Raises OSError.",
    ]
    assert split_sentences(text) == [
        "returns the path.",
        "path may be relative.",
        "Raises OSError.",
    ]


def test_unsplit_documents_are_counted_and_reported_once():
    words = "word " * (LONG_SENTENCE_CHARS // 5 + 1)
    unsplit = f"Title\n{words}\n{words}"  # several lines, but paragraphs without punctuation
    split = "Title\n" + "A short sentence here. " * 100
    assert is_unsplit(text_to_sentences(unsplit))
    assert not is_unsplit(text_to_sentences(split))
    assert not is_unsplit(text_to_sentences(""))

    stats = SplitStats()
    assert stats.warning("data.tfds_name=x") is None
    for text in (split, unsplit, "", split, unsplit):
        stats.add(text_to_sentences(text))
    assert (stats.documents, stats.unsplit) == (5, 2)
    line = stats.warning("data.tfds_name=x split 'train'")
    assert "\n" not in line
    assert line.startswith(
        "2 of 5 documents sampled from data.tfds_name=x split 'train' did not split into "
        "sentences (a paragraph of over 1,000 characters has no sentence punctuation)"
    )
