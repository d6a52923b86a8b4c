"""The first stage of `rerankd eval`: BM25 over a BEIR corpus, giving each query the candidates to rerank."""

from __future__ import annotations

from collections.abc import Mapping

# bm25s rather than Pyserini (a JVM and Lucene) or BEIR's Elasticsearch (a server): it is pip-installable
# with numpy as its only requirement, implements Lucene's BM25 (the variant those tools use), indexes the
# corpus once into a sparse matrix of precomputed term scores so that a query costs a few vector additions,
# and is actively maintained.
import bm25s
import numpy as np

STOPWORDS = "en"  # English stopwords, no stemming (a stemmer would be one more dependency, PyStemmer)


class BM25Index:
    """BM25 (Lucene variant, k1=1.5, b=0.75) over every passage of a corpus."""

    def __init__(self, passages: Mapping[str, str], progress: bool = False) -> None:
        self._ids = list(passages)
        tokens = bm25s.tokenize(list(passages.values()), stopwords=STOPWORDS, show_progress=progress)
        self._retriever = bm25s.BM25(k1=1.5, b=0.75, method="lucene")
        self._retriever.index(tokens, show_progress=progress)

    def top_k(self, query: str, k: int) -> dict[str, float]:
        """The k best passages {id: BM25 score}; among equal scores at the cut, the ids trec_eval would rank
        first (descending), so the candidate set does not depend on the corpus order."""
        (terms,) = bm25s.tokenize([query], stopwords=STOPWORDS, return_ids=False, show_progress=False)
        # A query of stopwords only has no terms: every passage scores 0 (bm25s would raise).
        scores = self._retriever.get_scores(terms) if terms else np.zeros(len(self._ids), dtype=np.float32)
        k = min(k, len(self._ids))
        threshold = np.partition(scores, len(scores) - k)[len(scores) - k]
        candidates = np.flatnonzero(scores >= threshold)
        best = sorted(candidates, key=lambda i: (scores[i], self._ids[i]), reverse=True)[:k]
        return {self._ids[i]: float(scores[i]) for i in best}
