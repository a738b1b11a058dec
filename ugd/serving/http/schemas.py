"""Request and response bodies of the HTTP API (pydantic): what ``/openapi.json`` publishes.

``/v1/rerank`` takes and returns the shape of the Cohere / Jina / vLLM rerank APIs, so their clients work
unchanged: extra fields those clients send (``model``, ``rank_fields``, ...) are accepted and ignored,
and a document may be a string or ``{"text": ...}``. Sizes (documents per call, characters per text)
are the server's flags, checked in the handlers (``app.check_limits``), so they are not in the schema.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field


def _not_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("is empty (or only whitespace); a matching score needs text on both sides")
    return text


#: a non-empty text (a JSON number or null is refused, not turned into a string)
Text = Annotated[str, Field(min_length=1), AfterValidator(_not_blank)]
Mode = Literal["single_tower", "two_tower", "single-tower", "two-tower"]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients of other rerank APIs send fields we do not use


class DocumentText(BaseModel):
    text: Text


class RerankRequest(_Request):
    query: Text
    documents: list[Union[Text, DocumentText]] = Field(min_length=1)
    top_n: int | None = Field(default=None, ge=1, description="Return the best top_n (default: all).")
    return_documents: bool = Field(default=True, description="Echo each document's text in the results.")
    mode: Mode | None = Field(default=None, description="single_tower (default where the checkpoint has one) or "
                                                       "two_tower.")
    model: str | None = Field(default=None, description="Accepted for client compatibility; the server serves one "
                                                        "model.")


class RerankResult(BaseModel):
    index: int
    relevance_score: float
    document: DocumentText | None = None


class RerankResponse(BaseModel):
    id: str
    model: str
    mode: str
    results: list[RerankResult]


class Pair(BaseModel):
    query: Text
    document: Text


class PairsRequest(_Request):
    pairs: list[Pair] = Field(min_length=1)


class ExplainRequest(PairsRequest):
    max_new_tokens: int | None = Field(default=None, ge=0, description="Length limit of each reason (at most the "
                                                                       "server's --max_new_tokens, its default).")


class HeadScore(BaseModel):
    probabilities: list[float]
    score: float = Field(description="The probability of the server's --positive_label class.")


class ScoreResult(BaseModel):
    index: int
    two_tower: HeadScore | None = None
    single_tower: HeadScore | None = None


class ScoreResponse(BaseModel):
    positive_label: int
    results: list[ScoreResult]


class ExplainResult(BaseModel):
    index: int
    reason: str


class ExplainResponse(BaseModel):
    results: list[ExplainResult]


class SearchRequest(_Request):
    query: Text
    k1: int = Field(default=100, ge=1, description="Candidates the two tower retrieves from the store.")
    k2: int = Field(default=10, ge=0, description="Candidates the single tower keeps after reranking the k1 "
                                                  "(0: no rerank, the k1 in two-tower order).")
    k3: int = Field(default=3, ge=0, description="Results that get a generated reason.")
    max_new_tokens: int | None = Field(default=None, ge=0)
    return_documents: bool = True


class SearchHit(BaseModel):
    id: str
    document: str | None = None
    retrieval_score: float
    rerank_score: float | None = None
    reason: str | None = None


class SearchTimings(BaseModel):
    retrieve_ms: float
    rerank_ms: float
    explain_ms: float
    total_ms: float


class SearchResponse(BaseModel):
    results: list[SearchHit]
    timings: SearchTimings
    store_size: int


class NewDocument(BaseModel):
    id: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    text: Text


class DocumentsRequest(_Request):
    documents: list[NewDocument] = Field(min_length=1)


class DocumentsResponse(BaseModel):
    ids: list[str]
    added: int
    replaced: int
    total: int


class DeleteResponse(BaseModel):
    id: str
    deleted: bool
    total: int


class Health(BaseModel):
    live: bool
    ready: bool
    paradigm: str
    modes: list[str]
    documents: int | None
    queue_depth: int


class ErrorBody(BaseModel):
    detail: str = Field(description="One line saying what was wrong and what to do.")
