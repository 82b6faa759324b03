"""Caption metrics: BLEU-1..4, CIDEr-D and ROUGE-L, in pure Python.

The definitions are those of the COCO caption evaluation code (pycocoevalcap), so our numbers
sit on the same scale as published ones; pycocoevalcap itself is only the oracle in the tests.
Scales as there: BLEU and ROUGE-L in [0, 1], CIDEr-D in [0, 10] (papers print them x100).

- BLEU-k: corpus level. Clipped n-gram matches (against the per-n-gram maximum count over the
  references) and candidate n-gram counts are summed over the corpus; BLEU-k is the geometric mean
  of the precisions of orders 1..k times one brevity penalty exp(1 - R/H) when H < R, where H is
  the total candidate length and R sums, per sample, the reference length closest to the
  candidate's (ties -> the shorter). A zero precision gives 0 (pycocoevalcap's 1e-15 smoothing
  gives ~1e-5 instead; a real corpus never has zero 1..4-gram matches).
- CIDEr-D: per sample, for n = 1..4, tf-idf vectors (raw counts x log(N / df), df = number of
  samples whose references contain the n-gram, N = corpus size, so the idf depends on the whole
  corpus and a one-sample corpus scores 0); similarity to each reference = sum of
  min(cand, ref) * ref over the candidate's n-grams, divided by both norms, times the length
  penalty exp(-(len_c - len_r)^2 / (2 * 6^2)); averaged over orders and references, times 10.
- ROUGE-L: per sample, LCS-based precision and recall against every reference; the best
  precision and the best recall (possibly from different references) combine into an F-score
  with beta = 1.2; the corpus score is the mean over samples. An empty candidate scores 0.

Tokenisation (`tokenize`) is ours: lowercase, apostrophes dropped ("dog's" -> "dogs"), every
other character that is not a letter or digit becomes a space, split on whitespace. COCO uses the
Java PTB tokenizer, so leaderboard numbers can differ slightly on punctuation-heavy text.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

_APOSTROPHES = re.compile(r"['\u2019`]")
_NON_ALNUM = re.compile(r"[\W_]+")

Ngram = tuple[str, ...]


def tokenize(text: str) -> list[str]:
    """Lowercase, drop apostrophes, turn any other non-alphanumeric run into a space, split."""
    if not isinstance(text, str):
        raise TypeError(f"caption must be a str, got {type(text).__name__}: {text!r}")
    return _NON_ALNUM.sub(" ", _APOSTROPHES.sub("", text.lower())).split()


def _prepare(
    predictions: Sequence[str], references: Sequence[str | Sequence[str]]
) -> list[tuple[list[str], list[list[str]]]]:
    """Validate and tokenise: one candidate and >= 1 references per sample."""
    if isinstance(predictions, str) or isinstance(references, str):
        raise TypeError("predictions and references must be sequences of captions, not a single str")
    if len(predictions) != len(references):
        raise ValueError(
            f"predictions and references differ in length: {len(predictions)} != {len(references)}"
        )
    if len(predictions) == 0:
        raise ValueError("predictions is empty: caption metrics need at least one sample")
    samples = []
    for i, (pred, refs) in enumerate(zip(predictions, references)):
        refs = [refs] if isinstance(refs, str) else list(refs)
        if not refs:
            raise ValueError(f"references[{i}] is empty: every sample needs at least one reference")
        samples.append((tokenize(pred), [tokenize(r) for r in refs]))
    return samples


def _ngrams(tokens: list[str], max_order: int) -> Counter[Ngram]:
    """Counts of every n-gram of order 1..max_order."""
    counts: Counter[Ngram] = Counter()
    for n in range(1, max_order + 1):
        for i in range(len(tokens) - n + 1):
            counts[tuple(tokens[i : i + n])] += 1
    return counts


# ---------------------------------------------------------------------------------------- BLEU


def bleu(
    predictions: Sequence[str], references: Sequence[str | Sequence[str]], max_order: int = 4
) -> dict[str, float]:
    """Corpus BLEU-1..max_order -> {"bleu_1": ..., ..., "bleu_{max_order}": ...}."""
    if not isinstance(max_order, int) or max_order < 1:
        raise ValueError(f"max_order must be a positive int, got {max_order!r}")
    matches = [0] * max_order  # clipped n-gram matches per order, summed over the corpus
    totals = [0] * max_order  # candidate n-grams per order
    cand_len = ref_len = 0
    for cand, refs in _prepare(predictions, references):
        max_ref_counts: Counter[Ngram] = Counter()
        for ref in refs:
            max_ref_counts |= _ngrams(ref, max_order)  # | keeps the max count per n-gram
        for ngram, count in _ngrams(cand, max_order).items():
            matches[len(ngram) - 1] += min(count, max_ref_counts[ngram])
        for n in range(1, max_order + 1):
            totals[n - 1] += max(0, len(cand) - n + 1)
        cand_len += len(cand)
        ref_len += min((abs(len(r) - len(cand)), len(r)) for r in refs)[1]  # closest, then shorter

    brevity = 1.0 if cand_len >= ref_len else (math.exp(1 - ref_len / cand_len) if cand_len else 0.0)
    scores, log_sum = {}, 0.0
    for n in range(1, max_order + 1):
        if matches[n - 1] == 0 or log_sum == -math.inf:
            log_sum = -math.inf
            scores[f"bleu_{n}"] = 0.0
            continue
        log_sum += math.log(matches[n - 1] / totals[n - 1])
        scores[f"bleu_{n}"] = brevity * math.exp(log_sum / n)
    return scores


# ------------------------------------------------------------------------------------- CIDEr-D


def cider_d_scores(
    predictions: Sequence[str],
    references: Sequence[str | Sequence[str]],
    max_order: int = 4,
    sigma: float = 6.0,
) -> list[float]:
    """Per-sample CIDEr-D; the idf comes from all samples' references together."""
    samples = _prepare(predictions, references)
    doc_freq: Counter[Ngram] = Counter()
    for _, refs in samples:
        doc_freq.update(set().union(*(_ngrams(r, max_order) for r in refs)))
    log_n = math.log(len(samples))

    def tfidf(tokens: list[str]) -> tuple[list[dict[Ngram, float]], list[float]]:
        """Per-order tf-idf vectors and their L2 norms."""
        vecs: list[dict[Ngram, float]] = [{} for _ in range(max_order)]
        for ngram, tf in _ngrams(tokens, max_order).items():
            vecs[len(ngram) - 1][ngram] = tf * (log_n - math.log(max(1.0, doc_freq[ngram])))
        return vecs, [math.sqrt(sum(v * v for v in vec.values())) for vec in vecs]

    scores = []
    for cand, refs in samples:
        cand_vecs, cand_norms = tfidf(cand)
        total = 0.0
        for ref in refs:
            ref_vecs, ref_norms = tfidf(ref)
            penalty = math.exp(-((len(cand) - len(ref)) ** 2) / (2 * sigma**2))
            for c_vec, c_norm, r_vec, r_norm in zip(cand_vecs, cand_norms, ref_vecs, ref_norms):
                if c_norm == 0 or r_norm == 0:
                    continue  # an order with no weighted n-grams contributes 0
                dot = sum(min(w, r_vec.get(g, 0.0)) * r_vec.get(g, 0.0) for g, w in c_vec.items())
                total += penalty * dot / (c_norm * r_norm)
        scores.append(10.0 * total / (max_order * len(refs)))
    return scores


def cider_d(
    predictions: Sequence[str],
    references: Sequence[str | Sequence[str]],
    max_order: int = 4,
    sigma: float = 6.0,
) -> float:
    """Corpus CIDEr-D: the mean of the per-sample scores."""
    scores = cider_d_scores(predictions, references, max_order, sigma)
    return sum(scores) / len(scores)


# ------------------------------------------------------------------------------------- ROUGE-L


def _lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence, O(len(a) * len(b)) time, O(len(b)) memory."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l_scores(
    predictions: Sequence[str], references: Sequence[str | Sequence[str]], beta: float = 1.2
) -> list[float]:
    """Per-sample ROUGE-L F-scores (best precision and best recall over the references)."""
    scores = []
    for cand, refs in _prepare(predictions, references):
        if not cand:
            scores.append(0.0)
            continue
        lcs = [_lcs_length(ref, cand) for ref in refs]
        prec = max(m / len(cand) for m in lcs)
        rec = max(m / len(ref) if ref else 0.0 for m, ref in zip(lcs, refs))
        if prec == 0 or rec == 0:
            scores.append(0.0)
        else:
            scores.append((1 + beta**2) * prec * rec / (rec + beta**2 * prec))
    return scores


def rouge_l(
    predictions: Sequence[str], references: Sequence[str | Sequence[str]], beta: float = 1.2
) -> float:
    """Corpus ROUGE-L: the mean of the per-sample scores."""
    scores = rouge_l_scores(predictions, references, beta)
    return sum(scores) / len(scores)


def caption_metrics(
    predictions: Sequence[str], references: Sequence[str | Sequence[str]]
) -> dict[str, float]:
    """All caption metrics at once: bleu_1..bleu_4, cider (CIDEr-D), rouge_l."""
    return {
        **bleu(predictions, references),
        "cider": cider_d(predictions, references),
        "rouge_l": rouge_l(predictions, references),
    }


__all__ = [
    "bleu",
    "caption_metrics",
    "cider_d",
    "cider_d_scores",
    "rouge_l",
    "rouge_l_scores",
    "tokenize",
]
