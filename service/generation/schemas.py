"""Generation requests and answers as the API shows them."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

SchedulerName = Literal["pndm", "ddim", "euler", "euler_a", "dpm++_2m", "lms"]


class AdapterWeight(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ref: str = Field(
        max_length=220,
        description='"name", "name@3", "name@prod", or a training checkpoint: '
        '"name@ckpt:400" or "<job id>@ckpt:400"',
    )
    weight: float = Field(1.0, ge=-4.0, le=4.0)


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1)
    negative_prompt: str | None = None
    adapters: list[AdapterWeight] = Field(default_factory=list, description="empty = base model")
    base_model: str | None = Field(None, description="default: the first configured")
    num_inference_steps: int = Field(30, ge=1)
    guidance_scale: float = Field(7.5, ge=0.0, le=50.0)
    width: int | None = Field(None, ge=8, multiple_of=8, description="default: model native")
    height: int | None = Field(None, ge=8, multiple_of=8, description="default: model native")
    seed: int | None = Field(None, ge=0, lt=2**63, description="random when absent; returned")
    num_images: int = Field(1, ge=1)
    scheduler: SchedulerName = "pndm"
    response_format: Literal["url", "b64_json"] = "url"
    wait: float | None = Field(
        None,
        ge=0,
        description="seconds to wait for the images (default a setting); "
        "0 or a timeout answers 202 with the job",
    )


class ImageOut(BaseModel):
    id: str
    seed: int | None
    width: int
    height: int
    url: str | None = None
    b64_json: str | None = None


class ResolvedAdapter(BaseModel):
    ref: str
    name: str
    version: int | None = Field(None, description="null for a checkpoint ref")
    weight: float
    job_id: str | None = Field(None, description="the training job, for a checkpoint ref")
    checkpoint_step: int | None = Field(None, description="the step, for a checkpoint ref")


class GenerateOut(BaseModel):
    job_id: str
    status: str
    base_model: str
    images: list[ImageOut]
    adapters: list[ResolvedAdapter]
    seed: int
    timings: dict[str, float]


class OpenAIImageRequest(BaseModel):
    """The OpenAI images API body; extra OpenAI fields we don't use are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = Field(min_length=1)
    model: str | None = Field(None, description="an adapter ref or a base model name")
    n: int = Field(1, ge=1)
    size: str | None = Field(
        None, pattern=r"^\d{1,5}x\d{1,5}$", description="WIDTHxHEIGHT, each a multiple of 8"
    )
    response_format: Literal["url", "b64_json"] = "url"
    negative_prompt: str | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    num_inference_steps: int | None = Field(None, ge=1)

    @field_validator("size")
    @classmethod
    def _size_in_pixels(cls, value: str | None) -> str | None:
        if value is not None and any(int(v) < 8 or int(v) % 8 for v in value.split("x")):
            raise ValueError("width and height must be multiples of 8, at least 8")
        return value

    def dimensions(self) -> tuple[int | None, int | None]:
        """(width, height) from ``size``; None for the model's native size."""
        if not self.size:
            return None, None
        width, height = (int(v) for v in self.size.split("x"))
        return width, height


class OpenAIImage(BaseModel):
    url: str | None = None
    b64_json: str | None = None
    revised_prompt: str | None = None


class OpenAIImagesResponse(BaseModel):
    created: int
    data: list[OpenAIImage]
