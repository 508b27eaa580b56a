"""deltaserve's own endpoints: models, experts (list, register, delete) and the routing dry run."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from deltaserve.experts.sources import Compression
from deltaserve.server.engine.types import PathName
from deltaserve.server.protocol.common import Body

class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ExpertRegistration(Body):
    """POST /v1/experts body."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=64, description="the expert's name in `model` and in URLs")
    path: str = Field(min_length=1, max_length=4096, pattern=r"^[^\x00]*$",
                      description="server-side directory under an allowed root: an expert folder, a PEFT "
                                  "adapter or an HF fine-tuned model")
    compression: Compression | None = Field(None, description="how to compress a fine-tune: a method and its options")
    exemplars: list[str] | None = Field(None, description="example prompts for the routers")
    calibration: str | list[dict[str, Any]] | None = Field(
        None, description="chat examples ({messages} objects, or a JSONL path under a register root) to measure "
                          "the expert on: stored as its calibration score, which `auto` uses to prefer the "
                          "better expert of a skill; also NPS's objective unless compression.calibration is set")
    replace: bool = False


class RouteRequest(Body):
    model_config = ConfigDict(extra="allow")
    model: str = "auto"
    messages: list[ChatMessage] | None = None
    prompt: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "deltaserve"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None
    deltaserve: dict[str, Any] = Field(default_factory=dict)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ExpertCard(BaseModel):
    id: str
    object: Literal["expert"] = "expert"
    kind: str
    codec: str
    density: float | None
    rank: int | None
    bytes: int
    bits_per_param: float
    base_params: int
    base_fingerprint: str
    source: str
    method: dict[str, Any]
    task: str | None
    calibration_score: float | None
    calibration: dict[str, Any] | None = Field(None, description="the calibration score's parts: exact, "
                                                                 "token_accuracy, nll, examples")
    created: str
    path: PathName
    exemplars: int


class ExpertList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ExpertCard]
    store_generation: int
    unavailable: dict[str, str] = Field(default_factory=dict,
                                        description="experts in the store that cannot be served, and why")
    first_id: str | None = Field(None, description="the first expert's id in `data` (OpenAI's list shape)")
    last_id: str | None = Field(None, description="the last expert's id in `data`: pass it as `after` for the next "
                                                  "page")
    has_more: bool = Field(False, description="more experts follow this page")


class DeletedExpert(BaseModel):
    id: str
    object: Literal["expert"] = "expert"
    deleted: bool = True


class RecipeRegistration(Body):
    """POST /v1/recipes body: a name for a recipe."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=64, description="the name clients send as `model` (not an expert's name)")
    recipe: str = Field(min_length=1, max_length=1000,
                        description="what it serves, as `model` would write it: 'tone', '0.7*tone+0.3*sql', "
                                    "'ties(density=0.3):tone+sql'")


class RecipeCard(BaseModel):
    id: str
    object: Literal["recipe"] = "recipe"
    recipe: str = Field(description="the recipe as registered")
    key: str | None = Field(description="its canonical, comma-free ID (what /metrics lists); null while it is "
                                        "not servable")
    path: PathName | None = None
    weights: dict[str, float] = Field(default_factory=dict)
    method: str | None = None
    unavailable: str | None = Field(None, description="why it cannot be served now (an expert it names is gone)")


class RecipeList(BaseModel):
    object: Literal["list"] = "list"
    data: list[RecipeCard]


class DeletedRecipe(BaseModel):
    id: str
    object: Literal["recipe"] = "recipe"
    deleted: bool = True


class RouteResponse(BaseModel):
    model: str
    recipe: str
    path: PathName
    weights: dict[str, float]
    route: dict[str, Any] | None
