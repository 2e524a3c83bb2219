"""Typed run configuration: YAML files plus dotted `key=value` overrides.

The schema is a tree of dataclasses checked by OmegaConf: an unknown key or a value of the
wrong type is rejected while the config is read, and `validate()` rejects impossible values,
so a typo stops the run before any process group, data or model exists.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A user mistake in the configuration; the message names the key and what to do."""


@dataclass
class RunConfig:
    dir: Optional[str] = None  # default: runs/<YYYYmmdd-HHMMSS>, agreed by all ranks
    seed: int = 0
    name: str = "gan"
    threads: int = 0  # CPU threads per process; 0: the cores divided among this node's processes


@dataclass
class TrainConfig:
    steps: int = 1000  # total G updates; a resumed run continues up to this number
    batch_size: int = 64  # per process and per micro-batch
    grad_accum: int = 1  # micro-batches per update
    d_steps: int = 1  # D updates per G update
    precision: str = "bf16"  # fp32 | bf16 | fp16
    loss: str = "nonsaturating"  # nonsaturating | minimax | hinge | rpgan
    # lr_g, lr_d, beta2 (and reg.r*_gamma, ema.half_life_kimg, augment.p): a number or a schedule
    # {start, end, kimg, shape: cosine|linear} over images seen (gan_dist/schedules.py)
    lr_g: Any = 2e-4
    lr_d: Any = 2e-4
    beta1: float = 0.5
    beta2: Any = 0.999
    channels_last: bool = True  # NHWC activations into the convolutions (docs/benchmarks.md)
    compile: bool = False  # torch.compile G and D in place; minutes of compiling first (docs/benchmarks.md)
    # recompute each block's activations in the backward instead of keeping them (docs/benchmarks.md):
    # false | true (G and D) | G | D | "G,D"; less activation memory for one more forward per backward
    activation_checkpointing: Any = False
    # convolutions on grids of <= 64 positions as one matmul (gan_dist/matmul_conv.py): auto = on a CPU
    matmul_conv: str = "auto"  # auto | always | never
    log_every: int = 25
    sample_every: int = 250
    ckpt_every: int = 500  # also saved at the end and on SIGTERM/SIGUSR1/SIGINT
    keep_ckpts: int = 3  # newest checkpoints kept
    keep_best: bool = False  # keep the generator of the lowest FID (or digits FD) in <run.dir>/best/
    ckpt_dir: Optional[str] = None  # unset: <run.dir>/checkpoints; every rank must see it
    resume: Optional[str] = None  # a checkpoint or run directory, used when run.dir has no checkpoint yet
    max_nonfinite: int = 20  # consecutive steps with NaN/Inf loss or gradient before the run stops
    # labels of the fakes of a conditional model: uniform over the classes, or the data's class frequencies
    fake_labels: str = "uniform"  # uniform | data


@dataclass
class DCGANConfig:
    nz: int = 100  # latent size
    ngf: int = 32  # G's width; the demo's, the DCGAN paper's is 64 (configs/dcgan_64.yaml)
    ndf: int = 32  # D's width
    norm: str = "batch"  # batch | none


@dataclass
class StyleGAN2Config:
    """StyleGAN2 (gan_dist/models/stylegan2, docs/models.md); unset sizes come from the preset."""
    preset: str = "stylegan2"  # stylegan2 | paper256 (stylegan2-ada-pytorch's cfg_specs) | none (every size set)
    z_dim: int = 512  # latent size
    w_dim: int = 512  # intermediate latent size
    mapping_layers: Optional[int] = None  # FC layers of the mapping network (presets: 8)
    channel_base: Optional[int] = None  # feature maps at resolution r: min(channel_base // r, channel_max)
    channel_max: Optional[int] = None  # (presets: 512)
    mbstd_group: Optional[int] = None  # samples per minibatch-std group (stylegan2: 4, paper256: 8)
    conv_clamp: Optional[float] = None  # clamp of convolution outputs, 0: off (presets: 256)
    mapping_lr_mult: float = 0.01  # learning-rate multiplier of the mapping layers
    w_avg_beta: float = 0.995  # decay of the tracked average w (truncation)
    style_mixing: float = 0.9  # probability that a fake mixes the w of two latents
    pl_weight: float = 2.0  # path-length regularisation weight; 0: no Greg phase
    pl_every: int = 4  # Greg every pl_every steps (lazy, weighted by the interval)
    pl_decay: float = 0.01  # decay of the path-length running mean
    pl_batch_shrink: int = 2  # Greg runs on batch_size // pl_batch_shrink samples


@dataclass
class R3GANConfig:
    """R3GAN's networks (gan_dist/models/r3gan); unset lists and sizes come from the preset."""
    preset: str = "cifar10"  # cifar10 | ffhq64 | ffhq256 | imagenet32 | imagenet64 | tiny
    widths: Optional[list[int]] = None  # G's channels per stage from 4x4 up (D: the reverse)
    cardinalities: Optional[list[int]] = None  # groups of each stage's KxK convolutions
    blocks: Optional[list[int]] = None  # residual blocks per stage
    expansion: Optional[int] = None  # channels inside a block / the stage's width
    z_dim: Optional[int] = None  # latent size
    kernel_size: int = 3  # of the grouped convolution
    # G's last / D's first N stages in bf16 (fp32 master weights), as the reference's FP16Stages;
    # preset: the preset's reference count; needs train.precision=fp32 (docs/models.md)
    bf16_stages: Any = 0


@dataclass
class ModelConfig:
    arch: str = "dcgan"  # the family: its settings are the section of the same name
    resolution: Any = "auto"  # image side in pixels; auto: from the data (its manifest or first sample)
    channels: Any = "auto"  # 1 | 3 | auto (from the data)
    # classes of a conditional model; 0: unconditional; auto: from the data (manifest, else a label scan)
    num_classes: Any = 0
    dcgan: DCGANConfig = field(default_factory=DCGANConfig)
    stylegan2: StyleGAN2Config = field(default_factory=StyleGAN2Config)
    r3gan: R3GANConfig = field(default_factory=R3GANConfig)


@dataclass
class RegConfig:
    """Gradient penalties on D (docs/recipes.md)."""
    r1_gamma: Any = 0.0  # gamma/2 * E||grad_x D(x)||^2 on real images; 0: off; or a schedule
    r2_gamma: Any = 0.0  # the same on generated images; 0: off; or a schedule
    d_every: int = 1  # 1: the penalties join Dmain's backward; k > 1: a Dreg phase every k steps


@dataclass
class DataConfig:
    urls: Optional[Any] = None  # brace pattern, list, directory or manifest; unset: demo digits
    num_workers: int = 2
    shuffle_buffer: int = 1000
    mode: str = "epoch"  # epoch: each sample once per epoch | stream: endless reshuffled shards
    epoch_remainder: str = "pad"  # epoch mode: fill (pad) or drop the last partial batch of each reader
    flip: bool = False  # random horizontal flip
    allow_pipe: bool = False  # allow remote and pipe: URLs (they run curl/gsutil/a shell command)
    max_skip_fraction: float = 0.01  # stop when more than this share of the samples read is bad
    prefetch_factor: int = 2  # batches each loader worker prepares ahead


@dataclass
class FSDPConfig:
    # free the gathered parameters after each block's forward (ZeRO-3 style); false keeps them
    # until the backward (ZeRO-2 style: less communication, more memory)
    reshard_after_forward: bool = True
    param_dtype: Optional[str] = None  # fp32 | bf16 | fp16; unset: follows train.precision
    reduce_dtype: str = "fp32"  # dtype of the gradient reduce-scatter
    cpu_offload: bool = False  # sharded parameters, gradients and optimizer state live on the CPU


@dataclass
class DeepSpeedConfig:
    config: Optional[str] = None  # a DeepSpeed JSON (configs/deepspeed/); unset: built from the keys below
    zero_stage: Optional[int] = None  # 0-3; unset: the JSON's stage, else 2
    gradient_clipping: float = 0.0  # max global gradient norm per model; 0: off
    offload_optimizer: str = "none"  # none | cpu (ZeRO-Offload of optimizer state, stages 1-3)
    offload_param: str = "none"  # none | cpu (parameters, stage 3 only)


@dataclass
class ParallelConfig:
    strategy: str = "auto"  # auto | none | ddp | fsdp | deepspeed
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)


@dataclass
class EMAConfig:
    enabled: bool = True  # samples, metrics and generator_ema.pt use the averaged weights
    half_life_kimg: Any = 10.0  # thousands of images over which an old weight's share halves; or a schedule
    rampup: Optional[float] = 0.05  # half-life at most rampup x images seen so far; null: no ramp-up


@dataclass
class EvalConfig:
    enabled: bool = True
    every: int = 250  # steps between evaluations (also at the start and the end); 0: only at the end
    num_samples: int = 2000  # generated images per evaluation, split across the ranks
    batch_size: int = 250  # per rank, for generating and embedding
    # auto: digits_fd,kid on the demo data, else fid,kid when the Inception weights are found, else none;
    # or a comma-separated list of fid, kid, is, pr (precision/recall), digits_fd (docs/evaluation.md)
    metrics: str = "auto"
    # the features of FD and KID; auto: digits on the demo data, else inception when its weights are found
    extractor: str = "auto"  # auto | digits | inception
    # weights files (nothing is downloaded): the 2015-12-05 Inception of FID, KID and IS
    # (weights-inception-2015-12-05-6726825d.pth, or $GAN_DIST_INCEPTION_WEIGHTS) and torchvision's
    # VGG16 of precision/recall (vgg16-397923af.pth, or $GAN_DIST_VGG16_WEIGHTS); else torch's hub cache
    inception_weights: Optional[str] = None
    vgg16_weights: Optional[str] = None
    reference_images: int = 50000  # real images for the reference statistics (cached); 0: all
    kid_subsets: int = 100
    kid_subset_size: int = 1000


@dataclass
class AugmentConfig:
    """Differentiable augmentation of every image D sees, real and fake (docs/recipes.md)."""
    kind: str = "none"  # none | diffaugment | ada
    policy: str = "color,translation,cutout"  # diffaugment: comma-separated, applied in this order
    pipeline: str = "bgc"  # ada: b (blit), g (geometric), c (color), o (cutout), combined as in "bgc"
    # ada: per-op multipliers of p, e.g. {brightness: 0.5}; unlisted ops: 1
    p_scale: dict[str, float] = field(default_factory=dict)
    p: Any = None  # ada: a fixed probability, or a schedule {start, end, kimg, shape}; null: adjusted toward `target`
    target: float = 0.6  # ada: the wanted E[sign(D(x_real))]
    interval: int = 4  # ada: steps between adjustments of p
    kimg: float = 500.0  # ada: thousands of real images for p to move from 0 to 1
    p_init: float = 0.0  # ada: p at the start of an adaptive run


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    reg: RegConfig = field(default_factory=RegConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)


CHOICES = {
    "train.precision": ("fp32", "bf16", "fp16"),
    "train.matmul_conv": ("auto", "always", "never"),
    "train.loss": ("nonsaturating", "minimax", "hinge", "rpgan"),
    "train.fake_labels": ("uniform", "data"),
    "model.channels": (1, 3, "auto"),
    "model.dcgan.norm": ("batch", "none"),
    "data.mode": ("epoch", "stream"),
    "data.epoch_remainder": ("pad", "drop"),
    "parallel.strategy": ("auto", "none", "ddp", "fsdp", "deepspeed"),
    "parallel.fsdp.param_dtype": (None, "fp32", "bf16", "fp16"),
    "parallel.fsdp.reduce_dtype": ("fp32", "bf16", "fp16"),
    "parallel.deepspeed.zero_stage": (None, 0, 1, 2, 3),
    "parallel.deepspeed.offload_optimizer": ("none", "cpu"),
    "parallel.deepspeed.offload_param": ("none", "cpu"),
    "eval.extractor": ("auto", "digits", "inception"),
}
POSITIVE = ("train.steps", "train.batch_size", "train.grad_accum", "train.d_steps",
            "train.log_every", "train.sample_every", "train.ckpt_every", "train.keep_ckpts",
            "train.max_nonfinite", "model.dcgan.nz", "model.dcgan.ngf", "model.dcgan.ndf", "reg.d_every",
            "data.shuffle_buffer",
            "data.prefetch_factor", "eval.num_samples", "eval.batch_size", "eval.kid_subsets",
            "eval.kid_subset_size")
NON_NEGATIVE = ("run.threads", "data.num_workers", "eval.every", "eval.reference_images")


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def validate(cfg: Config) -> None:
    """Reject impossible values, naming the key."""
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        if value not in allowed:
            shown = ", ".join("null" if a is None else str(a) for a in allowed)
            hint = (" (YAML reads on/off/yes/no/true/false as a boolean)"
                    if value in ("True", "False", True, False) else "")
            raise ConfigError(f"{key}={value!r} is not one of: {shown}{hint}")
    for key in POSITIVE:
        if _get(cfg, key) <= 0:
            raise ConfigError(f"{key}={_get(cfg, key)!r} must be a positive integer")
    for key in NON_NEGATIVE:
        if _get(cfg, key) < 0:
            raise ConfigError(f"{key}={_get(cfg, key)!r} must be >= 0")
    from gan_dist import schedules
    schedules.validate(cfg)  # lr_g, lr_d, beta2, the gammas, the EMA half-life, augment.p: at every point
    if not 0 <= cfg.train.beta1 < 1:
        raise ConfigError(f"train.beta1={cfg.train.beta1!r} must be in [0, 1)")
    if cfg.train.compile and (cfg.reg.r1_gamma or cfg.reg.r2_gamma):  # a schedule counts as on
        raise ConfigError("train.compile=true cannot be combined with a gradient penalty (reg.r1_gamma, "
                          "reg.r2_gamma): the penalty differentiates D's compiled forward twice, which "
                          "torch.compile does not support (docs/recipes.md); use train.compile=false")
    from gan_dist.parallel.checkpointing import validate as validate_checkpointing
    validate_checkpointing(cfg)  # train.activation_checkpointing and what it cannot be combined with
    res = cfg.model.resolution
    if res != "auto" and (isinstance(res, bool) or not isinstance(res, int) or res <= 0):
        raise ConfigError(f"model.resolution={res!r} must be a positive integer or auto (from the data)")
    k = cfg.model.num_classes
    if k != "auto" and (isinstance(k, bool) or not isinstance(k, int) or k < 0):
        raise ConfigError(f"model.num_classes={k!r} must be an integer >= 0 (0: unconditional) or auto (from the data)")
    from gan_dist.augment import validate as validate_augment
    validate_augment(cfg.augment)  # augment.kind, policy, pipeline, p_scale, target (p: schedules.validate)
    from gan_dist.models import FAMILIES, model_spec

    if cfg.model.arch not in FAMILIES:
        raise ConfigError(f"model.arch={cfg.model.arch!r} is not one of: {', '.join(FAMILIES)}")
    if "auto" not in (res, cfg.model.channels, k):
        model_spec(cfg.model)  # the family checks its own settings (else once the data gave the shape)
    if cfg.model.arch == "r3gan":
        from gan_dist.models.r3gan import check_config as check_r3gan
        check_r3gan(cfg)  # model.r3gan.bf16_stages against train.precision and parallel.fsdp.param_dtype
    if not 0 <= cfg.data.max_skip_fraction <= 1:
        raise ConfigError(f"data.max_skip_fraction={cfg.data.max_skip_fraction!r} must be in [0, 1]")
    if cfg.ema.rampup is not None and cfg.ema.rampup < 0:
        raise ConfigError(f"ema.rampup={cfg.ema.rampup!r} must be >= 0 (or null: no ramp-up)")
    ds = cfg.parallel.deepspeed
    if ds.gradient_clipping < 0:
        raise ConfigError(f"parallel.deepspeed.gradient_clipping={ds.gradient_clipping!r} must be >= 0 (0: off)")
    if ds.config is not None and not Path(ds.config).is_file():
        raise ConfigError(f"parallel.deepspeed.config={ds.config!r}: no such file "
                          "(see configs/deepspeed/ for examples)")
    urls = cfg.data.urls
    if urls is not None and not isinstance(urls, (str, list, tuple)):
        raise ConfigError(f"data.urls must be a string or a list of strings, got {type(urls).__name__}")
    if isinstance(urls, (list, tuple)) and not all(isinstance(u, str) for u in urls):
        raise ConfigError("data.urls: every entry of the list must be a string")


# keys of the layout before model families had sections of their own -> where they live now
MOVED = {f"model.{k}": f"model.dcgan.{k}" for k in ("nz", "ngf", "ndf", "norm")}


def upgrade_layout(tree: dict) -> dict:
    """A config tree of an older run (checkpoint, config.yaml) in today's layout: DCGAN's
    settings moved from `model.*` into `model.dcgan.*`. Returns a new dict."""
    import copy

    tree = copy.deepcopy(tree)
    model = tree.get("model")
    if isinstance(model, dict) and model.get("arch", "dcgan") == "dcgan":
        for old, new in MOVED.items():
            name = old.split(".")[1]
            if name in model:
                model.setdefault("dcgan", {})[name] = model.pop(name)
    return tree


def _error_message(exc: OmegaConfBaseException, source: str) -> str:
    key = getattr(exc, "full_key", None) or getattr(exc, "key", None)
    msg = getattr(exc, "msg", None) or str(exc).splitlines()[0]
    if str(key) in MOVED:
        return f"config key {key!r} (from {source}) is now {MOVED[str(key)]!r}"
    if type(exc).__name__ == "ConfigKeyError" or "not in" in msg:
        return (f"unknown config key {key!r} (from {source}). "
                f"Run `python -m gan_dist.train --print-config` to list the keys.")
    return f"bad value for config key {key!r} (from {source}): {msg}"


def load_config(path: Optional[str | Path] = None, overrides: list[str] | tuple[str, ...] = (),
                upgrade: bool = False) -> Config:
    """Schema defaults <- YAML file <- dotted overrides, then validate. `upgrade` reads a file
    written by an older gan_dist (a run's config.yaml) in today's layout."""
    merged = OmegaConf.structured(Config)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            loaded = OmegaConf.load(path)
            if upgrade:
                loaded = OmegaConf.create(upgrade_layout(OmegaConf.to_container(loaded)))
            merged = OmegaConf.merge(merged, loaded)
        except OmegaConfBaseException as exc:
            raise ConfigError(_error_message(exc, str(path))) from None
        except Exception as exc:  # YAML syntax
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.steps=30)")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as exc:
            raise ConfigError(_error_message(exc, f"override {item!r}")) from None
    try:
        cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        raise ConfigError(_error_message(exc, "config")) from None
    if isinstance(cfg.data.urls, tuple):
        cfg.data.urls = list(cfg.data.urls)
    validate(cfg)
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def was_set(overrides: list[str] | tuple[str, ...], path: Optional[str | Path], key: str) -> bool:
    """Whether the user chose `key` explicitly (on the command line or in the YAML file)."""
    if any(o.split("=", 1)[0].strip() == key for o in overrides):
        return True
    if path is not None and Path(path).is_file():
        node = OmegaConf.load(path)
        return OmegaConf.select(node, key, default=None) is not None
    return False
