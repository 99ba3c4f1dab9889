"""Gaussian diffusion: forward process q, reverse process p_theta, losses, likelihood and samplers.

Pure torch. Follows the public names of OpenAI's reference code (``q_sample``, ``p_mean_variance``,
``training_losses``, ...). All schedule tables are float64 and are cast to the input's device and dtype
only when gathered, so that respaced and DDIM steps lose no precision.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal

import torch

from ..config.choices import LOSS_TYPES, MEAN_TYPES, SAMPLE_METHODS, VAR_TYPES
from .likelihood import discretized_gaussian_log_likelihood, mean_flat, normal_kl
from .noise import NoiseSampler, generator_noise
from .noise_assignment import assign_noise, perturb_noise
from .samplers import SOLVERS, Corrector, StepFn, multistep_step_fn, sample_loop_progressive
from .schedules import respace_betas
from .weighting import LOSS_WEIGHTINGS, loss_weight, snr_from_alphas_cumprod

MeanType = Literal["eps", "x0", "v"]
VarType = Literal["fixed_small", "fixed_large", "learned", "learned_range"]
LossType = Literal["simple", "hybrid", "vlb"]


Model = Callable[..., torch.Tensor]
CondFn = Callable[..., torch.Tensor]


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; allowed: {', '.join(allowed)}")


class GaussianDiffusion:
    """A (possibly respaced) Gaussian diffusion process over ``K`` steps.

    Args:
        betas: float tensor [T] of the original process.
        mean_type: what the network predicts: ``eps`` (noise), ``x0`` (clean image) or ``v``
            (velocity sqrt(alpha_bar) * eps - sqrt(1 - alpha_bar) * x0).
        var_type: ``fixed_small`` (posterior beta-tilde), ``fixed_large`` (beta), ``learned`` (log-variance
            output) or ``learned_range`` (Improved DDPM: interpolation in [-1, 1] between log beta-tilde
            and log beta). Learned variances need a network with 2C output channels.
        loss_type: ``simple`` (unweighted MSE on the target), ``hybrid`` (simple + lambda * K * L_t with a
            stop-gradient on the mean) or ``vlb`` (the per-step VLB term L_t in bits/dim).
        hybrid_lambda: lambda of the hybrid loss (Improved DDPM: 0.001).
        rescale_vlb: with ``vlb``, multiply L_t by K so it estimates the whole bound.
        use_timesteps: original steps to keep (see ``space_timesteps``); the model still sees them.
        loss_weighting: weight on the target's MSE per step (``diffusion/weighting.py``): ``none``,
            ``min_snr`` (Min-SNR-gamma, Hang et al. 2023) or ``p2`` (Choi et al. 2022), each the same
            x0-weighting whatever ``mean_type`` is.
        min_snr_gamma: gamma of ``min_snr`` (the paper's default 5).
        p2_k, p2_gamma: k and gamma of ``p2``'s 1 / (k + SNR)^gamma on the eps loss (paper: 1 and 1).
        input_perturbation: DDPM-IP's gamma (Ning et al. 2023, 0.1 in the paper): x_t is built from
            eps + gamma * xi while the target stays eps (or the v / x0 built without xi). 0 is off.
        immiscible: reassign the batch's noises to its images by a linear assignment on their distances
            (Li et al. 2024) before q_sample.
        The last three only touch the noise ``training_losses`` draws itself; a caller's ``noise=`` is used
        as given (validation keeps an unbiased bound).
    """

    def __init__(
        self,
        betas: torch.Tensor | Iterable[float],
        mean_type: MeanType = "eps",
        var_type: VarType = "fixed_small",
        loss_type: LossType = "simple",
        hybrid_lambda: float = 0.001,
        rescale_vlb: bool = False,
        use_timesteps: Iterable[int] | None = None,
        loss_weighting: str = "none",
        min_snr_gamma: float = 5.0,
        p2_k: float = 1.0,
        p2_gamma: float = 1.0,
        input_perturbation: float = 0.0,
        immiscible: bool = False,
    ) -> None:
        _check_choice("mean_type", mean_type, MEAN_TYPES)
        _check_choice("var_type", var_type, VAR_TYPES)
        _check_choice("loss_type", loss_type, LOSS_TYPES)
        self._set_training_levers(loss_weighting, min_snr_gamma, p2_k, p2_gamma, input_perturbation, immiscible,
                                  loss_type)
        betas = torch.as_tensor(betas, dtype=torch.float64).detach().cpu()
        if betas.ndim != 1 or betas.numel() < 2:
            raise ValueError(f"betas must be a 1-D tensor with at least 2 steps, got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must lie in (0, 1]")
        if hybrid_lambda < 0:
            raise ValueError(f"hybrid_lambda must be >= 0, got {hybrid_lambda}")
        self.mean_type = mean_type
        self.var_type = var_type
        self.loss_type = loss_type
        self.hybrid_lambda = float(hybrid_lambda)
        self.rescale_vlb = bool(rescale_vlb)
        self.original_num_timesteps = int(betas.numel())
        self.original_betas = betas
        self.use_timesteps = None if use_timesteps is None else sorted({int(k) for k in use_timesteps})

        if use_timesteps is None:
            self.timestep_map = torch.arange(betas.numel(), dtype=torch.int64)
            self._respaced = False
        else:
            betas, self.timestep_map = respace_betas(betas, use_timesteps)
            self._respaced = True
            if betas.numel() < 2:
                raise ValueError("a respaced process needs at least 2 kept steps")
        self.betas = betas
        self.num_timesteps = int(betas.numel())
        self._build_tables()
        self._cache: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}

    def respace(self, section_counts: str | int | Iterable[int] | None,
                timesteps: Iterable[int] | None = None) -> GaussianDiffusion:
        """The same model's process restricted to ``space_timesteps(T, section_counts)`` (None: all steps),
        or to the given original-process ``timesteps``."""
        from .schedules import space_timesteps

        if timesteps is not None:
            keep = timesteps
        else:
            keep = None if section_counts in (None, "", 0) else space_timesteps(self.original_num_timesteps,
                                                                                section_counts)
        return GaussianDiffusion(self.original_betas, mean_type=self.mean_type, var_type=self.var_type,
                                 loss_type=self.loss_type, hybrid_lambda=self.hybrid_lambda,
                                 rescale_vlb=self.rescale_vlb, use_timesteps=keep, **self.training_levers)

    # ------------------------------------------------------------------ tables
    def _build_tables(self) -> None:
        b = self.betas
        alphas = 1.0 - b
        ac = torch.cumprod(alphas, dim=0)
        ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
        ac_next = torch.cat([ac[1:], torch.zeros(1, dtype=torch.float64)])
        self.alphas_cumprod = ac
        self.alphas_cumprod_prev = ac_prev
        self.alphas_cumprod_next = ac_next
        self.sqrt_alphas_cumprod = ac.sqrt()
        self.sqrt_alphas_cumprod_prev = ac_prev.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - ac).sqrt()
        self.sqrt_one_minus_alphas_cumprod_prev = (1.0 - ac_prev).sqrt()
        self.log_one_minus_alphas_cumprod = torch.log(1.0 - ac)
        self.sqrt_recip_alphas_cumprod = (1.0 / ac).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / ac - 1.0).sqrt()
        self.posterior_variance = b * (1.0 - ac_prev) / (1.0 - ac)
        # beta-tilde_0 is 0: use the t=1 value at t=0 so the log is finite (as the reference code does).
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]]))
        self.posterior_mean_coef1 = b * ac_prev.sqrt() / (1.0 - ac)
        self.posterior_mean_coef2 = (1.0 - ac_prev) * alphas.sqrt() / (1.0 - ac)
        # fixed_large: beta_t, with beta-tilde_1 at t=0 (the decoder needs a non-degenerate variance).
        self.large_variance = torch.cat([self.posterior_variance[1:2], b[1:]])
        self.large_log_variance = torch.log(self.large_variance)
        self.log_betas = torch.log(b)
        # DDIM: sigma_t(eta) = eta * ddim_sigma_unit; precomputed in float64.
        self.ddim_sigma_unit = ((1.0 - ac_prev) / (1.0 - ac) * (1.0 - ac / ac_prev)).sqrt()

    def _table(self, name: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (name, device, dtype)
        table = self._cache.get(key)
        if table is None:
            table = getattr(self, name).to(device=device, dtype=dtype)
            self._cache[key] = table
        return table

    def _extract(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Gather ``name[t]`` cast to ``like``'s device/dtype, shaped to broadcast against ``like``."""
        values = self._table(name, like.device, like.dtype)[t]
        return values.reshape(t.shape[0], *([1] * (like.ndim - 1)))

    def _extract64(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """Gather ``name[t]`` in float64 where the device supports it (for coefficients built per step)."""
        dtype = torch.float32 if t.device.type == "mps" else torch.float64
        return self._table(name, t.device, dtype)[t]

    @staticmethod
    def _broadcast(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return values.to(like.dtype).reshape(values.shape[0], *([1] * (like.ndim - 1)))

    def _check_t(self, t: torch.Tensor, batch: int) -> None:
        if t.ndim != 1 or t.shape[0] != batch:
            raise ValueError(f"t must be a 1-D tensor of length {batch}, got shape {tuple(t.shape)}")
        if t.dtype.is_floating_point:
            raise ValueError(f"t must be an integer tensor of step indices, got {t.dtype}")
        # Checked on CPU only: on an accelerator this would force a host-device sync every step.
        if t.device.type == "cpu" and t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_timesteps):
            raise ValueError(f"timesteps must lie in [0, {self.num_timesteps - 1}] for this "
                             f"{self.num_timesteps}-step process, got {int(t.min())}..{int(t.max())}")

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The original-process step the network sees for step ``t`` of this (respaced) process."""
        if not self._respaced:
            return t
        return self._table("timestep_map", t.device, torch.int64)[t]

    # ------------------------------------------------------------------ forward process q
    def q_mean_variance(self, x_start: torch.Tensor, t: torch.Tensor):
        """Mean, variance and log-variance of q(x_t | x_0)."""
        mean = self._extract("sqrt_alphas_cumprod", t, x_start) * x_start
        variance = self._extract("sqrt_one_minus_alphas_cumprod", t, x_start) ** 2
        log_variance = self._extract("log_one_minus_alphas_cumprod", t, x_start)
        return mean, variance.expand_as(x_start), log_variance.expand_as(x_start)

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0) = N(sqrt(alpha_bar) x_0, (1 - alpha_bar) I)."""
        self._check_t(t, x_start.shape[0])
        if noise is None:
            noise = torch.randn(x_start.shape, generator=generator, device=x_start.device, dtype=x_start.dtype)
        elif noise.shape != x_start.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} differs from x_start {tuple(x_start.shape)}")
        return (self._extract("sqrt_alphas_cumprod", t, x_start) * x_start
                + self._extract("sqrt_one_minus_alphas_cumprod", t, x_start) * noise)

    def q_posterior_mean_variance(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        if x_start.shape != x_t.shape:
            raise ValueError(f"x_start {tuple(x_start.shape)} and x_t {tuple(x_t.shape)} differ in shape")
        mean = (self._extract("posterior_mean_coef1", t, x_t) * x_start
                + self._extract("posterior_mean_coef2", t, x_t) * x_t)
        variance = self._extract("posterior_variance", t, x_t).expand_as(x_t)
        log_variance = self._extract("posterior_log_variance_clipped", t, x_t).expand_as(x_t)
        return mean, variance, log_variance

    # ------------------------------------------------------------------ parameterisations
    def predict_xstart_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return (self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t
                - self._extract("sqrt_recipm1_alphas_cumprod", t, x_t) * eps)

    def predict_eps_from_xstart(self, x_t: torch.Tensor, t: torch.Tensor, pred_xstart: torch.Tensor) -> torch.Tensor:
        return ((self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t - pred_xstart)
                / self._extract("sqrt_recipm1_alphas_cumprod", t, x_t))

    def predict_xstart_from_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return (self._extract("sqrt_alphas_cumprod", t, x_t) * x_t
                - self._extract("sqrt_one_minus_alphas_cumprod", t, x_t) * v)

    def get_v(self, x_start: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Velocity target sqrt(alpha_bar) * eps - sqrt(1 - alpha_bar) * x_0."""
        return (self._extract("sqrt_alphas_cumprod", t, x_start) * noise
                - self._extract("sqrt_one_minus_alphas_cumprod", t, x_start) * x_start)

    # ------------------------------------------------------------------ reverse process p
    def _split_output(self, model_output: torch.Tensor, x: torch.Tensor):
        channels = x.shape[1]
        if self.var_type in ("learned", "learned_range"):
            if model_output.shape[1] != 2 * channels:
                raise ValueError(f"var_type {self.var_type!r} needs a model with 2*C = {2 * channels} output "
                                 f"channels (prediction and variance), got {model_output.shape[1]}")
            return model_output[:, :channels], model_output[:, channels:]
        if model_output.shape[1] != channels:
            raise ValueError(f"var_type {self.var_type!r} needs a model with C = {channels} output channels, "
                             f"got {model_output.shape[1]}; use a learned var_type for 2*C outputs")
        return model_output, None

    def _variance(self, var_values: torch.Tensor | None, x: torch.Tensor, t: torch.Tensor):
        if self.var_type == "learned":
            return torch.exp(var_values), var_values
        if self.var_type == "learned_range":
            min_log = self._extract("posterior_log_variance_clipped", t, x)
            max_log = self._extract("log_betas", t, x)
            frac = (var_values + 1.0) / 2.0
            log_variance = frac * max_log + (1.0 - frac) * min_log
            return torch.exp(log_variance), log_variance
        name_var, name_log = (("posterior_variance", "posterior_log_variance_clipped")
                              if self.var_type == "fixed_small" else ("large_variance", "large_log_variance"))
        return (self._extract(name_var, t, x).expand_as(x), self._extract(name_log, t, x).expand_as(x))

    def _pred_xstart(self, prediction: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.mean_type == "eps":
            return self.predict_xstart_from_eps(x, t, prediction)
        if self.mean_type == "v":
            return self.predict_xstart_from_v(x, t, prediction)
        return prediction

    def p_mean_variance(self, model: Model, x: torch.Tensor, t: torch.Tensor, clip_denoised: bool = True,
                        model_kwargs: dict[str, Any] | None = None,
                        model_output: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Mean, variance, log-variance and predicted x_0 of p_theta(x_{t-1} | x_t).

        ``model_output`` lets a caller pass an output it already computed (the losses use it).
        """
        self._check_t(t, x.shape[0])
        if model_output is None:
            model_output = model(x, self.model_timesteps(t), **(model_kwargs or {}))
        model_output = model_output.to(x.dtype)
        prediction, var_values = self._split_output(model_output, x)
        variance, log_variance = self._variance(var_values, x, t)
        pred_xstart = self._pred_xstart(prediction, x, t)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1.0, 1.0)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_xstart": pred_xstart}

    # ------------------------------------------------------------------ guidance
    def condition_mean(self, cond_fn: CondFn, p_mean_var: dict[str, torch.Tensor], x: torch.Tensor,
                       t: torch.Tensor, model_kwargs: dict[str, Any] | None = None) -> torch.Tensor:
        """Classifier-guided mean mu + Sigma * grad log p(y | x_t) (Dhariwal & Nichol, Algorithm 1).

        ``cond_fn`` returns the gradient already multiplied by the guidance scale, or None: no guidance at this
        step (outside a guidance interval, ``guidance_schedule.scheduled_cond_fn``): the unguided mean itself.
        """
        gradient = cond_fn(x, self.model_timesteps(t), **(model_kwargs or {}))
        if gradient is None:
            return p_mean_var["mean"]
        return p_mean_var["mean"] + p_mean_var["variance"] * gradient.to(x.dtype)

    def condition_score(self, cond_fn: CondFn, p_mean_var: dict[str, torch.Tensor], x: torch.Tensor,
                        t: torch.Tensor, model_kwargs: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
        """Score-corrected prediction eps - sqrt(1 - alpha_bar) * grad (Algorithm 2, for DDIM); ``p_mean_var``
        itself where ``cond_fn`` returns None (no guidance at this step)."""
        gradient = cond_fn(x, self.model_timesteps(t), **(model_kwargs or {}))
        if gradient is None:
            return p_mean_var
        eps = self.predict_eps_from_xstart(x, t, p_mean_var["pred_xstart"])
        eps = eps - self._extract("sqrt_one_minus_alphas_cumprod", t, x) * gradient.to(x.dtype)
        out = dict(p_mean_var)
        out["pred_xstart"] = self.predict_xstart_from_eps(x, t, eps)
        out["mean"], _, _ = self.q_posterior_mean_variance(out["pred_xstart"], x, t)
        return out

    # ------------------------------------------------------------------ losses
    def _set_training_levers(self, loss_weighting: str, min_snr_gamma: float, p2_k: float, p2_gamma: float,
                             input_perturbation: float, immiscible: bool, loss_type: str) -> None:
        _check_choice("loss_weighting", loss_weighting, LOSS_WEIGHTINGS)
        if loss_weighting != "none" and loss_type == "vlb":
            raise ValueError(f"loss_weighting={loss_weighting!r} weights the MSE term, which loss_type='vlb' "
                             f"does not have; use loss_type simple or hybrid, or loss_weighting none")
        if min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma must be > 0, got {min_snr_gamma}")
        if p2_k < 0 or p2_gamma < 0:
            raise ValueError(f"p2_k and p2_gamma must be >= 0, got p2_k={p2_k}, p2_gamma={p2_gamma}")
        if input_perturbation < 0:
            raise ValueError(f"input_perturbation must be >= 0 (DDPM-IP uses 0.1), got {input_perturbation}")
        self.training_levers = {"loss_weighting": loss_weighting, "min_snr_gamma": float(min_snr_gamma),
                                "p2_k": float(p2_k), "p2_gamma": float(p2_gamma),
                                "input_perturbation": float(input_perturbation), "immiscible": bool(immiscible)}

    def loss_weights(self, t: torch.Tensor) -> torch.Tensor:
        """Per-example weight (float64) on the MSE of the configured target at steps ``t`` (ones: ``none``)."""
        levers = self.training_levers
        snr = snr_from_alphas_cumprod(self._extract64("alphas_cumprod", t))
        return loss_weight(snr, levers["loss_weighting"], self.mean_type, min_snr_gamma=levers["min_snr_gamma"],
                           p2_k=levers["p2_k"], p2_gamma=levers["p2_gamma"])

    def training_noise(self, x_start: torch.Tensor,
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(target noise, noise fed to q_sample) for a training step, with the noise-side levers applied.

        Draws eps (then DDPM-IP's xi) from ``generator`` or the global stream, so a resumed run draws the
        same values; immiscible reassignment is deterministic given eps.
        """
        noise = (torch.randn_like(x_start) if generator is None  # x_start's memory format, as before the levers
                 else torch.randn(x_start.shape, generator=generator, device=x_start.device, dtype=x_start.dtype))
        if self.training_levers["immiscible"]:
            noise = assign_noise(x_start, noise)
        return noise, perturb_noise(noise, self.training_levers["input_perturbation"], generator=generator)

    def _vb_terms_bpd(self, model: Model | None, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                      clip_denoised: bool = True, model_kwargs: dict[str, Any] | None = None,
                      model_output: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """L_t in bits/dim: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0, decoder NLL at t = 0."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs,
                                   model_output=model_output)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / math.log(2.0)
        decoder_nll = -mean_flat(discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"])) / math.log(2.0)
        return {"output": torch.where(t == 0, decoder_nll, kl), "pred_xstart": out["pred_xstart"]}

    def training_losses(self, model: Model, x_start: torch.Tensor, t: torch.Tensor,
                        model_kwargs: dict[str, Any] | None = None,
                        noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Per-example losses at steps ``t``: dict(loss, mse, vb); ``vb`` is L_t in bits/dim.

        ``simple``: loss = w_t * mse. ``hybrid``: loss = w_t * mse + lambda * K * vb with the mean frozen in vb.
        ``vlb``: loss = vb (times K if ``rescale_vlb``). The MSE is on the configured target, unweighted in
        ``mse``; w_t is ``loss_weights(t)`` (1 unless ``loss_weighting`` is set). Without ``noise`` the
        noise comes from ``training_noise`` (input perturbation / immiscible assignment when on).
        """
        if noise is None:
            noise, q_noise = self.training_noise(x_start)
        else:
            q_noise = noise
        x_t = self.q_sample(x_start, t, noise=q_noise)
        model_output = model(x_t, self.model_timesteps(t), **(model_kwargs or {})).to(x_start.dtype)
        prediction, var_values = self._split_output(model_output, x_t)

        if self.loss_type == "vlb":
            vb_output = model_output  # the bound trains mean and variance together
        elif var_values is None:
            vb_output = prediction.detach()
        else:  # stop-gradient on the mean: the VLB term only trains the variance
            vb_output = torch.cat([prediction.detach(), var_values], dim=1)
        vb = self._vb_terms_bpd(None, x_start, x_t, t, clip_denoised=False, model_output=vb_output)["output"]

        if self.mean_type == "eps":
            target = noise
        elif self.mean_type == "x0":
            target = x_start
        else:
            target = self.get_v(x_start, noise, t)
        mse = mean_flat((target - prediction) ** 2)
        weighted_mse = mse
        if self.training_levers["loss_weighting"] != "none":
            weighted_mse = mse * self.loss_weights(t).to(mse.dtype)

        if self.loss_type == "simple":
            loss = weighted_mse
        elif self.loss_type == "hybrid":
            loss = weighted_mse + self.hybrid_lambda * self.num_timesteps * vb
        else:
            loss = vb * self.num_timesteps if self.rescale_vlb else vb
        return {"loss": loss, "mse": mse, "vb": vb}

    # ------------------------------------------------------------------ likelihood
    def prior_bpd(self, x_start: torch.Tensor) -> torch.Tensor:
        """KL(q(x_K | x_0) || N(0, I)) in bits/dim, per example."""
        t = torch.full((x_start.shape[0],), self.num_timesteps - 1, device=x_start.device, dtype=torch.long)
        mean, _, log_variance = self.q_mean_variance(x_start, t)
        return mean_flat(normal_kl(mean, log_variance, 0.0, 0.0)) / math.log(2.0)

    def vlb_estimate(self, model: Model, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None,
                     model_kwargs: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
        """An unbiased single-step Monte-Carlo estimate of the VLB in bits/dim per example, for t ~ U{0..K-1}:
        ``vlb_bpd = prior_bpd + K * L_t`` (``vb`` of ``training_losses``), with that step's ``mse``."""
        losses = self.training_losses(model, x_start, t, noise=noise, model_kwargs=model_kwargs)
        return {"vlb_bpd": self.prior_bpd(x_start) + self.num_timesteps * losses["vb"], "mse": losses["mse"]}

    @torch.no_grad()
    def calc_bpd_loop(self, model: Model, x_start: torch.Tensor, clip_denoised: bool = True,
                      model_kwargs: dict[str, Any] | None = None,
                      noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The full variational bound in bits/dim, term by term (columns in timestep order)."""
        batch, steps = x_start.shape[0], self.num_timesteps
        if noise is not None and noise.shape != (steps, *x_start.shape):
            raise ValueError(f"noise must have shape {(steps, *x_start.shape)}, got {tuple(noise.shape)}")
        vb, xstart_mse, mse = (torch.empty(batch, steps, device=x_start.device, dtype=x_start.dtype)
                               for _ in range(3))
        for k in reversed(range(steps)):
            t = torch.full((batch,), k, device=x_start.device, dtype=torch.long)
            eps = torch.randn_like(x_start) if noise is None else noise[k]
            x_t = self.q_sample(x_start, t, noise=eps)
            out = self._vb_terms_bpd(model, x_start, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
            vb[:, k] = out["output"]
            xstart_mse[:, k] = mean_flat((out["pred_xstart"] - x_start) ** 2)
            mse[:, k] = mean_flat((self.predict_eps_from_xstart(x_t, t, out["pred_xstart"]) - eps) ** 2)
        prior = self.prior_bpd(x_start)
        return {"total_bpd": vb.sum(dim=1) + prior, "prior_bpd": prior, "vb": vb,
                "xstart_mse": xstart_mse, "mse": mse}

    # ------------------------------------------------------------------ sampling
    # Every sampler below is a step function walked by the one loop ``samplers.sample_loop_progressive``;
    # randomness comes from ``noise`` (x_K) and a ``noise_sampler(x)`` (every later draw; e.g. a
    # ``PerSampleNoise``) or, when no noise_sampler is given, from ``generator``.
    def predict_xstart(self, model: Model, x: torch.Tensor, t: torch.Tensor, clip_denoised: bool = True,
                       cond_fn: CondFn | None = None,
                       model_kwargs: dict[str, Any] | None = None) -> torch.Tensor:
        """The (clipped) x_0 prediction at step ``t``, score-corrected by ``cond_fn`` as DDIM's guidance
        (Algorithm 2): what the data-prediction solvers integrate. Learned variances are ignored.

        With ``clip_denoised`` the guided prediction is clipped again after the correction (DPM-Solver's
        thresholding order: guide the noise, then threshold the data prediction). The correction adds
        ``(1 - alpha_bar) / sqrt(alpha_bar) * grad`` to x_0, ~100x the gradient at the noisiest steps of a cosine
        schedule; a multistep solver extrapolates from those predictions, so unclipped they wreck its samples
        (default experiment, classifier scale 2, DPM-Solver++(2M) at 10 NFE: FID@500 94.7 unclipped, 56.9
        clipped, 56.1 unguided). DDIM (``condition_score``) keeps ADM's order (clip, then guide). A ``cond_fn`` that
        returns None does not guide this step."""
        self._check_t(t, x.shape[0])
        model_output = model(x, self.model_timesteps(t), **(model_kwargs or {})).to(x.dtype)
        prediction, _ = self._split_output(model_output, x)
        pred_xstart = self._pred_xstart(prediction, x, t)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1.0, 1.0)
        gradient = None if cond_fn is None else cond_fn(x, self.model_timesteps(t), **(model_kwargs or {}))
        if gradient is None:  # unguided, or no guidance at this step (a guidance interval)
            return pred_xstart
        eps = self.predict_eps_from_xstart(x, t, pred_xstart)
        eps = eps - self._extract("sqrt_one_minus_alphas_cumprod", t, x) * gradient.to(x.dtype)
        guided = self.predict_xstart_from_eps(x, t, eps)
        return guided.clamp(-1.0, 1.0) if clip_denoised else guided

    def _noise_like(self, x: torch.Tensor, noise: torch.Tensor | None, generator: torch.Generator | None):
        if noise is not None:
            return noise
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)

    def p_sample(self, model: Model, x: torch.Tensor, t: torch.Tensor, clip_denoised: bool = True,
                 cond_fn: CondFn | None = None, model_kwargs: dict[str, Any] | None = None,
                 noise: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """One ancestral step x_t -> x_{t-1}; no noise is added at t = 0."""
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        mean = out["mean"]
        if cond_fn is not None:
            mean = self.condition_mean(cond_fn, out, x, t, model_kwargs=model_kwargs)
        noise = self._noise_like(x, noise, generator)
        nonzero = (t != 0).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        sample = mean + nonzero * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def _initial_noise(self, shape, noise, device, generator, noise_sampler=None) -> torch.Tensor:
        if noise is not None:
            if tuple(noise.shape) != tuple(shape):
                raise ValueError(f"noise shape {tuple(noise.shape)} differs from the requested {tuple(shape)}")
            return noise
        if noise_sampler is not None:
            return noise_sampler(torch.empty(tuple(shape), device=device))
        return torch.randn(tuple(shape), generator=generator, device=device)

    def sample_loop_progressive(self, step: StepFn, shape, noise: torch.Tensor | None = None, device=None,
                                progress: bool = False, generator: torch.Generator | None = None,
                                noise_sampler: NoiseSampler | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """The one loop of every sampler: x_K from ``noise`` (or drawn), then ``step(x, k, noise_sampler)``
        for k = K-1 .. 0, yielding each step's dict(sample, pred_xstart)."""
        x = self._initial_noise(shape, noise, device, generator, noise_sampler)
        yield from sample_loop_progressive(step, x, self.num_timesteps, noise_sampler or generator_noise(generator),
                                           progress)

    def _full(self, k: int, x: torch.Tensor) -> torch.Tensor:
        return torch.full((x.shape[0],), k, device=x.device, dtype=torch.long)

    def p_step_fn(self, model: Model, clip_denoised: bool = True, cond_fn: CondFn | None = None,
                  model_kwargs: dict[str, Any] | None = None) -> StepFn:
        """``p_sample`` as a step function (noise drawn every step)."""
        def step(x, k, noise_sampler):
            return self.p_sample(model, x, self._full(k, x), clip_denoised=clip_denoised, cond_fn=cond_fn,
                                 model_kwargs=model_kwargs, noise=noise_sampler(x))
        return step

    def ddim_step_fn(self, model: Model, eta: float = 0.0, clip_denoised: bool = True,
                     cond_fn: CondFn | None = None, model_kwargs: dict[str, Any] | None = None) -> StepFn:
        """``ddim_sample`` as a step function (noise drawn only when eta > 0)."""
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")

        def step(x, k, noise_sampler):
            return self.ddim_sample(model, x, self._full(k, x), clip_denoised=clip_denoised, eta=eta,
                                    cond_fn=cond_fn, model_kwargs=model_kwargs,
                                    noise=noise_sampler(x) if eta > 0 else None)
        return step

    def dpm_solver_step_fn(self, model: Model, order: int = 2, sde: bool = False, corrector: Corrector = "none",
                           lower_order_final: bool = True, clip_denoised: bool = True,
                           cond_fn: CondFn | None = None, model_kwargs: dict[str, Any] | None = None) -> StepFn:
        """DPM-Solver++ (and the UniPC corrector) over this process's steps; see ``samplers.multistep_step_fn``."""
        def denoise(x, k):
            return self.predict_xstart(model, x, self._full(k, x), clip_denoised=clip_denoised, cond_fn=cond_fn,
                                       model_kwargs=model_kwargs)
        return multistep_step_fn(denoise, self.alphas_cumprod, order=order, sde=sde, corrector=corrector,
                                 lower_order_final=lower_order_final)

    def step_fn(self, method: str, model: Model, *, eta: float = 0.0, lower_order_final: bool = True,
                clip_denoised: bool = True, cond_fn: CondFn | None = None,
                model_kwargs: dict[str, Any] | None = None) -> StepFn:
        """The step function of sampling ``method`` on this process: the one place a method name becomes a step.

        ``ddpm``: ancestral ``p_sample``; ``ddim``: ``ddim_sample`` with ``eta``; ``dpm++2m``, ``dpm++3m``,
        ``dpm++2m-sde``, ``unipc``: ``dpm_solver_step_fn`` with the order / sde / corrector of ``samplers.SOLVERS``
        and ``lower_order_final``. Walk it with ``sample_loop`` / ``sample_loop_progressive``."""
        _check_choice("sampling method", method, SAMPLE_METHODS)
        guided = {"clip_denoised": clip_denoised, "cond_fn": cond_fn, "model_kwargs": model_kwargs}
        if method == "ddpm":
            return self.p_step_fn(model, **guided)
        if method == "ddim":
            return self.ddim_step_fn(model, eta=eta, **guided)
        order, sde, corrector = SOLVERS[method]
        return self.dpm_solver_step_fn(model, order=order, sde=sde, corrector=corrector,
                                       lower_order_final=lower_order_final, **guided)

    def sample_loop(self, step: StepFn, shape, **loop: Any) -> torch.Tensor:
        """The final sample x_0 of ``sample_loop_progressive(step, shape, **loop)``."""
        return _last(self.sample_loop_progressive(step, shape, **loop))

    # ADM's loop names, each one step function on the one loop. ``loop``: sample_loop_progressive's noise (x_K),
    # device, progress, generator, noise_sampler.
    def p_sample_loop_progressive(self, model: Model, shape, *, clip_denoised: bool = True,
                                  cond_fn: CondFn | None = None, model_kwargs: dict[str, Any] | None = None,
                                  **loop: Any) -> Iterator[dict[str, torch.Tensor]]:
        """Yield every ancestral step's dict(sample, pred_xstart), from t = K-1 down to 0."""
        return self.sample_loop_progressive(self.step_fn("ddpm", model, clip_denoised=clip_denoised, cond_fn=cond_fn,
                                                         model_kwargs=model_kwargs), shape, **loop)

    def p_sample_loop(self, model: Model, shape, **options: Any) -> torch.Tensor:
        """Ancestral sampling from x_K ~ N(0, I); returns x_0 (``options`` as ``p_sample_loop_progressive``)."""
        return _last(self.p_sample_loop_progressive(model, shape, **options))

    # ------------------------------------------------------------------ DDIM
    def ddim_sample(self, model: Model, x: torch.Tensor, t: torch.Tensor, clip_denoised: bool = True,
                    eta: float = 0.0, cond_fn: CondFn | None = None, model_kwargs: dict[str, Any] | None = None,
                    noise: torch.Tensor | None = None,
                    generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """One DDIM step x_t -> x_{t-1} with stochasticity ``eta`` (0: deterministic)."""
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        if cond_fn is not None:
            out = self.condition_score(cond_fn, out, x, t, model_kwargs=model_kwargs)
        eps = self.predict_eps_from_xstart(x, t, out["pred_xstart"])
        sigma64 = eta * self._extract64("ddim_sigma_unit", t)
        ab_prev64 = self._extract64("alphas_cumprod_prev", t)
        coef_x0 = self._broadcast(ab_prev64.sqrt(), x)
        coef_eps = self._broadcast((1.0 - ab_prev64 - sigma64 ** 2).clamp(min=0.0).sqrt(), x)
        sample = coef_x0 * out["pred_xstart"] + coef_eps * eps
        if eta > 0:
            nonzero = (t != 0).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
            sample = sample + nonzero * self._broadcast(sigma64, x) * self._noise_like(x, noise, generator)
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_sample_loop_progressive(self, model: Model, shape, *, eta: float = 0.0, clip_denoised: bool = True,
                                     cond_fn: CondFn | None = None, model_kwargs: dict[str, Any] | None = None,
                                     **loop: Any) -> Iterator[dict[str, torch.Tensor]]:
        """Yield every DDIM step's dict(sample, pred_xstart), from t = K-1 down to 0."""
        return self.sample_loop_progressive(self.step_fn("ddim", model, eta=eta, clip_denoised=clip_denoised,
                                                         cond_fn=cond_fn, model_kwargs=model_kwargs), shape, **loop)

    def ddim_sample_loop(self, model: Model, shape, **options: Any) -> torch.Tensor:
        """DDIM sampling (Song et al.) over this process's steps; returns x_0 (``options`` as
        ``ddim_sample_loop_progressive``)."""
        return _last(self.ddim_sample_loop_progressive(model, shape, **options))

    # ------------------------------------------------------------------ DPM-Solver++ / UniPC
    def dpm_solver_sample_loop_progressive(self, model: Model, shape, *, order: int = 2, sde: bool = False,
                                           corrector: Corrector = "none", lower_order_final: bool = True,
                                           clip_denoised: bool = True, cond_fn: CondFn | None = None,
                                           model_kwargs: dict[str, Any] | None = None,
                                           **loop: Any) -> Iterator[dict[str, torch.Tensor]]:
        """Yield every DPM-Solver++ step's dict(sample, pred_xstart), from t = K-1 down to 0."""
        return self.sample_loop_progressive(self.dpm_solver_step_fn(
            model, order, sde, corrector, lower_order_final, clip_denoised, cond_fn, model_kwargs), shape, **loop)

    def dpm_solver_sample_loop(self, model: Model, shape, **options: Any) -> torch.Tensor:
        """DPM-Solver++(order M) in data-prediction form over this process's K steps (K network calls);
        ``sde``: SDE-DPM-Solver++; ``corrector="unipc"``: UniPC(bh2). Returns x_0 (``options`` as
        ``dpm_solver_sample_loop_progressive``)."""
        return _last(self.dpm_solver_sample_loop_progressive(model, shape, **options))


def _last(outputs: Iterator[dict[str, torch.Tensor]]) -> torch.Tensor:
    final = None
    for out in outputs:
        final = out
    return final["sample"]
