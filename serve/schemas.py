"""Request and response models of the /v1 API (they are the OpenAPI schema at /docs and /openapi.json).

Requests are strict (no type coercion, unknown fields refused) so a wrong type is a 422 naming the field, not a
silent conversion. Limits that depend on the deployment (rows or texts per request, characters per text) are
checked by the ingress against its config and also answer 422 with the field's location.
"""

from __future__ import annotations

from typing import Annotated, Any, Union

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

ItemId = Annotated[str, StringConstraints(min_length=1, max_length=256)]
Category = Annotated[str, StringConstraints(min_length=1, max_length=256)]
MAX_K = 1000


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class ModelRef(BaseModel):
    name: str
    version: str


class RecommendFilters(_Strict):
    category: Union[Category, list[Category], None] = Field(
        None, description="keep only items of this category (or any of these categories)")


class RecommendRequest(_Strict):
    user_id: Annotated[str, StringConstraints(max_length=256)] | None = Field(
        None, description="echoed back; the model ranks from the history only")
    history: list[ItemId] = Field(default_factory=list, description="item ids the user interacted with, oldest first")
    k: int = Field(10, ge=1, le=MAX_K, description="number of items to return")
    exclude_history: bool = Field(True, description="never recommend an item already in the history")
    filters: RecommendFilters | None = None


class ScoredItem(BaseModel):
    item_id: str
    score: float | None = Field(description="model score (higher is better); null for cold-start fallback items")


class RecommendResponse(BaseModel):
    user_id: str | None = None
    items: list[ScoredItem]
    model: ModelRef
    fallback: bool = Field(description="true when the history had no known item: most popular items instead")
    warnings: list[str] = Field(default_factory=list)


FeatureValue = Union[float, int, bool, str, None]


class PropensityRequest(_Strict):
    rows: list[dict[Annotated[str, StringConstraints(max_length=128)], FeatureValue]] = Field(
        min_length=1, description="one session per row: feature name -> value, as in the training table")


class PropensityResponse(BaseModel):
    probabilities: list[float | None] = Field(description="purchase probability per row (null if not finite)")
    model: ModelRef


class SentimentRequest(_Strict):
    texts: list[str] = Field(min_length=1, description="texts to classify")


class SentimentResult(BaseModel):
    label: str
    probs: dict[str, float]


class SentimentResponse(BaseModel):
    results: list[SentimentResult]
    model: ModelRef
    warnings: list[str] = Field(default_factory=list)


class LoadedModelInfo(BaseModel):
    family: str
    name: str
    version: str
    ref: str | None = Field(None, description="what the config asked for: a version, an alias, or null (auto)")
    aliases: list[str] = Field(default_factory=list, description="aliases that point at the loaded version")
    task: str | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    research_only: bool = False
    licence: str | None = None


class ModelsResponse(BaseModel):
    loaded: list[LoadedModelInfo]
    unavailable: dict[str, str] = Field(default_factory=dict, description="family -> why it is not served")


class Health(BaseModel):
    status: str
    families: dict[str, str]
