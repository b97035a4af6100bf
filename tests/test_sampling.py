"""Sigmas and noise match ComfyUI (and diffusers where the two agree)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ryla.flux import sampling


def comfy_reference_sigmas(shift: float, steps: int, scheduler: str) -> np.ndarray:
    """ComfyUI's schedules written out in float64 from comfy/model_sampling.py and
    comfy/samplers.py, independently of ryla's implementation."""
    t = np.arange(1, 10001) / 10000.0
    table = math.exp(shift) / (math.exp(shift) + (1 / t - 1))

    def sigma(x):
        return math.exp(shift) / (math.exp(shift) + (1 / x - 1))

    if scheduler == "simple":
        stride = 10000 / steps
        return np.array([table[-(1 + int(x * stride))] for x in range(steps)] + [0.0])
    # normal: timesteps linspace(sigma_max, sigma_min), and sigma() applied to them again
    ts = np.linspace(table[-1], table[0], steps)
    return np.array([sigma(x) for x in ts] + [0.0])


@pytest.mark.parametrize("width,height", [(1024, 1024), (768, 1344)])
@pytest.mark.parametrize("scheduler", ["simple", "normal"])
@pytest.mark.parametrize("with_model_sampling_flux", [True, False])
def test_sigmas_match_comfyui(width, height, scheduler, with_model_sampling_flux):
    shift = sampling.resolution_shift(width, height) if with_model_sampling_flux else sampling.DEFAULT_SHIFT
    ours = sampling.calculate_sigmas(sampling.FluxModelSampling(shift), scheduler, 28).numpy()
    expected = comfy_reference_sigmas(shift, 28, scheduler)
    assert ours.shape == (29,)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=2e-6)


def test_model_sampling_flux_shift_formula():
    # ComfyUI: 256 patches -> base_shift, 4096 patches (1024x1024) -> max_shift.
    assert sampling.resolution_shift(1024, 1024) == pytest.approx(1.15)
    assert sampling.resolution_shift(256, 256) == pytest.approx(0.5)
    assert sampling.resolution_shift(768, 1344) == pytest.approx(0.5 + 0.65 * (4032 - 256) / 3840)


@pytest.mark.parametrize("width,height", [(1024, 1024), (768, 1344)])
def test_simple_schedule_matches_diffusers_with_dynamic_shift(width, height):
    from diffusers import FlowMatchEulerDiscreteScheduler

    steps = 28
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    mu = sampling.resolution_shift(width, height)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    ours = sampling.calculate_sigmas(sampling.FluxModelSampling(mu), "simple", steps)
    # ComfyUI reads a 10000-entry table, diffusers evaluates exactly: equal to 1e-3.
    np.testing.assert_allclose(ours.numpy(), scheduler.sigmas.numpy(), atol=1e-3)


def test_denoise_takes_the_tail_of_a_longer_schedule():
    ms = sampling.FluxModelSampling()
    full = sampling.calculate_sigmas(ms, "simple", 20)
    partial = sampling.ksampler_sigmas(ms, "simple", 10, 0.5)
    assert torch.equal(partial, full[-11:])
    assert len(sampling.ksampler_sigmas(ms, "simple", 10, 0.0)) == 0


def test_noise_is_comfyui_prepare_noise():
    shape = (2, 16, 32, 24)
    noise = sampling.prepare_noise(shape, 1234)
    generator = torch.manual_seed(1234)
    expected = torch.randn(shape, dtype=torch.float32, generator=generator, device="cpu")
    assert noise.dtype == torch.float32 and noise.device.type == "cpu"
    assert torch.equal(noise, expected)
    # One draw for the whole batch: the second image does not restart the generator.
    assert not torch.equal(noise[0], noise[1])
    assert torch.equal(sampling.prepare_noise((1, 16, 32, 24), 1234)[0], noise[0])


def test_pack_unpack_roundtrip():
    x = torch.randn(2, 16, 8, 12)
    tokens = sampling.pack_latents(x)
    assert tokens.shape == (2, 24, 64)
    assert torch.equal(sampling.unpack_latents(tokens, 8, 12), x)
    ids = sampling.latent_image_ids(8, 12, "cpu", torch.float32)
    assert ids.shape == (24, 3) and ids[7].tolist() == [0.0, 1.0, 1.0]


def test_euler_step_is_flow_matching():
    sigmas = torch.tensor([1.0, 0.5, 0.0])
    x = torch.ones(1)
    out = sampling.euler(lambda x, s, i: torch.full_like(x, 2.0), x, sigmas)
    assert out.item() == pytest.approx(1.0 + (-0.5) * 2 + (-0.5) * 2)


def test_noise_leaves_the_global_generator_alone():
    """Seeding torch's global generator (as ComfyUI does) would let a concurrent request's
    seeding change this request's noise; prepare_noise must use its own generator."""
    torch.manual_seed(123)
    before = torch.get_rng_state()
    sampling.prepare_noise((1, 16, 8, 8), 42)
    assert torch.equal(torch.get_rng_state(), before)


def comfy_reference_schedule(scheduler: str, shift: float, steps: int) -> np.ndarray:
    """The rest of ComfyUI's schedulers written out in float64 with numpy, from comfy/samplers.py
    (ddim, beta, linear_quadratic, kl_optimal) and k-diffusion's get_sigmas_karras and
    get_sigmas_exponential, independently of ryla's implementation."""
    from scipy import stats

    t = np.arange(1, 10001) / 10000.0
    table = math.exp(shift) / (math.exp(shift) + (1 / t - 1))
    sigma_min, sigma_max = float(np.float32(table[0])), float(np.float32(table[-1]))
    if scheduler == "karras":
        ramp = np.linspace(0, 1, steps)
        return np.append((sigma_max ** (1 / 7) + ramp * (sigma_min ** (1 / 7) - sigma_max ** (1 / 7))) ** 7, 0.0)
    if scheduler == "exponential":
        return np.append(np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), steps)), 0.0)
    if scheduler == "ddim_uniform":
        stride = 10000 // steps
        return np.array([table[i] for i in range(1, 10000, stride)][::-1] + [0.0])
    if scheduler == "beta":
        indices = np.rint(stats.beta.ppf(1 - np.linspace(0, 1, steps, endpoint=False), 0.6, 0.6) * 9999)
        kept = [int(i) for n, i in enumerate(indices) if n == 0 or i != indices[n - 1]]
        return np.array([table[i] for i in kept] + [0.0])
    if scheduler == "linear_quadratic":
        linear_steps, quadratic_steps = steps // 2, steps - steps // 2
        diff = linear_steps - 0.025 * steps
        a = diff / (linear_steps * quadratic_steps ** 2)
        b = 0.025 / linear_steps - 2 * diff / quadratic_steps ** 2
        c = a * linear_steps ** 2
        ramp = [i * 0.025 / linear_steps for i in range(linear_steps)] + \
               [a * i * i + b * i + c for i in range(linear_steps, steps)] + [1.0]
        return (1.0 - np.array(ramp)) * sigma_max
    if scheduler == "kl_optimal":
        position = np.arange(steps) / (steps - 1)
        return np.append(np.tan(position * math.atan(sigma_min) + (1 - position) * math.atan(sigma_max)), 0.0)
    raise ValueError(scheduler)


@pytest.mark.parametrize("scheduler", ["karras", "exponential", "ddim_uniform", "beta", "linear_quadratic",
                                       "kl_optimal"])
@pytest.mark.parametrize("steps", [4, 28, 50])
def test_every_comfyui_scheduler_matches_its_formula(scheduler, steps):
    shift = sampling.resolution_shift(1024, 1024)
    ours = sampling.calculate_sigmas(sampling.FluxModelSampling(shift), scheduler, steps).numpy()
    expected = comfy_reference_schedule(scheduler, shift, steps)
    assert ours.shape == expected.shape
    np.testing.assert_allclose(ours, expected, rtol=2e-5, atol=2e-6)
    assert ours[-1] == 0.0 and np.all(np.diff(ours) <= 0)  # descending to zero


def test_the_scheduler_list_is_comfyuis():
    from ryla import catalogue

    assert set(sampling.SCHEDULERS) == set(catalogue.SCHEDULER.choices) == {
        "simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal", "linear_quadratic",
        "kl_optimal"}


def toy_denoiser(x: np.ndarray, sigma: float) -> np.ndarray:
    """A smooth, nonlinear stand-in for a FLUX model's denoised prediction."""
    return np.tanh(x) * (1 - sigma) + 0.3 * np.sin(3 * x) * sigma


def comfy_reference_sample(sampler: str, x: np.ndarray, sigmas: np.ndarray) -> np.ndarray:
    """comfy/k_diffusion/sampling.py's sample_heun and sample_dpmpp_2m, in float64 on the toy
    denoiser, written from those functions (k-diffusion's to_d, t = -log sigma)."""
    def to_d(x, sigma, denoised):
        return (x - denoised) / sigma

    old_denoised = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = toy_denoiser(x, sigma)
        if sampler == "heun":
            d = to_d(x, sigma, denoised)
            dt = sigma_next - sigma
            if sigma_next == 0:
                x = x + d * dt
            else:
                x_2 = x + d * dt
                d_2 = to_d(x_2, sigma_next, toy_denoiser(x_2, sigma_next))
                x = x + (d + d_2) / 2 * dt
        elif sampler == "dpmpp_2m":
            t, t_next = -np.log(sigma), (-np.log(sigma_next) if sigma_next > 0 else np.inf)
            h = t_next - t
            if old_denoised is None or sigma_next == 0:
                x = (np.exp(-t_next) / np.exp(-t)) * x - np.expm1(-h) * denoised
            else:
                r = (t - (-np.log(sigmas[i - 1]))) / h
                x = (np.exp(-t_next) / np.exp(-t)) * x - np.expm1(-h) * (
                    (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised)
            old_denoised = denoised
    return x


@pytest.mark.parametrize("sampler", ["heun", "dpmpp_2m"])
@pytest.mark.parametrize("scheduler,steps", [("simple", 8), ("karras", 12), ("beta", 20)])
def test_samplers_give_comfyuis_latents_on_a_toy_model(sampler, scheduler, steps):
    sigmas = sampling.calculate_sigmas(sampling.FluxModelSampling(1.15), scheduler, steps)
    x0 = np.random.default_rng(3).standard_normal((1, 4, 6, 6))
    calls = []

    def velocity(x, sigma, step):
        calls.append(step)
        return (x - torch.from_numpy(toy_denoiser(x.numpy(), sigma))) / sigma

    ours = sampling.SAMPLERS[sampler](velocity, torch.from_numpy(x0.copy()), sigmas).numpy()
    expected = comfy_reference_sample(sampler, x0.copy(), sigmas.double().numpy())
    np.testing.assert_allclose(ours, expected, rtol=1e-9, atol=1e-9)
    # heun evaluates twice a step but once onto sigma 0, and at the schedule's own sigmas only
    assert len(calls) == (2 * steps - 1 if sampler == "heun" else steps)
    assert sorted(set(calls)) == list(range(steps))
