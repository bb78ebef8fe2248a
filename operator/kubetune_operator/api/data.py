"""Dataset sources and column mapping, shared by FineTuneJob (training data) and EvalJob (suites).

Schema module: pydantic and the standard library only.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StringConstraints

from kubetune_operator.api.common import ApiModel, DataURI, SecretKeyRef

ColumnName = Annotated[str, StringConstraints(min_length=1, max_length=128)]

DatasetFormat = Literal[
    "auto", "messages", "sharegpt", "alpaca", "promptCompletion", "preference", "oasst", "text"
]


class ColumnMapping(ApiModel):
    """Renames the source's columns to the names a format expects (like axolotl's field_*)."""

    messages: ColumnName | None = Field(
        default=None, description="Column with OpenAI-style messages (role/content list)."
    )
    conversations: ColumnName | None = Field(
        default=None, description="Column with ShareGPT turns (from/value list)."
    )
    system: ColumnName | None = Field(default=None, description="Column with a system prompt.")
    instruction: ColumnName | None = Field(default=None, description="Alpaca instruction column.")
    input: ColumnName | None = Field(default=None, description="Alpaca input (context) column.")
    output: ColumnName | None = Field(default=None, description="Alpaca output column.")
    prompt: ColumnName | None = Field(
        default=None, description="Prompt column (prompt/completion and preference formats)."
    )
    completion: ColumnName | None = Field(
        default=None, description="Completion column (prompt/completion format)."
    )
    chosen: ColumnName | None = Field(default=None, description="Preferred response column.")
    rejected: ColumnName | None = Field(default=None, description="Rejected response column.")
    text: ColumnName | None = Field(default=None, description="Plain text column.")


class DataSource(ApiModel):
    """One dataset file, folder or Hub dataset, and how to read its rows."""

    uri: DataURI = Field(
        description=(
            "Where the data is: s3://bucket/key, pvc://claim/path, file:///path (a .json, "
            ".jsonl, .jsonl.gz or .parquet file, or a folder of them) or hf://org/name[@revision]"
            " (a Hub dataset)."
        )
    )
    format: DatasetFormat = Field(
        default="auto",
        description=(
            "Row format: messages (OpenAI chat), sharegpt, alpaca, promptCompletion, preference "
            "(prompt/chosen/rejected or chosen/rejected transcripts), oasst (OpenAssistant "
            "message trees), text, or auto to detect it from the columns. Default: auto."
        ),
    )
    columns: ColumnMapping | None = Field(
        default=None,
        description="Column renames, e.g. {prompt: question, completion: answer} for GSM8K.",
    )
    split: Annotated[str, StringConstraints(pattern=r"^[\w.\[\]:%-]+$", max_length=128)] | None = (
        Field(default=None, description="Split of a Hub dataset, e.g. train. Default: train.")
    )
    subset: Annotated[str, StringConstraints(max_length=128)] | None = Field(
        default=None, description="Configuration (subset) name of a Hub dataset."
    )
    max_samples: int | None = Field(
        default=None, ge=1, description="Use at most this many rows (the first N)."
    )
    token_secret_ref: SecretKeyRef | None = Field(
        default=None, description="A Secret key holding a Hugging Face token for private data."
    )
