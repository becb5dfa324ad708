"""The app's own responses (GET /v1/models, GET /healthz). Each route's request and response models come from its
family's task module (`api(meta, limits)`, built on `ecomray.serving`)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class LoadedModelInfo(BaseModel):
    route: str
    name: str
    version: str
    ref: str | None = Field(None, description="what the config asked for: a version, an alias, or null (auto)")
    aliases: list[str] = Field(default_factory=list, description="aliases that point at the loaded version")
    task: str | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    research_only: bool = False
    licence: str | None = None
    replica: str | None = Field(None, description="the replica that answered")
    failed_swap: dict[str, str] | None = Field(None, description="the last hot swap that failed, and why")
    batching: dict[str, Any] | None = Field(None, description="the answering replica's batching settings and batch "
                                            "sizes so far: batches, requests, mean_size, sizes {size: count}, busy_s")
    replicas: list[dict[str, Any]] = Field(default_factory=list,
                                           description="every live replica of the route and the version it serves")


class ModelsResponse(BaseModel):
    loaded: list[LoadedModelInfo]
    unavailable: dict[str, str] = Field(default_factory=dict, description="route -> why it is not served")


class Health(BaseModel):
    status: str
    routes: dict[str, str]
