"""VQA soft accuracy with VQAv2 answer normalisation.

Normalisation (`normalize_answer`), in the order of the VQAv2 evaluation code (rules reimplemented):
1. newlines / tabs -> spaces, lowercase, surrounding whitespace stripped;
2. punctuation (; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !): per character, removed outright if it
   touches a space somewhere in the answer (or the answer has a comma between digits, "1,000"),
   otherwise replaced by a space ("t-shirt" -> "t shirt");
3. periods are removed unless a digit follows ("yes." -> "yes", "2.5" stays);
4. per word: number words zero..ten (and "none") become digits ("two" -> "2"), the articles
   a / an / the are dropped, and apostrophe-less contractions get their apostrophe
   ("dont" -> "don't"). Words that are also ordinary words ("its", "well", "shed") are left alone.
Both the prediction and every reference answer are normalised (VQAv2's code normalises the
references only when annotators disagree; normalising always is the same or stricter-fair).

Soft accuracy of one prediction against n reference answers (VQAv2: n = 10): for each of the n
leave-one-out subsets of n - 1 answers, min(1, matches / t) with t = min(3, n - 1); the mean over
the subsets. With 10 answers: k matching answers give 0, 0.3, 0.6, 0.9, 1.0 for k = 0, 1, 2, 3, 4+
(k = 3: the 3 subsets without a matching answer score 2/3, the other 7 score 1 -> 0.9; the folklore
"3 agree -> 1.0" is min(1, k/3) without leave-one-out). Fewer answers: t shrinks so that a
prediction all annotators agree with still scores 1; a single answer is an exact match (0 or 1).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
# Apostrophe-less spelling -> canonical spelling; only forms that are not ordinary words.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldnt": "couldn't",
    "couldve": "could've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hasnt": "hasn't", "havent": "haven't", "hes": "he's", "im": "i'm",
    "isnt": "isn't", "itll": "it'll", "ive": "i've", "lets": "let's", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "oclock": "o'clock",
    "shouldnt": "shouldn't", "shouldve": "should've", "thats": "that's", "theres": "there's",
    "theyre": "they're", "theyve": "they've", "wasnt": "wasn't", "werent": "weren't",
    "whats": "what's", "wheres": "where's", "whos": "who's", "wont": "won't",
    "wouldnt": "wouldn't", "wouldve": "would've", "youre": "you're", "youve": "you've",
}


def normalize_answer(answer: str) -> str:
    """VQAv2 answer normalisation (see the module docstring for the rules)."""
    if not isinstance(answer, str):
        raise TypeError(f"answer must be a str, got {type(answer).__name__}: {answer!r}")
    text = answer.replace("\n", " ").replace("\t", " ").strip().lower()
    has_digit_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
    for p in _PUNCTUATION:
        if p not in text:
            continue
        touches_space = f"{p} " in text or f" {p}" in text
        text = text.replace(p, "" if touches_space or has_digit_comma else " ")
    text = _PERIOD_NOT_BEFORE_DIGIT.sub("", text)
    words = [_NUMBER_WORDS.get(w, w) for w in text.split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_score(prediction: str, answers: Sequence[str]) -> float:
    """Soft accuracy of one prediction against its reference answers (leave-one-out mean)."""
    if isinstance(answers, str) or len(answers) == 0:
        raise ValueError(f"answers must be a non-empty list of str, got {answers!r}")
    pred = normalize_answer(prediction)
    hits = [normalize_answer(a) == pred for a in answers]
    n, k = len(hits), sum(hits)
    if n == 1:
        return float(k)
    threshold = min(3, n - 1)
    # Leaving out a matching answer leaves k - 1 matches (k such subsets); any other leaves k.
    return (k * min(1.0, (k - 1) / threshold) + (n - k) * min(1.0, k / threshold)) / n


def vqa_accuracy(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean soft accuracy over questions; references[i] holds question i's answers (VQAv2: 10)."""
    if isinstance(predictions, str) or isinstance(references, str):
        raise TypeError("predictions and references must be sequences, not a single str")
    if len(predictions) != len(references):
        raise ValueError(
            f"predictions and references differ in length: {len(predictions)} != {len(references)}"
        )
    if len(predictions) == 0:
        raise ValueError("predictions is empty: VQA accuracy needs at least one question")
    scores = []
    for i, (pred, answers) in enumerate(zip(predictions, references)):
        answers = [answers] if isinstance(answers, str) else list(answers)
        if not answers:
            raise ValueError(f"references[{i}] is empty: every question needs at least one answer")
        scores.append(vqa_score(pred, answers))
    return sum(scores) / len(scores)


__all__ = ["normalize_answer", "vqa_accuracy", "vqa_score"]
