"""vLLM's score and rerank APIs over an embedding model: a pair's score is the cosine similarity
of its two texts' embeddings, computed here in plain Python (the gateway never imports torch).

``serving.py`` embeds a request's texts in one batch (its first texts, then its second), and
hands their embeddings here: ``pairs`` says which are scored against which, ``cosine`` scores
them, and the responses are made from the scores. Cosine does not care whether the workers'
pooler normalizes the embeddings.
"""

from __future__ import annotations

import math

from baton.services.gateway.protocol import (
    EmbeddingUsage, RerankDocument, RerankRequest, RerankResponse, RerankResult, RerankUsage, ScoreData, ScoreResponse,
)


def cosine(a: list[float], b: list[float]) -> float:
    """The cosine similarity of ``a`` and ``b``; 0 where one of them is all zeros."""
    norms = math.hypot(*a) * math.hypot(*b)
    return math.fsum(x * y for x, y in zip(a, b, strict=True)) / norms if norms else 0.0


def pairs(first: int, second: int) -> list[tuple[int, int]]:
    """Which of ``first`` texts is scored against each of ``second`` texts, as vLLM pairs them:
    one against each (1:1, 1:N), else the i-th against the i-th (N:N)."""
    return [(0 if first == 1 else i, i) for i in range(second)]


def similarities(embeddings: list[list[float]], first: int) -> list[float]:
    """Each pair's score, where ``embeddings`` holds the ``first`` texts' embeddings, then the
    second texts'."""
    second = embeddings[first:]
    return [cosine(embeddings[i], second[j]) for i, j in pairs(first, len(second))]


def score_response(request_id: str, model: str, scores: list[float], prompt_tokens: int) -> ScoreResponse:
    return ScoreResponse(
        id=request_id, model=model, data=[ScoreData(index=i, score=s) for i, s in enumerate(scores)],
        usage=EmbeddingUsage(prompt_tokens=prompt_tokens, total_tokens=prompt_tokens),
    )


def rerank_response(req: RerankRequest, request_id: str, model: str, scores: list[float], prompt_tokens: int) -> RerankResponse:
    """The documents by relevance, most relevant first (equal scores in the documents' order),
    cut to ``top_n``; each keeps its index in the request."""
    results = [
        RerankResult(index=i, document=RerankDocument(text=doc) if req.return_documents else None, relevance_score=s)
        for i, (doc, s) in enumerate(zip(req.documents, scores, strict=True))
    ]
    results.sort(key=lambda r: r.relevance_score, reverse=True)
    return RerankResponse(id=request_id, model=model, usage=RerankUsage(total_tokens=prompt_tokens),
                          results=results[: req.top_n or None])
