"""The sampling loop, the multistep ODE/SDE solvers (DPM-Solver++, UniPC) and their step schedules.

Every sampler is a *step function* ``step(x, k, noise_sampler) -> dict(sample, pred_xstart)`` walked by one
loop, ``sample_loop_progressive``, from step ``K-1`` (the noisiest) down to ``0``; after step 0 the sample is
clean. Ancestral DDPM and DDIM are ``GaussianDiffusion.p_sample`` / ``ddim_sample`` wrapped as step
functions; the multistep solvers keep their history of x_0 predictions inside the closure that
``multistep_step_fn`` returns (state lives for one sampling call only). ``GaussianDiffusion.step_fn(method, ...)``
is the one place a method name becomes a step function (``SOLVERS`` below for the multistep ones). A new solver
is one more step function over a ``denoise(x, k) -> x_0`` callable and the process's alpha-bar table.

Discrete time. A sampler walks a (respaced) ``GaussianDiffusion`` whose K kept steps are integer steps of
the original T-step process (``space_timesteps`` or one of ``SOLVER_SCHEDULES`` below): the network always
sees original-process integer t, and the solvers use alpha-bar at exactly those t. Non-integer times are
never used: the logSNR-uniform and Karras schedules are rounded to integer steps (as diffusers does), and
the solvers then take alpha-bar *of the rounded step*, so the network and the solver agree on the noise level
(diffusers keeps the unrounded sigma in the solver). Rounded steps are made strictly decreasing (a
collision moves the higher step up by one), so ``steps`` is always the number of network calls (NFE).

In data-prediction (x_0) form with alpha_k = sqrt(alpha_bar_k), sigma_k = sqrt(1 - alpha_bar_k),
lambda_k = log(alpha_k / sigma_k) and h = lambda_next - lambda_k, the first-order update is
x_next = (sigma_next / sigma_k) x - alpha_next (e^{-h} - 1) x_0, i.e. DDIM(eta=0). The last step goes to
the clean image (sigma = 0, lambda = +inf) and is always first order: it returns the x_0 prediction.

Pure torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Literal

import torch

from ..config.choices import CORRECTORS, SOLVER_SCHEDULES
from .noise import NoiseSampler

StepFn = Callable[[torch.Tensor, int, NoiseSampler], dict]
Denoiser = Callable[[torch.Tensor, int], torch.Tensor]

Schedule = Literal["uniform", "logsnr", "karras", "trailing"]
Corrector = Literal["none", "unipc"]
KARRAS_RHO = 7.0
LOWER_ORDER_FINAL_BELOW = 15  # diffusers' rule: lower_order_final acts below this many steps
# sampling method -> (order, sde, corrector) of its multistep solver (``GaussianDiffusion.step_fn``);
# unipc = DPM-Solver++(2M) (= UniP-2) + UniC(bh2)
SOLVERS: dict[str, tuple[int, bool, Corrector]] = {
    "dpm++2m": (2, False, "none"), "dpm++3m": (3, False, "none"), "dpm++2m-sde": (2, True, "none"),
    "unipc": (2, False, "unipc")}


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; allowed: {', '.join(allowed)}")


# ----------------------------------------------------------------------------- the loop
def sample_loop_progressive(step: StepFn, x: torch.Tensor, num_steps: int, noise_sampler: NoiseSampler,
                            progress: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """The one sampling loop: ``out = step(x, k, noise_sampler)`` for k = K-1 .. 0, yielding every ``out``."""
    for k in _progress(range(num_steps - 1, -1, -1), progress):
        out = step(x, k, noise_sampler)
        yield out
        x = out["sample"]


def _progress(steps, progress: bool):
    if not progress:
        return steps
    from rich.progress import track  # optional dependency of the CLI, not of the math

    return track(steps, description="sampling", transient=True)


# ----------------------------------------------------------------------------- step schedules
def solver_timesteps(alphas_cumprod: torch.Tensor, steps: int, schedule: Schedule = "uniform") -> list[int]:
    """``steps`` distinct original-process steps (ascending) of a T-step process, by ``schedule``.

    * ``uniform``: t uniform in [0, T-1]: ``round(linspace(0, T-1, steps + 1))`` without the 0 (diffusers'
      ``linspace`` spacing), from T-1 down to about T / steps.
    * ``trailing``: ``round(arange(T, 0, -T / steps)) - 1``: starts at T-1, ends at T / steps - 1.
    * ``logsnr``: lambda = log(alpha / sigma) uniform between lambda(T-1) and lambda(0), rounded to steps.
    * ``karras``: Karras et al.'s rho=7 spacing of sigma = sqrt((1 - alpha_bar) / alpha_bar) between
      sigma(0) and sigma(T-1), rounded to steps (diffusers' ``use_karras_sigmas``).

    Rounding by linear interpolation of log sigma over the table, then collisions resolved upwards.
    """
    _check_choice("schedule", schedule, SOLVER_SCHEDULES)
    ab = torch.as_tensor(alphas_cumprod, dtype=torch.float64).cpu()
    total = int(ab.numel())
    steps = int(steps)
    if not 2 <= steps <= total:
        raise ValueError(f"a {schedule} schedule needs 2 <= steps <= T = {total}, got {steps}")
    if schedule == "uniform":
        times = torch.linspace(0, total - 1, steps + 1, dtype=torch.float64).round().flip(0)[:-1]
    elif schedule == "trailing":
        times = torch.arange(total, 0, -total / steps, dtype=torch.float64).round() - 1
    else:
        log_sigmas = 0.5 * (torch.log1p(-ab) - torch.log(ab))  # increasing in t
        lo, hi = float(log_sigmas[0]), float(log_sigmas[-1])
        ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
        if schedule == "logsnr":
            targets = hi + ramp * (lo - hi)
        else:
            inv_rho = 1.0 / KARRAS_RHO
            smax, smin = math.exp(hi) ** inv_rho, math.exp(lo) ** inv_rho
            targets = ((smax + ramp * (smin - smax)) ** KARRAS_RHO).log()
        times = _log_sigma_to_t(targets, log_sigmas).round()
    return _distinct_descending(times.long().tolist(), total)[::-1]


def _log_sigma_to_t(targets: torch.Tensor, log_sigmas: torch.Tensor) -> torch.Tensor:
    """Fractional steps whose log sigma, linearly interpolated over the table, is ``targets``."""
    hi = torch.searchsorted(log_sigmas, targets.clamp(log_sigmas[0], log_sigmas[-1])).clamp(1, log_sigmas.numel() - 1)
    lo = hi - 1
    w = ((targets - log_sigmas[lo]) / (log_sigmas[hi] - log_sigmas[lo])).clamp(0, 1)
    return lo.double() + w


def _distinct_descending(times: list[int], total: int) -> list[int]:
    times = [min(max(int(t), 0), total - 1) for t in times]
    for j in range(len(times) - 2, -1, -1):  # from the clean end up: each step above the next one
        times[j] = max(times[j], times[j + 1] + 1)
    for j in range(len(times)):  # then keep the top within T-1
        times[j] = min(times[j], total - 1 - j)
    return times


# ----------------------------------------------------------------------------- multistep solvers
def multistep_step_fn(denoise: Denoiser, alphas_cumprod: torch.Tensor, order: int = 2, sde: bool = False,
                      corrector: Corrector = "none", lower_order_final: bool = True) -> StepFn:
    """DPM-Solver++ (data prediction, multistep, midpoint form) as a step function; optional UniC corrector.

    Args:
        denoise: ``denoise(x, k)``: the (clipped, guided) x_0 prediction at step k of the process.
        alphas_cumprod: the process's alpha-bar table [K] (float64), step k's noise level.
        order: 1, 2 or 3 (DPM-Solver++(2M) / (3M)); the first steps warm up with lower orders.
        sde: SDE-DPM-Solver++ (orders 1 and 2): the update adds fresh ``noise_sampler`` noise each step.
        corrector: ``unipc``: after each new x_0 prediction, correct the current sample with UniC (B(h) =
            e^h - 1, "bh2") before the next predictor step (the prediction is not re-evaluated). With order 2
            the predictor equals UniP-2, so this is UniPC(bh2, order 2).
        lower_order_final: with fewer than 15 steps, the second-to-last step uses order <= 2 (diffusers'
            rule). The final step (to sigma = 0) is first order in any case.
    """
    if order not in (1, 2, 3):
        raise ValueError(f"solver order must be 1, 2 or 3, got {order}")
    _check_choice("corrector", corrector, CORRECTORS)
    if sde and order > 2:
        raise ValueError("SDE-DPM-Solver++ supports orders 1 and 2")
    if sde and corrector != "none":
        raise ValueError("the UniPC corrector applies to the ODE solvers only (sde=False)")
    ab = torch.as_tensor(alphas_cumprod, dtype=torch.float64).cpu()
    num_steps = int(ab.numel())
    alpha = ab.sqrt().tolist()
    sigma = (1.0 - ab).sqrt().tolist()
    lam = [math.log(a) - math.log(s) for a, s in zip(alpha, sigma, strict=True)]
    history: list[tuple[int, torch.Tensor]] = []  # (k, x_0 prediction), newest last
    state: dict = {"last_x": None, "last_order": 1}

    def step(x: torch.Tensor, k: int, noise_sampler: NoiseSampler) -> dict[str, torch.Tensor]:
        index = num_steps - 1 - k  # 0 for the first (noisiest) step
        if index == 0:  # a new loop: forget any previous one's history
            history.clear()
        x0 = denoise(x, k)
        if corrector == "unipc" and history:
            x = _unic_bh2(x0, state["last_x"], history, k, lam, alpha, sigma, state["last_order"])
        history.append((k, x0))
        del history[:-3]
        state["last_x"] = x
        if k == 0:  # to the clean image: first order with sigma = 0 gives the x_0 prediction
            return {"sample": x0, "pred_xstart": x0}
        this_order = min(order, index + 1)
        if lower_order_final and num_steps < LOWER_ORDER_FINAL_BELOW and k == 1:
            this_order = min(this_order, 2)
        state["last_order"] = this_order
        sample = _dpmpp_update(x, history, k, lam, alpha, sigma, this_order, sde, noise_sampler)
        return {"sample": sample, "pred_xstart": x0}

    return step


def _dpmpp_update(x, history, k, lam, alpha, sigma, order, sde, noise_sampler):
    """DPM-Solver++ from step k to step k-1 (Lu et al. 2022, multistep, midpoint form)."""
    s = k - 1
    h = lam[s] - lam[k]
    m0 = history[-1][1]
    if sde:
        coef_x, coef_d = sigma[s] / sigma[k] * math.exp(-h), alpha[s] * -math.expm1(-2.0 * h)
    else:
        coef_x, coef_d = sigma[s] / sigma[k], alpha[s] * -math.expm1(-h)
    if order == 1:
        out = coef_x * x + coef_d * m0
    else:
        k1, m1 = history[-2]
        r0 = (lam[k] - lam[k1]) / h
        d1_0 = (m0 - m1) / r0
        if order == 2:
            out = coef_x * x + coef_d * m0 + 0.5 * coef_d * d1_0
        else:
            k2, m2 = history[-3]
            r1 = (lam[k1] - lam[k2]) / h
            d1_1 = (m1 - m2) / r1
            d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            phi = math.expm1(-h)  # e^{-h} - 1
            out = (coef_x * x + coef_d * m0 + alpha[s] * (phi / h + 1.0) * d1
                   - alpha[s] * ((phi + h) / h ** 2 - 0.5) * d2)
    if sde:
        out = out + sigma[s] * math.sqrt(-math.expm1(-2.0 * h)) * noise_sampler(x)
    return out


def _unic_bh2(x0_new, last_x, history, k, lam, alpha, sigma, order):
    """UniC (Zhao et al. 2023), B(h) = e^h - 1: correct the sample at step k from the previous step's input
    ``last_x`` and x_0 predictions (``history``: ..., step k+1's, and ``x0_new`` at step k)."""
    prev_k, m0 = history[-1]
    h = lam[k] - lam[prev_k]
    hh = -h
    h_phi_1 = math.expm1(hh)
    b_h = h_phi_1
    rks, d1s = [], []
    for j in range(1, order):
        kj, mj = history[-(j + 1)]
        rk = (lam[kj] - lam[prev_k]) / h
        rks.append(rk)
        d1s.append((mj - m0) / rk)
    rks.append(1.0)
    if order == 1:
        rhos = [0.5]
    else:
        rows, rhs = [], []
        h_phi_k, factorial = h_phi_1 / hh - 1.0, 1
        for i in range(1, order + 1):
            rows.append([rk ** (i - 1) for rk in rks])
            rhs.append(h_phi_k * factorial / b_h)
            factorial *= i + 1
            h_phi_k = h_phi_k / hh - 1.0 / factorial
        rhos = torch.linalg.solve(torch.tensor(rows, dtype=torch.float64),
                                  torch.tensor(rhs, dtype=torch.float64)).tolist()
    correction = rhos[-1] * (x0_new - m0)
    for rho, d1 in zip(rhos[:-1], d1s, strict=True):
        correction = correction + rho * d1
    return sigma[k] / sigma[prev_k] * last_x - alpha[k] * h_phi_1 * m0 - alpha[k] * b_h * correction
