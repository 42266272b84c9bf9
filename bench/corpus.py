"""A real mixed-length text set for the packing benchmark: the bundled tasks are short and nearly equal in length,
which is where packing gains least. 300 news articles (gensim's lee_background.cor, hundreds of tokens each)
mixed with Pang & Lee movie-review sentences (tens of tokens), seeded, as plain-text records. Both come from the
archives flexrank already fetches at set-up (corpora.py); nothing synthetic."""

import csv
import random
import zipfile

from flexrank.data import corpora

LEE = "gensim/test/test_data/lee_background.cor"


def news_articles() -> list[str]:
    # the same wheel flexrank fetches for the analogies (kept in the downloads cache)
    wheel = corpora._pip_download("gensim==4.4.0", "gensim-4.4.0-*.whl", ["--only-binary=:all:"])
    with zipfile.ZipFile(wheel) as zf:
        lines = zf.read(LEE).decode("utf-8").splitlines()
    return [line.strip() for line in lines if line.strip()]


def review_sentences() -> list[str]:
    with open(corpora.polarity_file(), encoding="utf-8-sig", newline="") as f:
        return [row[1].strip() for row in csv.reader(f) if len(row) == 2]


def mixed_records(n: int, seed: int = 0, long_share: float = 0.25) -> list[dict]:
    """n text records, about `long_share` of them news articles and the rest review sentences, shuffled. A set
    larger than the sources (the GPU benchmark's batches of thousands of tokens) repeats them, each source
    used whole before any record of it repeats, so the share of long records stays `long_share` at every size."""
    rng = random.Random(seed)
    articles, sentences = news_articles(), review_sentences()
    n_long = round(n * long_share)
    texts = _draw(rng, articles, n_long) + _draw(rng, sentences, n - n_long)
    rng.shuffle(texts)
    return [{"text": t} for t in texts]


def _draw(rng: random.Random, pool: list[str], k: int) -> list[str]:
    """k items of pool without repeats while k <= len(pool) (then exactly rng.sample), else whole shuffled
    copies of pool and a sample of the rest."""
    whole, rest = divmod(k, len(pool))
    out = rng.sample(pool, rest)
    for _ in range(whole):
        out += rng.sample(pool, len(pool))
    return out
