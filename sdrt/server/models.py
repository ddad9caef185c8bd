"""AUTOMATIC1111's API request and response shapes (modules/api/models.py), field for field.

A1111 builds its request models from the `__init__` arguments of StableDiffusionProcessingTxt2Img / Img2Img
(modules/processing.py), every field Optional, unknown fields ignored (pydantic's default), plus a few API-only
fields. The same names and defaults are declared here. Fields whose A1111 default depends on the model (size,
steps, CFG scale, sampler) default to None here: the bundle's own default fills them, as `sdrt generate` does.
Which fields sdrt honours, ignores or refuses is decided in sdrt.server.translate, not here.
"""
from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field


class GenerationFields(BaseModel):
    """The fields txt2img and img2img share (StableDiffusionProcessing's arguments and the API's extras)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True, protected_namespaces=())

    prompt: Optional[str] = ""
    negative_prompt: Optional[str] = ""
    styles: Optional[list[str]] = None
    seed: Optional[int] = -1
    subseed: Optional[int] = -1
    subseed_strength: Optional[float] = 0
    seed_resize_from_h: Optional[int] = -1
    seed_resize_from_w: Optional[int] = -1
    seed_enable_extras: Optional[bool] = True
    sampler_name: Optional[str] = None
    scheduler: Optional[str] = None
    batch_size: Optional[int] = 1
    n_iter: Optional[int] = 1
    steps: Optional[int] = None  # A1111: 50
    cfg_scale: Optional[float] = None  # A1111: 7.0
    width: Optional[int] = None  # A1111: 512
    height: Optional[int] = None  # A1111: 512
    restore_faces: Optional[bool] = None
    tiling: Optional[bool] = None
    do_not_save_samples: Optional[bool] = False
    do_not_save_grid: Optional[bool] = False
    eta: Optional[float] = None
    s_min_uncond: Optional[float] = None
    s_churn: Optional[float] = None
    s_tmax: Optional[float] = None
    s_tmin: Optional[float] = None
    s_noise: Optional[float] = None
    override_settings: Optional[dict[str, Any]] = None
    override_settings_restore_afterwards: Optional[bool] = True
    refiner_checkpoint: Optional[str] = None
    refiner_switch_at: Optional[float] = None
    disable_extra_networks: Optional[bool] = False
    firstpass_image: Optional[str] = None
    comments: Optional[dict] = None
    sampler_index: Optional[str] = None  # A1111: "Euler"; deprecated there in favour of sampler_name
    script_name: Optional[str] = None
    script_args: Optional[list] = Field(default_factory=list)
    send_images: Optional[bool] = True
    save_images: Optional[bool] = False
    alwayson_scripts: Optional[dict] = Field(default_factory=dict)
    force_task_id: Optional[str] = None
    infotext: Optional[str] = None


class Txt2ImgRequest(GenerationFields):
    """POST /sdapi/v1/txt2img (StableDiffusionTxt2ImgProcessingAPI)."""

    enable_hr: Optional[bool] = False
    denoising_strength: Optional[float] = 0.75
    firstphase_width: Optional[int] = 0
    firstphase_height: Optional[int] = 0
    hr_scale: Optional[float] = 2.0
    hr_upscaler: Optional[str] = None
    hr_second_pass_steps: Optional[int] = 0
    hr_resize_x: Optional[int] = 0
    hr_resize_y: Optional[int] = 0
    hr_checkpoint_name: Optional[str] = None
    hr_sampler_name: Optional[str] = None
    hr_scheduler: Optional[str] = None
    hr_prompt: Optional[str] = ""
    hr_negative_prompt: Optional[str] = ""


class Img2ImgRequest(GenerationFields):
    """POST /sdapi/v1/img2img (StableDiffusionImg2ImgProcessingAPI)."""

    init_images: Optional[list] = None
    resize_mode: Optional[int] = 0
    denoising_strength: Optional[float] = 0.75
    image_cfg_scale: Optional[float] = None
    mask: Optional[str] = None
    mask_blur_x: Optional[int] = 4
    mask_blur_y: Optional[int] = 4
    mask_blur: Optional[int] = None
    mask_round: Optional[bool] = True
    inpainting_fill: Optional[int] = 0
    inpaint_full_res: Optional[bool] = True
    inpaint_full_res_padding: Optional[int] = 0
    inpainting_mask_invert: Optional[int] = 0
    initial_noise_multiplier: Optional[float] = None
    latent_mask: Optional[str] = None
    include_init_images: Optional[bool] = Field(default=False, exclude=True)


class GenerationResponse(BaseModel):
    """TextToImageResponse / ImageToImageResponse: base64 images, the request echoed, Processed.js() as a string."""

    images: Optional[list[str]] = Field(default=None, description="The generated images in base64 format.")
    parameters: dict
    info: str


class ProgressResponse(BaseModel):
    progress: float = Field(description="The progress with a range of 0 to 1")
    eta_relative: float
    state: dict
    current_image: Optional[str] = None
    textinfo: Optional[str] = None
    current_task: Optional[str] = None


class SamplerItem(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, Any]


class SchedulerItem(BaseModel):
    name: str
    label: str
    aliases: Optional[list[str]] = None
    default_rho: Optional[float] = None
    need_inner_model: Optional[bool] = None


class SDModelItem(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    title: str
    model_name: str
    hash: Optional[str] = None
    sha256: Optional[str] = None
    filename: str
    config: Optional[str] = None


class PNGInfoRequest(BaseModel):
    image: str = Field(description="The base64 encoded PNG image")


class PNGInfoResponse(BaseModel):
    info: str
    items: dict = Field(default_factory=dict)
    parameters: dict = Field(default_factory=dict)


class ScriptsList(BaseModel):
    txt2img: Optional[list] = None
    img2img: Optional[list] = None
