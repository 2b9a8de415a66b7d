"""Request and response bodies of the HTTP API (pydantic). Unknown request fields are rejected."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

SESSION_ID_PATTERN = r"^[A-Za-z0-9_-]{16,64}$"
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class GenerateParams(BaseModel):
    """Parameters of a generation; limits that come from settings are checked by the handler."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    prime: str = Field("", description="Text the model reads first; generation continues it.")
    temperature: float = Field(1.0, ge=0, allow_inf_nan=False, description="0 = argmax; higher = more surprising.")
    max_chars: int = Field(200, ge=1, description="Characters to generate.")
    model: str | None = Field(None, pattern=MODEL_NAME_PATTERN, description="Model name; default: the server's.")
    session_id: str | None = Field(None, pattern=SESSION_ID_PATTERN, description="Continue this session.")
    seed: int | None = Field(None, ge=0, lt=2**63, description="Same seed, same text.")
    top_k: int | None = Field(None, ge=1, description="Sample only from the k most likely characters.")
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False, description="Nucleus sampling mass.")
    stop: list[str] | None = Field(None, description="Generation ends after one of these strings is produced.")
    skip_unknown: bool = Field(False, description="Drop prime characters not in the vocabulary instead of 422.")


class GenerateRequest(GenerateParams):
    stream: bool = Field(True, description="true: text/event-stream of characters; false: one JSON object.")


class StartEvent(BaseModel):
    session_id: str
    model: str


class TokenEvent(BaseModel):
    char: str
    index: int


class GenerateResult(BaseModel):
    """The `done` event of a stream, and the whole answer when `stream` is false."""

    text: str
    finish_reason: Literal["length", "stop"]
    session_id: str
    model: str
    prime_chars: int
    generated_chars: int
    seconds: float


class ErrorDetail(BaseModel):
    type: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ModelInfo(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    name: str
    cell: str
    layers: int
    hidden: int
    embed: int
    parameters: int
    vocab_size: int
    vocabulary: list[str] = Field(description="The characters the model knows, in id order.")
    val_loss: float | None = Field(description="Best validation loss, nats per character.")
    val_bpc: float | None = Field(description="The same in bits per character.")
    trained_on: str | None = Field(description="Name of the training text file.")
    trained_steps: int | None
    created: str | None = Field(description="When the checkpoint was written (UTC, ISO 8601).")
    sha256: str = Field(description="Hash of the checkpoint file: sessions are bound to it.")


class ModelList(BaseModel):
    models: list[ModelInfo]
    default: str | None


class SessionInfo(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    session_id: str
    model: str
    created: float = Field(description="Unix time.")
    last_used: float = Field(description="Unix time.")
    generated_chars: int
    busy: bool


class ReloadReport(BaseModel):
    added: list[str]
    changed: list[str]
    removed: list[str]
    unchanged: list[str]
    errors: dict[str, str] = Field(description="File name -> why it was skipped.")


class Health(BaseModel):
    status: str
    models: int | None = None
    detail: str | None = None


class InspectRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    text: str = Field(min_length=1, description="Text the model reads from the zero state.")
    model: str | None = Field(None, pattern=MODEL_NAME_PATTERN, description="Model name; default: the server's.")
    layer: int | None = Field(None, ge=0, description="Which layer's units to return; default: the last.")
    kind: Literal["cell", "hidden"] | None = Field(
        None, description="cell: the LSTM cell state tanh(c); hidden: the output h. Default: cell for an LSTM.")


class Prediction(BaseModel):
    char: str
    p: float


class UnitSuggestion(BaseModel):
    unit: int
    reason: str = Field(description="The text property the unit follows, or 'high variance'.")
    score: float = Field(description="Correlation with that property (or the unit's variance).")


class InspectResult(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model: str
    layer: int
    kind: Literal["cell", "hidden"]
    units: int = Field(description="Hidden units in the layer.")
    chars: list[str] = Field(description="The text, one entry per character.")
    predictions: list[list[Prediction]] = Field(
        description="Per character: the 5 most likely next characters after reading it, with probabilities.")
    activations: list[list[float]] = Field(description="Per character: every unit of the layer, in [-1, 1].")
    suggestions: list[UnitSuggestion] = Field(description="Units worth a look, best first.")
