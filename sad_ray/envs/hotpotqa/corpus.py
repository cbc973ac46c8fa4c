"""A small in-memory Wikipedia: pages as sentence lists, exact-title search with redirects, BM25 for misses.

It answers the two questions ReAct's `wikienv.py` asks of Wikipedia: "is there a page with this title?" and
"which titles are similar?", and gives the sentences `search` shows and `lookup` scans.
"""

from __future__ import annotations

import logging
import threading
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

# ReAct shows the first five sentences of a page for `search` (wikienv.get_page_obs).
SEARCH_SENTENCES = 5
SIMILAR_TITLES = 5


@dataclass(frozen=True)
class Page:
    title: str
    sentences: tuple[str, ...]

    def summary(self) -> str:
        return " ".join(self.sentences[:SEARCH_SENTENCES])

    def matches(self, keyword: str) -> list[int]:
        """Indices of the sentences containing `keyword`, case-insensitively, in page order (ReAct's lookup)."""
        needle = keyword.lower()
        return [i for i, s in enumerate(self.sentences) if needle in s.lower()]


def fold(text: str) -> str:
    """Accent- and case-insensitive form, so 'Sao Paulo' finds 'São Paulo' as Wikipedia's redirects would."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch)).casefold()


def title_key(text: str) -> str:
    key = " ".join(fold(text).replace("_", " ").split())
    # "the United States" and "The Gambia" both reach their page with or without the article.
    return key[4:] if key.startswith("the ") else key


class Corpus:
    """Pages by title, plus redirects (other names for a page); similar titles come from BM25 over the pages."""

    def __init__(self, pages: Iterable[Page], redirects: Mapping[str, str] | None = None) -> None:
        self.pages: dict[str, Page] = {}
        self._keys: dict[str, str] = {}
        for page in pages:
            if page.title in self.pages or not page.sentences:
                continue
            self.pages[page.title] = page
            self._keys.setdefault(title_key(page.title), page.title)
        for alias, target in (redirects or {}).items():
            if target in self.pages:
                # A real title always wins over a redirect with the same key.
                self._keys.setdefault(title_key(alias), target)
        self._titles = list(self.pages)
        self._bm25 = None
        self._bm25_lock = threading.Lock()

    def __getstate__(self) -> dict:
        # Picklable for Ray: the lock cannot travel and the index is rebuilt on first use.
        return {**self.__dict__, "_bm25": None, "_bm25_lock": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._bm25_lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.pages)

    def __contains__(self, title: object) -> bool:
        return title in self.pages

    def page(self, title: str) -> Page:
        return self.pages[title]

    def get(self, entity: str) -> Page | None:
        """The page an exact search for `entity` opens (title, case/accent variant or redirect), else None."""
        if entity in self.pages:
            return self.pages[entity]
        title = self._keys.get(title_key(entity))
        return self.pages[title] if title is not None else None

    def similar(self, entity: str, k: int = SIMILAR_TITLES) -> list[str]:
        """Up to `k` titles ranked by BM25 against titles and page openings; ties keep corpus order."""
        import bm25s

        retriever = self._index()
        tokens = [t for t in bm25s.tokenize([fold(entity)], stopwords="en", return_ids=False,
                                            show_progress=False)[0] if t in retriever.vocab_dict]
        if not tokens:
            return []
        scores = retriever.get_scores(tokens)
        order = np.argsort(-scores, kind="stable")[:k]
        return [self._titles[i] for i in order if scores[i] > 0]

    def _index(self):
        # Built on the first miss only: many uses (the expert, exact searches) never need it.
        with self._bm25_lock:
            if self._bm25 is None:
                import bm25s

                # The title twice weights title words over body words, as Wikipedia's title matches rank first.
                docs = [fold(f"{p.title} {p.title} {' '.join(p.sentences[:2])}") for p in self.pages.values()]
                retriever = bm25s.BM25()
                retriever.index(bm25s.tokenize(docs, stopwords="en", show_progress=False), show_progress=False)
                self._bm25 = retriever
                log.debug("BM25 index over %d pages built", len(docs))
        return self._bm25
