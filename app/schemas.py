"""Request and response bodies of the HTTP API (pydantic). Unknown request fields are rejected."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from charrnn.names import MAX_MODEL_NAME, MODEL_NAME_PATTERN
from charrnn.sampling import REPETITION_WINDOW

SESSION_ID_PATTERN = r"^[A-Za-z0-9_-]{16,64}$"
LIMITED_BY = "x-limited-by"
MAX_SEED = 2**63 - 1


def _integral(value):
    return int(value) if isinstance(value, float) and value.is_integer() else value


# For an int field of a strict model, after its constraints: 35 and 35.0 are integers to JSON Schema, so both
# are taken; "35", true and 35.5 are not. (Before the constraints, pydantic would not publish them.)
WHOLE_FLOATS = BeforeValidator(_integral)


def limited_by(**keywords: str | int | dict) -> dict:
    """`json_schema_extra` of a field whose bounds are settings: each JSON Schema keyword maps to the name of
    a Settings field (or to a number, written as it is, or to a dict for a nested schema such as `items`).
    app/openapi.py writes the running server's values into /openapi.json; the handler enforces the same."""
    return {LIMITED_BY: keywords}


class GenerateParams(BaseModel):
    """Parameters of a generation; limits that come from settings are checked by the handler."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    prime: str = Field("", description="Text the model reads first; generation continues it.",
                       json_schema_extra=limited_by(maxLength="max_prime_chars"))
    temperature: float = Field(1.0, ge=0, allow_inf_nan=False, description="0 = argmax; higher = more surprising.",
                               json_schema_extra=limited_by(maximum="max_temperature"))
    max_chars: Annotated[int, Field(ge=1), WHOLE_FLOATS] = Field(
        200, description="Characters to generate (left out: 200, or CHARRNN_MAX_CHARS if that is lower).",
        json_schema_extra=limited_by(maximum="max_chars"))
    model: str | None = Field(None, pattern=MODEL_NAME_PATTERN, max_length=MAX_MODEL_NAME,
                              description="Model name; default: the server's.")
    session_id: str | None = Field(None, pattern=SESSION_ID_PATTERN, description="Continue this session.")
    # FastAPI's document holds bounds as floats, which cannot say 2**63 - 1: limited_by restores it.
    seed: Annotated[int, Field(ge=0, le=MAX_SEED), WHOLE_FLOATS] | None = Field(
        None, description="Same seed, same text.", json_schema_extra=limited_by(maximum=MAX_SEED))
    top_k: Annotated[int, Field(ge=1), WHOLE_FLOATS] | None = Field(
        None, description="Sample only from the k most likely characters.")
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False, description="Nucleus sampling mass.")
    stop: list[str] | None = Field(
        None, description="Generation ends after one of these strings is produced.",
        json_schema_extra=limited_by(maxItems="max_stop_strings",
                                     items={"minLength": 1, "maxLength": "max_stop_chars"}))
    skip_unknown: bool = Field(False, description="Drop prime characters not in the vocabulary instead of 422.")
    min_p: float | None = Field(None, ge=0, le=1, allow_inf_nan=False,
                                description="Sample only characters at least min_p times as likely as the most "
                                            "likely one (after temperature).")
    repetition_penalty: float = Field(
        1.0, ge=0.01, le=100, allow_inf_nan=False,
        description="vLLM's: a character in the recent window has its logit divided by this if positive, "
                    "multiplied if not. 1 = off; > 1 discourages repeats.")
    presence_penalty: float = Field(0.0, ge=-2, le=2, allow_inf_nan=False,
                                    description="OpenAI's: subtracted from the logit of every character in the "
                                                "recent window.")
    frequency_penalty: float = Field(0.0, ge=-2, le=2, allow_inf_nan=False,
                                     description="OpenAI's: times its count in the recent window, subtracted from "
                                                 "a character's logit.")
    repetition_window: Annotated[int, Field(ge=1), WHOLE_FLOATS] = Field(
        REPETITION_WINDOW, description="How many of the last characters (prime and generated) the three penalties "
                                       "count: a character model writes 'e' and space all the time, so only recent "
                                       f"repeats are penalized (left out: {REPETITION_WINDOW}, or "
                                       "CHARRNN_MAX_REPETITION_WINDOW if that is lower).",
        json_schema_extra=limited_by(maximum="max_repetition_window"))
    logprobs: Annotated[int, Field(ge=0, le=5), WHOLE_FLOATS] | None = Field(
        None, description="Also return each generated character's log-probability and those of the k most "
                          "likely characters (0-5): the model's own distribution (log_softmax of its logits), "
                          "before temperature, penalties, bias and cuts.")


class GenerateRequest(GenerateParams):
    # A JSON body is taken as typed: `"skip_unknown": 0` or `"max_chars": "5"` is a 422, as the schema says.
    # (GenerateParams stays lax: GET /generate parses the same fields from query strings.)
    model_config = ConfigDict(strict=True)

    stream: bool = Field(True, description="true: text/event-stream of characters; false: one JSON object.")
    # POST only: an object does not fit a query string.
    logit_bias: dict[Annotated[str, Field(min_length=1, max_length=1)],
                     Annotated[float, Field(ge=-100, le=100, allow_inf_nan=False)]] | None = Field(
        None, description="Character -> bias added to its logit before everything else; -100 bans it. "
                          "Characters must be in the model's vocabulary. POST only.")


class StartEvent(BaseModel):
    session_id: str
    model: str


class TopLogprob(BaseModel):
    char: str
    logprob: float


class TokenEvent(BaseModel):
    char: str
    index: int
    logprob: float | None = Field(None, description="Only when the request asked for `logprobs`: the character's "
                                                    "log-probability under the model.")
    top_logprobs: list[TopLogprob] | None = Field(
        None, description="Only when the request asked for `logprobs`: the k most likely characters, most likely "
                          "first.")


class CharLogprobs(BaseModel):
    """One generated character with its log-probability and the k most likely characters' (as a token event)."""

    char: str
    logprob: float
    top_logprobs: list[TopLogprob]


class GenerateResult(BaseModel):
    """The `done` event of a stream, and the whole answer when `stream` is false."""

    text: str
    finish_reason: Literal["length", "stop"]
    session_id: str
    model: str
    prime_chars: int
    generated_chars: int
    seconds: float
    logprobs: list[CharLogprobs] | None = Field(
        None, description="Only when the request asked for `logprobs`: one entry per generated character.")


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
    start: str = Field(description="Where the model's new texts start: which start state it holds (zero, newline, "
                                   "two-newlines, mean-line-start, learned or tuned; docs/models.md).")


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
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), strict=True)  # as GenerateRequest

    text: str = Field(min_length=1, description="Text the model reads from its start state.",
                      json_schema_extra=limited_by(maxLength="max_inspect_chars"))
    model: str | None = Field(None, pattern=MODEL_NAME_PATTERN, max_length=MAX_MODEL_NAME,
                              description="Model name; default: the server's.")
    layer: Annotated[int, Field(ge=0), WHOLE_FLOATS] | None = Field(
        None, description="Which layer's units to return; default: the last.")
    kind: Literal["cell", "hidden"] | None = Field(
        None, description="cell: the LSTM cell state tanh(c); hidden: the output h. Default: cell for an LSTM.")
    units: list[Annotated[int, Field(ge=0), WHOLE_FLOATS]] | None = Field(
        None, description="Units of the layer to return, at most CHARRNN_MAX_INSPECT_UNITS (64) of them. "
                          "Default: the suggested units.", json_schema_extra=limited_by(maxItems="max_inspect_units"))
    predictions: bool = Field(True, description="false: leave out the predictions (when only more units are wanted).")


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
    units: int = Field(description="Hidden units in the layer (numbered 0 to units - 1).")
    max_units: int = Field(description="The most units one request may name (CHARRNN_MAX_INSPECT_UNITS).")
    chars: list[str] = Field(description="The text, one entry per character.")
    predictions: list[list[Prediction]] | None = Field(
        description="Per character: the 5 most likely next characters after reading it, with probabilities. "
                    "null when the request said predictions: false.")
    units_shown: list[int] = Field(
        description="The units in `activations`: those the request named (repeats dropped), else the suggested ones.")
    activations: list[list[float]] = Field(
        description="Per unit of `units_shown`, in that order: its value after each character of the text, "
                    "in [-1, 1], 3 decimals. activations[k][i] is unit units_shown[k] after chars[i].")
    suggestions: list[UnitSuggestion] = Field(description="Units worth a look, best first.")
