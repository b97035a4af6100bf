"""Sigmas and noise match ComfyUI (and diffusers where the two agree)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ryla.flux import samplers, sampling


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
    out = samplers.euler(samplers.FlowModel(lambda x, s, i: torch.full_like(x, 2.0)), x, sigmas)
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


class ComfyReference:
    """comfy/k_diffusion/sampling.py's samplers for a CONST (flow) model, transcribed into float64
    torch on the toy denoiser, independently of ryla.flux.samplers: the RF variants, to_d,
    get_ancestral_step, the half-log-SNR helpers, default_noise_sampler and
    BrownianTreeNoiseSampler as ComfyUI builds them."""

    def __init__(self, seed=5, shift=1.15, mask=None, latent=None, noise=None):
        self.seed, self.shift, self.calls = seed, shift, 0
        self.mask, self.latent, self.noise = mask, latent, noise

    def model(self, x, sigma):  # KSamplerX0Inpaint around the toy model
        self.calls += 1
        s = float(sigma)
        if self.mask is None:
            return torch.from_numpy(toy_denoiser(x.numpy(), s))
        keep = 1.0 - self.mask
        x = x * self.mask + (s * self.noise + (1 - s) * self.latent) * keep
        out = torch.from_numpy(toy_denoiser(x.numpy(), s))
        return out * self.mask + self.latent * keep

    @staticmethod
    def to_d(x, sigma, denoised):
        return (x - denoised) / sigma

    @staticmethod
    def ancestral_step(sigma_from, sigma_to, eta=1.0):
        if not eta:
            return sigma_to, 0.0
        sigma_up = min(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5)
        return (sigma_to ** 2 - sigma_up ** 2) ** 0.5, sigma_up

    def noise_sampler(self, x):
        generator = torch.Generator(device="cpu")
        generator.manual_seed(self.seed + 1)  # +1 on the CPU, as default_noise_sampler does
        return lambda sigma, sigma_next: torch.randn(x.size(), dtype=x.dtype, generator=generator)

    def brownian(self, x, sigmas):
        import torchsde

        t0, t1 = sigmas[sigmas > 0].min().float(), sigmas.max().float()
        tree = torchsde.BrownianTree(t0, torch.zeros_like(x), t1, entropy=self.seed)

        def sample(sigma, sigma_next):
            a, b = torch.as_tensor(float(sigma)).float(), torch.as_tensor(float(sigma_next)).float()
            lo, hi, sign = (a, b, 1) if a < b else (b, a, -1)
            return tree(lo, hi).to(torch.float32) * sign / (b - a).abs().sqrt()
        return sample

    def offset(self, sigmas):
        if sigmas[0] >= 1:
            sigmas = sigmas.clone()
            sigmas[0] = math.exp(self.shift) / (math.exp(self.shift) + (1 / (1.0 - 1e-4) - 1))
        return sigmas

    lam = staticmethod(lambda sigma: sigma.logit().neg())  # sigma_to_half_log_snr, CONST
    sig = staticmethod(lambda lam: lam.neg().sigmoid())  # half_log_snr_to_sigma, CONST

    def run(self, name, x, sigmas):
        return getattr(self, name)(x, sigmas)

    def heun(self, x, sigmas):
        for i in range(len(sigmas) - 1):
            denoised = self.model(x, sigmas[i])
            d = self.to_d(x, sigmas[i], denoised)
            dt = sigmas[i + 1] - sigmas[i]
            if sigmas[i + 1] == 0:
                x = x + d * dt
            else:
                x_2 = x + d * dt
                d_2 = self.to_d(x_2, sigmas[i + 1], self.model(x_2, sigmas[i + 1]))
                x = x + (d + d_2) / 2 * dt
        return x

    def dpmpp_2m(self, x, sigmas):
        old = None
        for i in range(len(sigmas) - 1):
            denoised = self.model(x, sigmas[i])
            t, t_next = -sigmas[i].log(), -sigmas[i + 1].log()
            h = t_next - t
            if old is None or sigmas[i + 1] == 0:
                x = (sigmas[i + 1] / sigmas[i]) * x - (-h).expm1() * denoised
            else:
                r = (t - (-sigmas[i - 1].log())) / h
                x = (sigmas[i + 1] / sigmas[i]) * x - (-h).expm1() * ((1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old)
            old = denoised
        return x

    def euler_ancestral(self, x, sigmas, eta=1.0):
        noise = self.noise_sampler(x)
        for i in range(len(sigmas) - 1):
            denoised = self.model(x, sigmas[i])
            if sigmas[i + 1] == 0:
                x = denoised
            else:
                sigma_down = sigmas[i + 1] * (1 + (sigmas[i + 1] / sigmas[i] - 1) * eta)
                alpha_ip1, alpha_down = 1 - sigmas[i + 1], 1 - sigma_down
                renoise = (sigmas[i + 1] ** 2 - sigma_down ** 2 * alpha_ip1 ** 2 / alpha_down ** 2) ** 0.5
                ratio = sigma_down / sigmas[i]
                x = ratio * x + (1 - ratio) * denoised
                x = (alpha_ip1 / alpha_down) * x + noise(sigmas[i], sigmas[i + 1]) * renoise
        return x

    def dpm_2(self, x, sigmas):
        for i in range(len(sigmas) - 1):
            d = self.to_d(x, sigmas[i], self.model(x, sigmas[i]))
            if sigmas[i + 1] == 0:
                x = x + d * (sigmas[i + 1] - sigmas[i])
            else:
                sigma_mid = sigmas[i].log().lerp(sigmas[i + 1].log(), 0.5).exp()
                x_2 = x + d * (sigma_mid - sigmas[i])
                x = x + self.to_d(x_2, sigma_mid, self.model(x_2, sigma_mid)) * (sigmas[i + 1] - sigmas[i])
        return x

    def dpm_2_ancestral(self, x, sigmas, eta=1.0):
        noise = self.noise_sampler(x)
        for i in range(len(sigmas) - 1):
            d = self.to_d(x, sigmas[i], self.model(x, sigmas[i]))
            sigma_down = sigmas[i + 1] * (1 + (sigmas[i + 1] / sigmas[i] - 1) * eta)
            alpha_ip1, alpha_down = 1 - sigmas[i + 1], 1 - sigma_down
            renoise = (sigmas[i + 1] ** 2 - sigma_down ** 2 * alpha_ip1 ** 2 / alpha_down ** 2) ** 0.5
            if sigma_down == 0:
                x = x + d * (sigma_down - sigmas[i])
            else:
                sigma_mid = sigmas[i].log().lerp(sigma_down.log(), 0.5).exp()
                x_2 = x + d * (sigma_mid - sigmas[i])
                x = x + self.to_d(x_2, sigma_mid, self.model(x_2, sigma_mid)) * (sigma_down - sigmas[i])
                x = (alpha_ip1 / alpha_down) * x + noise(sigmas[i], sigmas[i + 1]) * renoise
        return x

    def dpmpp_sde(self, x, sigmas, eta=1.0, r=0.5):
        noise = self.brownian(x, sigmas)
        sigmas = self.offset(sigmas)
        for i in range(len(sigmas) - 1):
            denoised = self.model(x, sigmas[i])
            if sigmas[i + 1] == 0:
                x = denoised
                continue
            lambda_s, lambda_t = self.lam(sigmas[i]), self.lam(sigmas[i + 1])
            h = lambda_t - lambda_s
            lambda_s_1 = lambda_s + r * h
            fac = 1 / (2 * r)
            sigma_s_1 = self.sig(lambda_s_1)
            alpha_s, alpha_s_1 = sigmas[i] * lambda_s.exp(), sigma_s_1 * lambda_s_1.exp()
            alpha_t = sigmas[i + 1] * lambda_t.exp()
            sd, su = self.ancestral_step(lambda_s.neg().exp(), lambda_s_1.neg().exp(), eta)
            h_ = sd.log().neg() - lambda_s
            x_2 = (alpha_s_1 / alpha_s) * (-h_).exp() * x - alpha_s_1 * (-h_).expm1() * denoised
            x_2 = x_2 + alpha_s_1 * noise(sigmas[i], sigma_s_1) * su
            denoised_2 = self.model(x_2, sigma_s_1)
            sd, su = self.ancestral_step(lambda_s.neg().exp(), lambda_t.neg().exp(), eta)
            h_ = sd.log().neg() - lambda_s
            denoised_d = (1 - fac) * denoised + fac * denoised_2
            x = (alpha_t / alpha_s) * (-h_).exp() * x - alpha_t * (-h_).expm1() * denoised_d
            x = x + alpha_t * noise(sigmas[i], sigmas[i + 1]) * su
        return x

    def dpmpp_2m_sde(self, x, sigmas, eta=1.0):
        noise = self.brownian(x, sigmas)
        sigmas = self.offset(sigmas)
        old, h, h_last = None, None, None
        for i in range(len(sigmas) - 1):
            denoised = self.model(x, sigmas[i])
            if sigmas[i + 1] == 0:
                x = denoised
            else:
                lambda_s, lambda_t = self.lam(sigmas[i]), self.lam(sigmas[i + 1])
                h = lambda_t - lambda_s
                h_eta = h * (eta + 1)
                alpha_t = sigmas[i + 1] * lambda_t.exp()
                x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x + alpha_t * (-h_eta).expm1().neg() * denoised
                if old is not None:
                    x = x + 0.5 * alpha_t * (-h_eta).expm1().neg() * (1 / (h_last / h)) * (denoised - old)
                x = x + noise(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-2 * h * eta).expm1().neg().sqrt()
            old, h_last = denoised, h
        return x

    def dpmpp_3m_sde(self, x, sigmas, eta=1.0):
        noise = self.brownian(x, sigmas)
        sigmas = self.offset(sigmas)
        d_1 = d_2 = h = h_1 = h_2 = None
        for i in range(len(sigmas) - 1):
            denoised = self.model(x, sigmas[i])
            if sigmas[i + 1] == 0:
                x = denoised
            else:
                lambda_s, lambda_t = self.lam(sigmas[i]), self.lam(sigmas[i + 1])
                h = lambda_t - lambda_s
                h_eta = h * (eta + 1)
                alpha_t = sigmas[i + 1] * lambda_t.exp()
                x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x + alpha_t * (-h_eta).expm1().neg() * denoised
                if h_2 is not None:
                    r0, r1 = h_1 / h, h_2 / h
                    d1_0, d1_1 = (denoised - d_1) / r0, (d_1 - d_2) / r1
                    d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                    d2 = (d1_0 - d1_1) / (r0 + r1)
                    phi_2 = h_eta.neg().expm1() / h_eta + 1
                    x = x + (alpha_t * phi_2) * d1 - (alpha_t * (phi_2 / h_eta - 0.5)) * d2
                elif h_1 is not None:
                    phi_2 = h_eta.neg().expm1() / h_eta + 1
                    x = x + (alpha_t * phi_2) * ((denoised - d_1) / (h_1 / h))
                x = x + noise(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-2 * h * eta).expm1().neg().sqrt()
            d_1, d_2 = denoised, d_1
            h_1, h_2 = h, h_1
        return x

    def lcm(self, x, sigmas):
        noise = self.noise_sampler(x)
        for i in range(len(sigmas) - 1):
            x = self.model(x, sigmas[i])
            if sigmas[i + 1] > 0:
                x = sigmas[i + 1] * noise(sigmas[i], sigmas[i + 1]) + (1.0 - sigmas[i + 1]) * x
        return x

    def ipndm(self, x, sigmas, max_order=4):
        buffer = []
        for i in range(len(sigmas) - 1):
            t_cur, t_next = sigmas[i], sigmas[i + 1]
            denoised = self.model(x, t_cur)
            d_cur = (x - denoised) / t_cur
            order = min(max_order, i + 1)
            if t_next == 0:
                x = denoised
            elif order == 1:
                x = x + (t_next - t_cur) * d_cur
            elif order == 2:
                x = x + (t_next - t_cur) * (3 * d_cur - buffer[-1]) / 2
            elif order == 3:
                x = x + (t_next - t_cur) * (23 * d_cur - 16 * buffer[-1] + 5 * buffer[-2]) / 12
            else:
                x = x + (t_next - t_cur) * (55 * d_cur - 59 * buffer[-1] + 37 * buffer[-2] - 9 * buffer[-3]) / 24
            if len(buffer) == max_order - 1:
                for k in range(max_order - 2):
                    buffer[k] = buffer[k + 1]
                buffer[-1] = d_cur
            else:
                buffer.append(d_cur)
        return x

    def res_multistep(self, x, sigmas, eta=0.0):
        noise = self.noise_sampler(x)
        old, old_sigma_down = None, None
        for i in range(len(sigmas) - 1):
            denoised = self.model(x, sigmas[i])
            sigma_down, sigma_up = self.ancestral_step(sigmas[i], sigmas[i + 1], eta)
            if sigma_down == 0 or old is None:
                x = x + self.to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
            else:
                t, t_old, t_next, t_prev = (-sigmas[i].log(), -old_sigma_down.log(), -sigma_down.log(),
                                            -sigmas[i - 1].log())
                h = t_next - t
                c2 = (t_prev - t_old) / h
                phi1 = torch.expm1(-h) / -h
                phi2 = (phi1 - 1.0) / -h
                b1 = torch.nan_to_num(phi1 - phi2 / c2, nan=0.0)
                b2 = torch.nan_to_num(phi2 / c2, nan=0.0)
                x = (-h).exp() * x + h * (b1 * denoised + b2 * old)
            if sigmas[i + 1] > 0 and sigma_up:
                x = x + noise(sigmas[i], sigmas[i + 1]) * sigma_up
            old, old_sigma_down = denoised, sigma_down
        return x

    @staticmethod
    def deis_coefficients(sigmas32, max_order=3, n=10000):
        """deis.py get_deis_coeff_list ("tab"): edm2t, the integrand by autograd, Lagrange
        polynomials, a sum over n points, in float32 as there."""
        eps, smin, smax = 1e-3, torch.tensor(0.002), torch.tensor(80.0)
        beta_d = 2 * (torch.log(smin ** 2 + 1) / eps - torch.log(smax ** 2 + 1)) / (eps - 1)
        beta_min = torch.log(smax ** 2 + 1) - 0.5 * beta_d
        t = ((beta_min ** 2 + 2 * beta_d * (sigmas32 ** 2 + 1).log()).sqrt() - beta_min) / beta_d
        b0, b1 = beta_min, beta_d + beta_min
        out = []
        for i in range(len(t) - 1):
            order = min(i + 1, max_order)
            if order == 1:
                out.append([])
                continue
            with torch.inference_mode(False), torch.enable_grad():
                taus = torch.linspace(float(t[i]), float(t[i + 1]), n).requires_grad_(True)
                alpha = torch.exp(-0.5 * taus ** 2 * (b1 - b0) - taus * b0)
                alpha.log().sum().backward()
                grad = taus.grad
            taus = taus.detach()
            alpha = alpha.detach()
            integrand = -0.5 * grad / torch.sqrt(alpha * (1 - alpha))
            prev = t[[i - k for k in range(order)]]
            row = []
            for j in range(order):
                poly = 1
                for k in range(order):
                    if k != j:
                        poly = poly * (taus - prev[k]) / (prev[j] - prev[k])
                row.append(float(torch.sum(integrand * poly) * ((t[i + 1] - t[i]) / n)))
            out.append(row)
        return out

    def deis(self, x, sigmas, max_order=3):
        coeffs = self.deis_coefficients(sigmas.float(), max_order)
        buffer = []
        for i in range(len(sigmas) - 1):
            t_cur, t_next = sigmas[i], sigmas[i + 1]
            denoised = self.model(x, t_cur)
            d_cur = (x - denoised) / t_cur
            order = min(max_order, i + 1)
            if t_next <= 0:
                order = 1
            if order == 1:
                x = x + (t_next - t_cur) * d_cur
            elif order == 2:
                x = x + coeffs[i][0] * d_cur + coeffs[i][1] * buffer[-1]
            else:
                x = x + coeffs[i][0] * d_cur + coeffs[i][1] * buffer[-1] + coeffs[i][2] * buffer[-2]
            if len(buffer) == max_order - 1:
                for k in range(max_order - 2):
                    buffer[k] = buffer[k + 1]
                buffer[-1] = d_cur
            else:
                buffer.append(d_cur)
        return x

    def res_multistep_ancestral(self, x, sigmas):
        return self.res_multistep(x, sigmas, eta=1.0)


REFERENCE_SAMPLERS = ["heun", "dpmpp_2m", "euler_ancestral", "dpm_2", "dpm_2_ancestral", "dpmpp_sde", "dpmpp_2m_sde",
                      "dpmpp_3m_sde", "lcm", "ipndm", "deis", "res_multistep", "res_multistep_ancestral"]
# The Brownian-tree samplers draw float32 noise (BatchedBrownianTree casts to the sigmas' dtype);
# DEIS's coefficients are float32 sums (its integrand's derivative here by autograd, there in
# closed form).
LOOSER = {"dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde", "deis"}


def flow_velocity(calls):
    def velocity(x, sigma, step):
        calls.append(step)
        return (x - torch.from_numpy(toy_denoiser(x.numpy(), sigma))) / sigma
    return velocity


@pytest.mark.parametrize("sampler", REFERENCE_SAMPLERS)
@pytest.mark.parametrize("scheduler,steps", [("simple", 8), ("karras", 12), ("beta", 20)])
def test_samplers_give_comfyuis_latents_on_a_toy_model(sampler, scheduler, steps):
    sigmas = sampling.calculate_sigmas(sampling.FluxModelSampling(1.15), scheduler, steps)
    x0 = np.random.default_rng(3).standard_normal((1, 4, 6, 6))
    calls = []
    model = samplers.FlowModel(flow_velocity(calls), seed=5)
    ours = samplers.SAMPLERS[sampler](model, torch.from_numpy(x0.copy()), sigmas).numpy()
    reference = ComfyReference(seed=5)
    expected = reference.run(sampler, torch.from_numpy(x0.copy()), sigmas.double()).numpy()
    tolerance = 1e-6 if sampler in LOOSER else 1e-9
    np.testing.assert_allclose(ours, expected, rtol=tolerance, atol=tolerance)
    assert len(calls) == reference.calls  # the same number of model evaluations
    if sampler == "heun":  # twice a step, once onto sigma 0, at the schedule's own sigmas only
        assert len(calls) == 2 * steps - 1 and sorted(set(calls)) == list(range(steps))


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "euler_ancestral"])
def test_inpainting_mask_is_comfyuis_ksampler_x0_inpaint(sampler):
    sigmas = sampling.calculate_sigmas(sampling.FluxModelSampling(1.15), "simple", 6)
    rng = np.random.default_rng(4)
    x0 = torch.from_numpy(rng.standard_normal((1, 4, 6, 6)))
    latent = torch.from_numpy(rng.standard_normal((1, 4, 6, 6)))
    mask = torch.zeros(1, 4, 6, 6, dtype=torch.float64)
    mask[..., 2:5, 1:4] = 1.0
    model = samplers.FlowModel(flow_velocity([]), seed=5, denoise_mask=mask, latent=latent, noise=x0)
    ours = samplers.SAMPLERS[sampler](model, x0.clone(), sigmas).numpy()
    reference = ComfyReference(seed=5, mask=mask, latent=latent, noise=x0)
    if sampler == "euler":
        x = x0.clone()
        s = sigmas.double()
        for i in range(len(s) - 1):
            x = x + reference.to_d(x, s[i], reference.model(x, s[i])) * (s[i + 1] - s[i])
        expected = x.numpy()
    else:
        expected = reference.run(sampler, x0.clone(), sigmas.double()).numpy()
    np.testing.assert_allclose(ours, expected, rtol=1e-9, atol=1e-9)
    # Outside the mask the result is the input latent, exactly where the last step lands on it.
    np.testing.assert_allclose(ours[..., 0, :], latent.numpy()[..., 0, :], atol=1e-9)
