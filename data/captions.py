"""Standard captioning metrics, as the captioning papers define them: corpus BLEU-4 (Papineni et al.
2002) and a CIDEr-style consensus score (Vedantam et al. 2015). Plain Python over whitespace-split
words; a hypothesis is a string, its references a list of strings."""

import math
from collections import Counter

import numpy as np


def ngrams(words, n):
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def bleu4(hyps, refs):
    """Corpus BLEU-4 (Papineni et al. 2002): clipped n-gram precisions p_1..p_4 summed over the
    corpus, geometric mean, brevity penalty exp(1 - r/c) when c < r, r = the reference length
    closest to each hypothesis' (ties: the shorter). No smoothing: 0 when some p_n has no match."""
    match, total, c, r = [0] * 4, [0] * 4, 0, 0
    for h, rs in zip(hyps, refs):
        hw, rws = h.split(), [x.split() for x in rs]
        c += len(hw)
        r += min((abs(len(x) - len(hw)), len(x)) for x in rws)[1]
        for n in range(1, 5):
            best = {}
            for x in rws:
                for g, k in ngrams(x, n).items():
                    best[g] = max(best.get(g, 0), k)
            match[n - 1] += sum(min(k, best.get(g, 0)) for g, k in ngrams(hw, n).items())
            total[n - 1] += max(len(hw) - n + 1, 0)
    if min(match) == 0:
        return 0.0
    bp = 1.0 if c >= r else math.exp(1 - r / max(c, 1))
    return bp * math.exp(sum(math.log(m / t) for m, t in zip(match, total)) / 4)


def cider(hyps, refs):
    """CIDEr-style consensus (Vedantam et al. 2015, without CIDEr-D's length penalty and clipping):
    TF-IDF n-gram vectors (document frequency over the reference sets), cosine between the
    hypothesis and each reference, averaged over references and over n = 1..4, times 10."""
    N, df = len(refs), {}
    for rs in refs:
        for g in {g for x in rs for n in range(1, 5) for g in ngrams(x.split(), n)}:
            df[g] = df.get(g, 0) + 1

    def vec(words, n):
        return {g: k * math.log(N / max(df.get(g, 0), 1)) for g, k in ngrams(words, n).items()}

    def cos(a, b):
        na, nb = (math.sqrt(sum(x * x for x in v.values())) for v in (a, b))
        return sum(x * b.get(g, 0.0) for g, x in a.items()) / (na * nb) if na and nb else 0.0

    score = sum(np.mean([np.mean([cos(vec(h.split(), n), vec(x.split(), n)) for x in rs])
                         for n in range(1, 5)]) for h, rs in zip(hyps, refs))
    return 10 * score / max(N, 1)
