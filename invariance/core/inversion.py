"""Representation inversion as the STIR reference code runs it, or with Adam.

X' = argmin ||m[j](X') - m[j](X)||_2 / ||m[j](X)||_2 per sample, from N(0, 1) noise, iterates
clamped to [0, 1], best iterate kept per sample (including one evaluation after the last step).
``optimizer: reference`` takes the reference code's normalized gradient step (constant L2 step
``step_size``); ``optimizer: adam`` takes Adam steps (elementwise moments, learning rate
``step_size`` decayed to 0 on a cosine over ``iterations``, momentum beta1 rising from 0.5 to 0.9
on the same cosine: see ``adam_schedule``). Every quantity is per sample (the
loss is a sum of per-sample terms, so each sample's gradient is its own; Adam's state is
elementwise), so micro-batching is exact: each chunk is inverted on its own with identical results.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from invariance.config import InversionConfig, TokenPolicy
from invariance.core.models import FeatureModel

# Host syncs cost on GPU: the early-stop test reads the losses only this often.
EARLY_STOP_CHECK_EVERY = 25
_CPU_MICRO_BATCH = 64
_PROBE_SAMPLES = 4
# share of the free GPU memory a chunk's forward and backward may take (see micro_batch_for_memory)
MICRO_BATCH_MEMORY_FRACTION = 0.6
# compiled feature graphs kept per process: layers x chunk shapes of a grid, with room to spare
_COMPILED_GRAPHS = 128
# Adam's first-moment decay (beta1) at the first and the last step, its second-moment decay and
# denominator guard (torch.optim.Adam's defaults but for beta1's start: see adam_schedule)
ADAM_BETA1_START = 0.5
ADAM_BETA1_END = 0.9
ADAM_BETA2 = 0.999
ADAM_EPS = 1e-8


@dataclass(frozen=True)
class InversionResult:
    """``images: [n, 3, H, W]`` (X'), the best iterate per sample: in [0, 1] unless no step
    improved on the N(0, 1) start, which the reference code keeps too (only at a handful of
    iterations); ``final_loss: [n]`` best relative L2 per sample; ``iterations_run``: steps taken
    by the longest micro-batch (with ``tolerance``: up to the first check at which every sample
    was below it; independent of the micro-batches, like X' and the losses)."""

    images: torch.Tensor
    final_loss: torch.Tensor
    iterations_run: int


def start_noise(seed: int, sample_indices: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """N(0, 1) start images ``[n, *shape]``, a function of (seed, sample index) only.

    Independent of the model, the device and of which other samples are present, so pt and
    ft inversions see the same noise (common random numbers) and chunks are exact.
    """
    generator = torch.Generator(device="cpu")
    noise = torch.empty((len(sample_indices), *shape), dtype=torch.float32)
    for row, index in enumerate(sample_indices.tolist()):
        # a hash, not seed * K + index: no two (seed, index) pairs may share a stream
        digest = hashlib.blake2b(f"{int(seed)}:{int(index)}".encode(), digest_size=8).digest()
        generator.manual_seed(int.from_bytes(digest, "little") >> 1)
        noise[row] = torch.randn(shape, generator=generator)
    return noise


def _autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _tf32_matmuls(device: torch.device, bf16: bool) -> Iterator[None]:
    """TF32 for the float32 matmuls left over in a bf16 inversion on CUDA, restored afterwards.

    TF32 keeps more mantissa bits than bf16, so it loses nothing a bf16 run has not already
    accepted; a run with ``bf16: false`` asked for float32 and keeps full float32 matmuls.
    """
    if not (bf16 and device.type == "cuda"):
        yield
        return
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def _compile_cache_room(compiled: bool) -> contextlib.AbstractContextManager:
    """Room for one compiled graph per (layer, chunk shape) of the features function.

    Dynamo keeps at most 8 graphs per function by default (pt and ft share them) and past that
    silently runs eager: without this, a worker compiles its first 8 layers and no more.
    """
    if not compiled:
        return contextlib.nullcontext()
    import torch._dynamo

    dynamo_config = torch._dynamo.config
    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    return dynamo_config.patch(**{name: max(getattr(dynamo_config, name), _COMPILED_GRAPHS)})


# (step index, iterate [n, 3, H, W], its gradient, active samples or None) -> the next iterate,
# before clamping; built per chunk, so optimizer state lives and dies with the chunk
StepFunction = Callable[[int, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def _reference_step(start: torch.Tensor, config: InversionConfig) -> StepFunction:
    """The reference code's normalized gradient step: ``x - step_size * g / ||g||_2`` per sample."""

    def take_step(step: int, current: torch.Tensor, gradient: torch.Tensor, active: torch.Tensor | None) -> torch.Tensor:
        gradient_norm = gradient.flatten(1).norm(dim=1).clamp_min(1e-12)[:, None, None, None]
        return current - config.step_size * gradient / gradient_norm

    return take_step


def _cosine_fall(step: int, iterations: int) -> float:
    """1 at step 0, falling on a cosine to 0 at ``iterations``."""
    return 0.5 * (1.0 + math.cos(math.pi * step / iterations))


def adam_learning_rate(step: int, config: InversionConfig) -> float:
    """Adam's learning rate at ``step`` (0-based): ``step_size`` on a cosine down to 0 at ``iterations``."""
    return config.step_size * _cosine_fall(step, config.iterations)


def adam_beta1(step: int, config: InversionConfig) -> float:
    """Adam's momentum at ``step``: ADAM_BETA1_START, rising as the learning rate falls to ADAM_BETA1_END.

    Short budgets (bench/bench_optimizers.py, bench/RESULTS.md): with torch's constant 0.9 the
    large early steps overshoot and the momentum carries them on, so at 25 steps Adam was 10x
    above the reference's 100-step loss on a ViT's early blocks; with 0.5 while the rate is high
    it is below. 0.9 as the rate decays keeps the deep convergence of long budgets. This is the
    momentum half of a one-cycle policy; its learning-rate warm-up did not help short budgets.
    """
    return ADAM_BETA1_END + (ADAM_BETA1_START - ADAM_BETA1_END) * _cosine_fall(step, config.iterations)


def adam_schedule(config: InversionConfig) -> list[tuple[float, float]]:
    """``(learning rate, beta1)`` of every step of an Adam inversion of ``config.iterations`` steps."""
    return [(adam_learning_rate(step, config), adam_beta1(step, config)) for step in range(config.iterations)]


def _adam_step(start: torch.Tensor, config: InversionConfig) -> StepFunction:
    """Adam (torch.optim.Adam's update, elementwise moments) on ``adam_schedule``'s learning rate and beta1.

    With beta1 changing per step the first moment's bias correction is ``1 - prod(beta1 so far)``
    (the weights of the moving average sum to that), which is torch's ``1 - beta1**t`` when beta1
    is constant. The moments are elementwise, so a sample's state depends only on its own
    gradients. A sample stopped by the tolerance never moves again (the caller discards its
    step), so its state no longer matters.
    """
    first = torch.zeros_like(start)
    second = torch.zeros_like(start)
    schedule = adam_schedule(config)
    beta1_product = 1.0

    def take_step(step: int, current: torch.Tensor, gradient: torch.Tensor, active: torch.Tensor | None) -> torch.Tensor:
        nonlocal beta1_product
        learning_rate, beta1 = schedule[step]
        gradient = gradient.float()
        first.mul_(beta1).add_(gradient, alpha=1 - beta1)
        second.mul_(ADAM_BETA2).addcmul_(gradient, gradient, value=1 - ADAM_BETA2)
        beta1_product *= beta1
        correction1 = 1 - beta1_product
        correction2 = 1 - ADAM_BETA2 ** (step + 1)
        denominator = (second / correction2).sqrt_().add_(ADAM_EPS)
        return current - learning_rate / correction1 * first / denominator

    return take_step


_STEPS: dict[str, Callable[[torch.Tensor, InversionConfig], StepFunction]] = {
    "reference": _reference_step,
    "adam": _adam_step,
}


def _invert_chunk(
    features: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    start: torch.Tensor,
    config: InversionConfig,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    autocast = _autocast(images.device, config.bf16)
    with torch.no_grad(), autocast:
        target = features(images).float()
    target_norm = target.norm(dim=1).clamp_min(1e-12)

    def relative_loss(candidate: torch.Tensor) -> torch.Tensor:
        with autocast:
            output = features(candidate).float()
        return (output - target).norm(dim=1) / target_norm

    current = start.clone()
    best_images = current.clone()
    best_loss = torch.full((len(images),), float("inf"), device=images.device)
    # early stop is decided per sample at fixed steps, so no sample's result depends on which
    # others share its chunk: a sample below the tolerance at a check stops moving
    active = None if config.tolerance is None else torch.ones(len(images), dtype=torch.bool, device=images.device)
    take_step = _STEPS[config.optimizer](current, config)
    steps = 0
    for step in range(config.iterations):
        current.requires_grad_(True)
        loss = relative_loss(current)
        # the sum of per-sample losses: each sample's gradient is its own loss's
        (gradient,) = torch.autograd.grad(loss.sum(), current)
        with torch.no_grad():
            improved = loss < best_loss
            best_loss = torch.where(improved, loss, best_loss)
            best_images = torch.where(improved[:, None, None, None], current, best_images)
            stepped = take_step(step, current.detach(), gradient, active).clamp_(0.0, 1.0)
            current = stepped if active is None else torch.where(active[:, None, None, None], stepped, current.detach())
        steps = step + 1
        if active is not None and steps % EARLY_STOP_CHECK_EVERY == 0:
            active = active & (best_loss >= config.tolerance)
            if not bool(active.any()):
                break
    with torch.no_grad():
        loss = relative_loss(current)
        improved = loss < best_loss
        best_loss = torch.where(improved, loss, best_loss)
        best_images = torch.where(improved[:, None, None, None], current, best_images)
    return best_images.detach(), best_loss.detach(), steps


def layer_features_function(model: FeatureModel, layer: int, token_policy: TokenPolicy) -> Callable[[torch.Tensor], torch.Tensor]:
    """``[n, 3, H, W] -> [n, d]``: the features an inversion at ``layer`` matches."""

    def features(batch: torch.Tensor) -> torch.Tensor:
        return model.layer_features(batch, [layer], token_policy)[layer]

    return features


def probe_inversion_step(
    model: FeatureModel,
    layer: int,
    token_policy: TokenPolicy,
    images: torch.Tensor,
    noise: torch.Tensor,
    config: InversionConfig,
) -> int:
    """Run a two-step inversion, in float32 and uncompiled, of the first (at most 4) of
    ``images, noise: [n, 3, H, W]``; returns how many samples it ran.

    Its peak memory per sample (the target features, the iterates, the step's activations and
    the gradient the step before left) sizes the micro-batches: every step after the second
    holds the same.
    """
    probe = min(_PROBE_SAMPLES, len(images))
    two_steps = config.model_copy(update={"iterations": 2, "bf16": False, "compile": False})
    _invert_chunk(layer_features_function(model, layer, token_policy), images[:probe], noise[:probe], two_steps)
    return probe


def micro_batch_for_memory(bytes_per_sample: int, free_bytes: int) -> int:
    """Samples per chunk given one sample's peak inversion memory and the memory free for it.

    The float32 probe overestimates bf16 runs; the 0.4 left over absorbs allocator fragmentation.
    """
    return max(1, int(MICRO_BATCH_MEMORY_FRACTION * free_bytes // max(1, bytes_per_sample)))


def gpu_bytes_free_to_process(free_on_device: int, total: int, reserved: int, allocated: int, process_share: float) -> int:
    """Bytes this process may still allocate on its GPU.

    What the device has free, plus the blocks this process's caching allocator holds but does
    not use (without them every inversion after the first in a worker would get a smaller
    micro-batch), capped by this process's share of the device (processes sharing a GPU, e.g.
    fractional Ray GPUs, each set one: otherwise shards that start together would each size
    their chunks to the whole free memory).
    """
    unused_reserved = max(0, reserved - allocated)
    within_share = int(process_share * total) - allocated
    return max(0, min(free_on_device + unused_reserved, within_share))


def auto_micro_batch(
    model: FeatureModel,
    layer: int,
    token_policy: TokenPolicy,
    images: torch.Tensor,
    noise: torch.Tensor,
    config: InversionConfig,
) -> int:
    """Samples per chunk for inverting ``images, noise: [n, 3, H, W]``: on CUDA from a measured
    per-sample peak and the free memory, on CPU a fixed size that bounds host memory."""
    if images.device.type != "cuda":
        return _CPU_MICRO_BATCH
    return measured_micro_batch(model, layer, token_policy, images, noise, config)


def measured_micro_batch(
    model: FeatureModel,
    layer: int,
    token_policy: TokenPolicy,
    images: torch.Tensor,
    noise: torch.Tensor,
    config: InversionConfig,
) -> int:
    """The CUDA sizing: the probe's peak per sample (``torch.cuda.max_memory_allocated``) against
    what this process may still allocate on ``images.device``."""
    device = images.device
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    probe = probe_inversion_step(model, layer, token_policy, images, noise, config)
    per_sample = (torch.cuda.max_memory_allocated(device) - before) // probe
    free, total = torch.cuda.mem_get_info(device)
    free = gpu_bytes_free_to_process(
        free_on_device=free,
        total=total,
        reserved=torch.cuda.memory_reserved(device),
        allocated=torch.cuda.memory_allocated(device),
        process_share=torch.cuda.get_per_process_memory_fraction(device),
    )
    return micro_batch_for_memory(per_sample, free)


def invert(
    model: FeatureModel,
    layer: int,
    images: torch.Tensor,
    noise: torch.Tensor,
    config: InversionConfig,
    token_policy: TokenPolicy = "flatten",
) -> InversionResult:
    """Invert ``model`` at ``layer`` for ``images: [n, 3, H, W]`` from ``noise: [n, 3, H, W]``.

    The forward pass stops at ``layer``; parameters get no gradients.
    """
    model.requires_grad_(False)
    if len(images) == 0:
        return InversionResult(images.clone(), torch.empty(0, device=images.device), 0)
    features = layer_features_function(model, layer, token_policy)
    compiled = config.compile and images.device.type == "cuda"
    if compiled:
        features = torch.compile(features, dynamic=False)
    noise = noise.to(images.device)
    # the results are written in place, chunk by chunk: no concatenation doubling them at the end,
    # and allocated before the chunks are sized, so the free memory auto sees is what they get
    inverted = torch.empty_like(images)
    final_loss = torch.empty(len(images), device=images.device)
    chunk = config.micro_batch
    if not isinstance(chunk, int):
        chunk = auto_micro_batch(model, layer, token_policy, images, noise, config)
    steps = 0
    with _tf32_matmuls(images.device, config.bf16), _compile_cache_room(compiled):
        for begin in range(0, len(images), chunk):
            end = begin + chunk
            chunk_images, chunk_loss, chunk_steps = _invert_chunk(features, images[begin:end], noise[begin:end], config)
            inverted[begin:end] = chunk_images
            final_loss[begin:end] = chunk_loss
            steps = max(steps, chunk_steps)
    return InversionResult(inverted, final_loss, steps)
