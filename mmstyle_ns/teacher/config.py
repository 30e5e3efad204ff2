"""Settings of the toy teacher: network sizes, the two training stages, training and evaluation.

Kept apart from the code that uses them and free of heavy imports (no torch), so the ``mmstyle-teacher``
command line can be parsed — and ``OMP_WAIT_POLICY`` set — before torch is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class TeacherArchitecture:
    """Sizes of the toy teacher's networks."""

    resolution: int = 128
    """Picture width and height in pixels (latents are ``resolution / 8`` on a side)."""
    vae_channels: tuple[int, ...] = (8, 16, 32, 64)
    """VAE ``block_out_channels``; four blocks give Stable Diffusion's 8x downsampling."""
    vae_norm_groups: int = 4
    """Group-norm groups of the VAE (must divide every VAE width)."""
    unet_channels: tuple[int, ...] = (32, 64, 96)
    """UNet ``block_out_channels``; every block but the deepest has cross-attention to the text."""
    unet_norm_groups: int = 8
    """Group-norm groups of the UNet (must divide every UNet width)."""
    attention_head_dim: int = 8
    """Channels per attention head in the UNet."""
    pooled_text: bool = True
    """Also add an attention-pooled text embedding to the UNet's time embedding (diffusers'
    ``addition_embed_type="text"``, as DeepFloyd IF does): a global path for global attributes such as colour,
    next to cross-attention. It is computed from the same ``encoder_hidden_states``, so callers see no change."""
    text_width: int = 32
    """CLIP text encoder width, also the UNet's cross-attention width."""
    text_layers: int = 2
    """CLIP text encoder depth."""
    text_heads: int = 2
    """CLIP text encoder attention heads."""
    max_length: int = 32
    """Tokens per prompt (the tokenizer's model_max_length). Shorter than CLIP's 77: every caption of the toy
    world fits in 16, and fewer padding tokens dilute the words less while the text encoder is still untrained."""
    token_init_std: float = 1.0
    """Standard deviation of the initial token embeddings (CLIP's default 0.02 starts every prompt at nearly the
    same encoding, and the UNet then learns to ignore the text for hundreds of steps)."""

    def __post_init__(self) -> None:
        if len(self.vae_channels) != 4:
            raise ValueError(f"the VAE needs 4 blocks (8x downsampling), got {self.vae_channels}")
        if self.resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8, got {self.resolution}")
        if len(self.unet_channels) < 2:
            raise ValueError(f"the UNet needs at least 2 blocks, got {self.unet_channels}")
        for name, widths, groups in (
            ("vae", self.vae_channels, self.vae_norm_groups),
            ("unet", self.unet_channels, self.unet_norm_groups),
        ):
            if any(w % groups for w in widths):
                raise ValueError(f"{name} widths {widths} are not all divisible by {groups} norm groups")

    @property
    def latent_size(self) -> int:
        """Latent width and height."""
        return self.resolution // 8


TINY_ARCHITECTURE = TeacherArchitecture(
    resolution=32,
    vae_channels=(4, 8, 8, 8),
    vae_norm_groups=4,
    unet_channels=(8, 16),
    unet_norm_groups=4,
    attention_head_dim=4,
    text_width=8,
    text_layers=1,
    text_heads=2,
    max_length=16,
)
"""A few-hundred-kilobyte architecture for tests and smoke runs (32x32 pictures, 4x4 latents)."""


@dataclass
class VaeStage:
    """Stage 1: the autoencoder."""

    steps: int = 2500
    """Optimiser steps."""
    batch_size: int = 16
    """Crops per step."""
    crop: int = 64
    """Side of the random square crops trained on (a multiple of 8; the VAE is convolutional)."""
    lr: float = 2e-3
    """Peak AdamW learning rate (linear warm-up over 50 steps, cosine decay to 10%)."""
    mse_weight: float = 1.0
    """Weight of the squared error (added to the L1 error; it pulls hard on large colour errors)."""
    colour_emphasis: float = 4.0
    """Pixels weigh ``1 + colour_emphasis * saturation`` (max - min of the true RGB) in the losses, so the
    objects' colours, a small share of the pixels, are learnt early and kept."""
    chroma_weight: float = 1.0
    """Weight of an extra L1 loss on chroma (each pixel minus its grey level), which speeds up colour learning."""
    gradient_weight: float = 0.5
    """Weight of the L1 loss between image gradients (keeps edges sharp)."""
    kl_weight: float = 1e-6
    """Weight of the KL divergence of the posterior to N(0, I) (summed over latent entries)."""


@dataclass
class DenoiserStage:
    """Stage 2: text encoder and UNet."""

    steps: int = 2000
    """Optimiser steps."""
    batch_size: int = 48
    """Latents per step."""
    lr: float = 1e-3
    """Peak AdamW learning rate of UNet and text encoder (linear warm-up over 100 steps, cosine decay to 10%)."""
    uncond_prob: float = 0.1
    """Probability of replacing a caption with the empty prompt (classifier-free guidance)."""
    short_caption_prob: float = 0.1
    """Probability of dropping the ground from a caption (``"a red cube"``), so short prompts work too."""
    object_emphasis: float = 4.0
    """Latent cells weigh ``1 + object_emphasis * (share of object pixels in the cell)`` in the loss: the objects,
    a small share of each picture, carry the prompt's colour, and this gets the text used sooner."""
    min_snr_gamma: float = 5.0
    """Min-SNR loss weighting ``min(SNR, gamma) / SNR`` (Hang et al. 2023); 0 turns it off."""
    ema_decay: float = 0.995
    """Decay of the weight average that is saved (with the usual ``(1 + n) / (10 + n)`` warm-up)."""


@dataclass
class TrainConfig:
    """Train the toy teacher (VAE, then text encoder + UNet) and save it in the diffusers layout."""

    output: Path = Path("toy-teacher")
    """Folder that receives the model (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)."""
    seed: int = 0
    """Seed of the data pool, initialisation and every random choice of training."""
    pool_size: int = 8000
    """Generated training pictures (rendered once, reused by both stages)."""
    holdout_size: int = 256
    """Held-out pictures for the gate and the reconstruction PSNR."""
    architecture: TeacherArchitecture = field(default_factory=TeacherArchitecture)
    """Network sizes."""
    vae: VaeStage = field(default_factory=VaeStage)
    """Stage 1 settings."""
    denoiser: DenoiserStage = field(default_factory=DenoiserStage)
    """Stage 2 settings."""
    gate_min_accuracy: float = 0.9
    """Least colour-checker accuracy on VAE reconstructions of held-out pictures to go on to stage 2."""
    reuse_vae: bool = False
    """Load the stage-1 VAE already saved under output/vae instead of training it (the gate still runs)."""
    device: str | None = None
    """Torch device; None picks an accelerator when torch has one, else the CPU."""
    threads: int | None = None
    """CPU threads for torch (None keeps torch's default)."""
    quiet: bool = False
    """No progress bars."""


@dataclass
class EvalConfig:
    """Sample colour prompts from a saved teacher, check their colours, measure VAE PSNR, write a sample sheet."""

    model: Path = Path("toy-teacher")
    """Folder of the saved teacher (diffusers layout)."""
    samples_per_prompt: int = 6
    """Pictures sampled per prompt (columns of the sheet)."""
    prompts_per_colour: int = 2
    """Prompts per colour (shapes and grounds cycle); rows of the sheet are colours x this."""
    steps: int = 30
    """DDIM steps per sample."""
    guidance_scale: float = 5.0
    """Classifier-free guidance weight."""
    seed: int = 0
    """Seed of the initial noise."""
    batch_size: int = 48
    """Pictures sampled at once."""
    vae_images: int = 128
    """Held-out pictures for the VAE PSNR (0 skips it)."""
    sheet: Path | None = None
    """Where the sample sheet PNG goes; None for <model>/samples.png."""
    device: str | None = None
    """Torch device; None picks an accelerator when torch has one, else the CPU."""
    threads: int | None = None
    """CPU threads for torch (None keeps torch's default)."""


@dataclass
class EditConfig:
    """Edit generated pictures from a source to a target prompt with SDS and DDS, and check the colours."""

    model: Path = Path("toy-teacher")
    """Folder of the diffusion model (diffusers layout): the toy teacher, or Stable Diffusion."""
    pairs: tuple[str, ...] = ("red:blue", "blue:yellow", "green:red", "yellow:purple", "purple:green", "orange:blue")
    """Colour edits as SOURCE:TARGET; the source picture shows a SOURCE object, the prompts differ in the colour."""
    pictures_per_pair: int = 2
    """Source pictures per pair (the shape cycles through sphere, cube, cylinder)."""
    steps: int = 200
    """Optimisation steps per edit."""
    lr: float = 0.1
    """SGD step size on the latents (the update is ``lr * g``)."""
    sds_guidance_scale: float = 20.0
    """Classifier-free guidance weight of SDS (SDS needs a large one)."""
    dds_guidance_scale: float = 7.5
    """Classifier-free guidance weight of both DDS predictions."""
    min_step_ratio: float = 0.05
    """Smallest diffusion timestep sampled, as a fraction of the training timesteps."""
    max_step_ratio: float = 0.95
    """Largest diffusion timestep sampled, as a fraction of the training timesteps."""
    seed: int = 20_000
    """Seed of the source pictures (a stream the teacher was not trained on) and of the noise."""
    output: Path = Path("guidance_2d")
    """Folder for the before/after sheet, one PNG per picture and method, and report.json."""
    device: str | None = None
    """Torch device; None picks an accelerator when torch has one, else the CPU."""
    threads: int | None = None
    """CPU threads for torch (None keeps torch's default)."""
    quiet: bool = False
    """No progress bar."""
