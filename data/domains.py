"""Domain-mix byte data for the MoE Routing Testbed (moe_testbed.py).

Two sources, one result type (`Domains`: per-domain uint8 byte arrays for train and val):

1. `synthetic_domains(seed, overlap)` -- 8 procedural "languages", deterministic from the seed.
   Each language has
     - its own character inventory: three share the Latin script (plain ASCII open syllables,
       ASCII consonant clusters, Latin with diacritics = 2-byte UTF-8), the others live in other
       Unicode blocks (Greek, Cyrillic, Armenian: 2-byte; Devanagari, Hiragana: 3-byte), so their
       UTF-8 bytes differ;
     - a vocabulary of words built from language-specific syllables (onset + nucleus + coda),
       with Zipf-Mandelbrot word frequencies p(r) ~ 1/(r + 2.7)^s (shorter words are more common);
     - word-order structure: every word belongs to one of a few word classes and the classes
       follow a language-specific first-order Markov chain (a toy grammar), sentences of
       language-specific length, capitalised where the script has case, ending in the language's
       own punctuation;
     - documents of varying length (log-normal number of sentences, language-specific mean).
   Overlap between domains (how hard they are to tell apart), controlled by `overlap`:
     - always shared by all 8: space, newline, digits (numbers appear in ~2% of word slots), ",";
     - three languages share the Latin alphabet, and two of them use pure ASCII;
     - `overlap` = probability that a word slot is filled from one SHARED "loanword" vocabulary
       (ASCII words from a common syllable set, the same words for every language). 0 = only the
       shared characters above; 1 = every language emits the same word stream (nearly
       indistinguishable domains). Default 0.1.
2. `text_domains(data_dir)` -- real text: `data_dir/<domain>/*.txt` (UTF-8), any number of
   domains >= 2.
   Documents are the files' blank-line-separated paragraphs. Train/val split by document (a
   deterministic hash of the document text, ~`val_frac` of documents to val; a domain whose
   documents all hash to train gives its last one to val), then every domain's train and val streams
   are truncated to the smallest domain's token count (balance by tokens). Tokenized arrays are
   cached with np.save / np.load(allow_pickle=False) under `cache_dir`.

Tokens are bytes (vocabulary 256). Documents are joined with "\n\n" inside each domain's stream, so
a training window can cross a document boundary but never a domain boundary.
"""

import hashlib
import json
import math
import os
from bisect import bisect_right
from dataclasses import dataclass

import numpy as np


class DataError(ValueError):
    """Bad or missing data; the message is one line, suitable for a CLI error."""


@dataclass
class Domains:
    names: list        # domain names, index = domain id
    train: list        # per domain: uint8 array of bytes (one long stream of documents)
    val: list          # per domain: uint8 array of bytes (held-out documents)


# --------------------------------------------------------------------------------------------------
# Procedural languages
# --------------------------------------------------------------------------------------------------

# name, onsets, nuclei, codas, word separator, sentence end marks, mean syllables/word,
# mean words/sentence, mean sentences/doc.  "" in a list means "may be empty".
LANGUAGES = [
    ("latin_open", list("ptkmnlsvh"), list("aeiou"), ["", "", "", "n"], " ",
     [".", ".", "?"], 2.2, 9, 12),
    ("latin_cluster", ["b", "d", "g", "br", "dr", "gr", "st", "sk", "z", "w", "f"], list("aoyu"),
     ["", "rk", "st", "x", "ff"], " ", [".", "!"], 1.6, 6, 6),
    ("latin_diacritic", list("šžčřňďťcjl"), ["á", "é", "í", "ó", "ú", "ě", "a", "e"],
     ["", "", "ň", "j"], " ", [".", ";"], 2.6, 11, 18),
    ("greek", list("βγδζθκλμνξπρστφχ"), list("αεηιουω"), ["", "", "ς", "ν"], " ",
     [".", ";"], 2.4, 10, 10),
    ("cyrillic", list("бвгджзклмнпрстфхцчш"), list("аеиоуыэюя"), ["", "", "й", "ть"], " ",
     [".", "!"], 2.3, 8, 16),
    ("armenian", list("բգդզթժլխծկհձղճմյնշչպջռսվտրցփքֆ"), list("աեէըիոօ"), ["", "", "ն", "ր"], " ",
     ["։", "՞"], 2.5, 9, 8),
    ("devanagari", list("कखगचजटडतदनपबमयरलवसह"), ["", "ा", "ि", "ी", "ु", "े", "ो"],
     ["", "", "ं"], " ", ["।", "।", "?"], 2.0, 12, 14),
    ("kana", list("かきくけこさしすせそたちつてとなにぬねのはひふへほまみむめもらりるれろ"), [""], ["", "", "ん"], "",
     ["。", "。", "？"], 2.8, 7, 10),
]
# the syllables of the shared loanwords (ASCII, the same words for every language)
LOAN_SYLLABLES = [o + n for o in "mrtsl" for n in ("ax", "ex", "on", "ik")]

N_CLASSES = 6          # word classes of the toy grammar
VOCAB_PER_LANG = 1500  # distinct words per language
ZIPF_S = 1.1           # Zipf-Mandelbrot exponent


def _syllables(rng, onsets, nuclei, codas, n=60):
    """A language's syllable inventory: n distinct onset+nucleus+coda strings."""
    all_syl = sorted({o + v + c for o in onsets for v in nuclei for c in codas})
    rng.shuffle(all_syl)
    return all_syl[:n]


def _vocabulary(rng, syllables, mean_syl, size):
    """`size` distinct words of 1+Poisson(mean_syl-1) syllables, sorted short-first
    (rank 0 = most frequent)."""
    words, seen = [], set()
    while len(words) < size:
        n = 1 + rng.poisson(mean_syl - 1)
        w = "".join(syllables[i] for i in rng.integers(0, len(syllables), n))
        if w not in seen:
            seen.add(w)
            words.append(w)
    words.sort(key=len)      # shorter words get the higher frequencies (Zipf's law of abbreviation)
    return words


def _zipf(size):
    p = 1.0 / (np.arange(size) + 2.7) ** ZIPF_S   # Zipf-Mandelbrot
    return p / p.sum()


class _Language:
    """Samples documents of one procedural language."""

    def __init__(self, spec, seed, lang_id, loanwords):
        name, onsets, nuclei, codas, sep, ends, mean_syl, mean_words, mean_sents = spec
        rng = np.random.default_rng([seed, lang_id, 0])
        self.name, self.sep, self.ends = name, sep, ends
        self.mean_words, self.mean_sents = mean_words, mean_sents
        self.words = _vocabulary(rng, _syllables(rng, onsets, nuclei, codas), mean_syl,
                                 VOCAB_PER_LANG)
        self.loanwords = loanwords
        # word classes: word w is in class w % N_CLASSES; inside a class, Zipf by overall rank
        p = _zipf(len(self.words))
        self.class_words = [np.arange(c, len(self.words), N_CLASSES) for c in range(N_CLASSES)]
        self.class_cdf = [np.cumsum(p[ws] / p[ws].sum()) for ws in self.class_words]
        # class transitions: a sparse Dirichlet row per class = the language's word order
        trans = rng.dirichlet(np.full(N_CLASSES, 0.3), size=N_CLASSES)
        self.trans_cdf = [list(np.cumsum(row)) for row in trans]
        self.start_cdf = list(np.cumsum(rng.dirichlet(np.full(N_CLASSES, 0.5))))
        self.loan_cdf = np.cumsum(_zipf(len(loanwords)))

    def document(self, rng, overlap):
        n_sent = max(1, int(rng.lognormal(math.log(self.mean_sents), 0.6)))
        sents = []
        for _ in range(n_sent):
            n = max(2, int(rng.poisson(self.mean_words)))
            u = rng.random(n)
            # class chain: a first-order Markov walk (sequential by nature; cheap, few classes)
            cls, c = [], min(bisect_right(self.start_cdf, u[0]), N_CLASSES - 1)
            for i in range(n):
                cls.append(c)
                c = min(bisect_right(self.trans_cdf[c], u[i]), N_CLASSES - 1)
            r, kind = rng.random(n), rng.random(n)
            out = []
            for i, c in enumerate(cls):
                if kind[i] < overlap:                                      # shared loanword
                    out.append(self.loanwords[int(np.searchsorted(self.loan_cdf, r[i]))])
                elif kind[i] > 0.98:                                       # a number
                    out.append(str(int(rng.integers(1, 2000))))
                else:
                    j = min(int(np.searchsorted(self.class_cdf[c], r[i])),
                            len(self.class_words[c]) - 1)
                    out.append(self.words[self.class_words[c][j]])
            if n > 6 and rng.random() < 0.4:                               # a comma mid-sentence
                k = int(rng.integers(2, n - 2))
                out[k] = out[k] + ","
            s = self.sep.join(out)
            sents.append(s[:1].upper() + s[1:] + self.ends[int(rng.integers(len(self.ends)))])
        return self.sep.join(sents)


def _loanwords(seed, size=200):
    rng = np.random.default_rng([seed, 999])
    return _vocabulary(rng, LOAN_SYLLABLES, 2.0, size)


_SYNTH_CACHE = {}


def synthetic_domains(seed=0, overlap=0.1, train_bytes=300_000, val_bytes=40_000):
    """8 procedural languages, each `train_bytes` + `val_bytes` long (balanced by token count).
    Train/val are split by document: documents are generated in order and the first ones, up to
    `val_bytes`, form val. Deterministic from (seed, overlap, sizes); cached in-process."""
    if not 0.0 <= overlap <= 1.0:
        raise DataError(f"--overlap must be in [0, 1], got {overlap}")
    key = (seed, overlap, train_bytes, val_bytes)
    if key in _SYNTH_CACHE:
        return _SYNTH_CACHE[key]
    loan = _loanwords(seed)
    names, train, val = [], [], []
    for lang_id, spec in enumerate(LANGUAGES):
        lang = _Language(spec, seed, lang_id, loan)
        rng = np.random.default_rng([seed, lang_id, 1])
        streams = {"val": [], "train": []}
        for split, budget in (("val", val_bytes), ("train", train_bytes)):
            n = 0
            while n < budget:
                doc = lang.document(rng, overlap).encode("utf-8") + b"\n\n"
                streams[split].append(doc)
                n += len(doc)
        names.append(lang.name)
        train.append(np.frombuffer(b"".join(streams["train"])[:train_bytes], dtype=np.uint8).copy())
        val.append(np.frombuffer(b"".join(streams["val"])[:val_bytes], dtype=np.uint8).copy())
    _SYNTH_CACHE[key] = Domains(names, train, val)
    return _SYNTH_CACHE[key]


# --------------------------------------------------------------------------------------------------
# Real text: DIR/<domain>/*.txt
# --------------------------------------------------------------------------------------------------

def _is_val(doc_bytes, val_frac):
    """Deterministic split by document: a hash of its bytes, so file order does not matter."""
    h = int.from_bytes(hashlib.sha1(doc_bytes).digest()[:8], "little")
    return (h % 10_000) < val_frac * 10_000


def text_domains(data_dir, cache_dir=None, val_frac=0.1):
    """Read DIR/<domain>/*.txt. Raises DataError (one line) on anything unusable."""
    if not os.path.isdir(data_dir):
        raise DataError(f"--data-dir {data_dir!r} does not exist or is not a directory")
    doms = sorted(d for d in os.listdir(data_dir)
                  if not d.startswith(".") and os.path.isdir(os.path.join(data_dir, d)))
    files = {d: sorted(f for f in os.listdir(os.path.join(data_dir, d)) if f.endswith(".txt"))
             for d in doms}
    doms = [d for d in doms if files[d]]
    if len(doms) < 2:
        raise DataError(f"--data-dir {data_dir!r} needs at least 2 domain subfolders "
                        f"with .txt files, found {len(doms)}")
    # cache key: names, sizes and mtimes of every file, plus the split fraction
    stat = [(d, f, os.path.getsize(os.path.join(data_dir, d, f)),
             int(os.path.getmtime(os.path.join(data_dir, d, f)))) for d in doms for f in files[d]]
    key = hashlib.sha1(json.dumps([stat, val_frac]).encode()).hexdigest()[:16]
    if cache_dir is not None:
        paths = [os.path.join(cache_dir, f"{key}_{i}_{s}.npy")
                 for i in range(len(doms)) for s in ("train", "val")]
        if all(os.path.exists(p) for p in paths):
            arrs = [np.load(p, allow_pickle=False) for p in paths]
            return Domains(doms, arrs[0::2], arrs[1::2])
    train, val = [], []
    for d in doms:
        tr, va = [], []
        for f in files[d]:
            path = os.path.join(data_dir, d, f)
            try:
                with open(path, "rb") as fh:
                    raw = fh.read()
                raw.decode("utf-8")
            except OSError as e:
                raise DataError(f"cannot read {path}: {e.strerror}") from None
            except UnicodeDecodeError as e:
                raise DataError(f"{path} is not valid UTF-8 (byte {e.start})") from None
            for doc in raw.replace(b"\r\n", b"\n").split(b"\n\n"):
                doc = doc.strip()
                if doc:
                    (va if _is_val(doc, val_frac) else tr).append(doc + b"\n\n")
        if not va and len(tr) >= 2:   # small domain, no document hashed to val: give it the last
            va.append(tr.pop())
        if not tr or not va:
            raise DataError(f"domain {d!r} has too few documents for a train/val split "
                            f"(train {len(tr)}, val {len(va)}); "
                            "add text or blank-line-separated paragraphs")
        train.append(np.frombuffer(b"".join(tr), dtype=np.uint8))
        val.append(np.frombuffer(b"".join(va), dtype=np.uint8))
    n_tr, n_va = min(map(len, train)), min(map(len, val))       # balance domains by token count
    train = [a[:n_tr].copy() for a in train]
    val = [a[:n_va].copy() for a in val]
    if cache_dir is not None:
        os.makedirs(cache_dir, exist_ok=True)
        for i in range(len(doms)):
            np.save(os.path.join(cache_dir, f"{key}_{i}_train.npy"), train[i], allow_pickle=False)
            np.save(os.path.join(cache_dir, f"{key}_{i}_val.npy"), val[i], allow_pickle=False)
    return Domains(doms, train, val)


# --------------------------------------------------------------------------------------------------
# Batches: each sequence from one domain; domains balanced inside every batch
# --------------------------------------------------------------------------------------------------

def check_lengths(doms, seq_len):
    for name, tr, va in zip(doms.names, doms.train, doms.val):
        if min(len(tr), len(va)) < seq_len + 1:
            raise DataError(f"--seq-len {seq_len} is longer than the data: domain {name!r} has "
                            f"{len(tr)} train / {len(va)} val bytes")


def train_batch(doms, batch_size, seq_len, seed, step, by_domain=False):
    """Batch for one optimizer step. Stateless: a function of (seed, step) only, so --resume needs
    no data-loader state. Sequence b comes from domain perm[b % L] (balanced: every domain gets
    batch_size/L sequences when L divides batch_size), at a uniform random offset.
    by_domain: the same sequences, stably sorted by domain, so consecutive rows (a micro-batch) hold
    few domains, as when a loader streams each source in runs.
    Returns x_BS, y_BS (int64 next-byte targets), dom_B (int64)."""
    rng = np.random.default_rng([seed, step, 7])
    L = len(doms.names)
    dom_B = rng.permutation(np.resize(rng.permutation(L), batch_size))
    xs = np.empty((batch_size, seq_len + 1), dtype=np.int64)
    for b, d in enumerate(dom_B):
        a = doms.train[d]
        o = int(rng.integers(0, len(a) - seq_len))
        xs[b] = a[o:o + seq_len + 1]
    if by_domain:
        order = np.argsort(dom_B, kind="stable")
        xs, dom_B = xs[order], dom_B[order]
    return xs[:, :-1], xs[:, 1:], dom_B.astype(np.int64)


def val_windows(doms, seq_len, per_domain):
    """Fixed held-out windows: up to `per_domain` non-overlapping windows per domain, evenly spaced.
    Interleaved domain by domain so that every evaluation batch mixes domains (as training batches
    do). Returns x_NS, y_NS, dom_N (numpy int64)."""
    xs, ds = [], []
    for d, a in enumerate(doms.val):
        n = min(per_domain, (len(a) - 1) // seq_len)
        starts = np.linspace(0, len(a) - seq_len - 1, n).astype(np.int64)
        xs.append(np.stack([a[s:s + seq_len + 1] for s in starts]).astype(np.int64))
        ds.append(np.full(n, d, dtype=np.int64))
    n_min = min(len(x) for x in xs)
    x = np.stack([x[:n_min] for x in xs], 1).reshape(-1, seq_len + 1)      # (n, L) -> interleaved
    dom = np.stack([d[:n_min] for d in ds], 1).reshape(-1)
    return x[:, :-1], x[:, 1:], dom
