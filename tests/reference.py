"""The (respaced) diffusion process of the DDPM / Improved DDPM papers in float64, written from their equations,
never by calling the implementation: the one reference the process and loss tests compare against."""

import math

import numpy as np
import torch

LN2 = math.log(2.0)


def tanh_cdf(z):
    return 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)))


def decoder_loglik(x0, mean, log_scale):
    """log of the Gaussian mass of x0's 8-bit bin; the edge bins reach to -inf / +inf.

    The mass is floored at 1e-12 as in the DDPM reference code (the tanh CDF saturates to exactly 0/1).
    """
    s = log_scale.exp()
    cdf_hi, cdf_lo = tanh_cdf((x0 + 1 / 255 - mean) / s), tanh_cdf((x0 - 1 / 255 - mean) / s)
    # the bin [-inf, -1 + 1/255] has mass cdf_hi, the bin [1 - 1/255, inf] has mass 1 - cdf_lo
    mass = torch.where(x0 <= -1 + 1e-6, cdf_hi, torch.where(x0 >= 1 - 1e-6, 1 - cdf_lo, cdf_hi - cdf_lo))
    return mass.clamp(min=1e-12).log()


class Ref:
    """The process built from the ORIGINAL alpha_bar at the kept steps (all steps when ``keep`` is None)."""

    def __init__(self, betas, keep=None):
        ab_full = np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))
        self.kept = list(range(len(ab_full))) if keep is None else sorted(keep)
        ab = ab_full[self.kept]
        ab_prev = np.append(1.0, ab[:-1])
        alpha = ab / ab_prev
        beta = 1.0 - alpha
        post_var = beta * (1.0 - ab_prev) / (1.0 - ab)  # DDPM eq. 7
        t = torch.tensor
        self.K = len(self.kept)
        self.ab, self.ab_prev, self.beta = t(ab), t(ab_prev), t(beta)
        self.post_var = t(post_var)
        self.post_logvar = t(np.log(np.append(post_var[1], post_var[1:])))
        self.large_logvar = t(np.log(np.append(post_var[1], beta[1:])))
        self.coef_x0 = t(np.sqrt(ab_prev) * beta / (1.0 - ab))
        self.coef_xt = t(np.sqrt(alpha) * (1.0 - ab_prev) / (1.0 - ab))

    @staticmethod
    def col(table, t):
        return table[t].reshape(-1, 1, 1, 1)

    def q_sample(self, x0, t, noise):
        ab = self.col(self.ab, t)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def x0_from(self, mean_type, pred, x, t):
        ab = self.col(self.ab, t)
        if mean_type == "eps":
            return (x - (1 - ab).sqrt() * pred) / ab.sqrt()
        if mean_type == "v":
            return ab.sqrt() * x - (1 - ab).sqrt() * pred
        return pred

    def target(self, mean_type, x0, noise, t):
        ab = self.col(self.ab, t)
        return {"eps": noise, "x0": x0, "v": ab.sqrt() * noise - (1 - ab).sqrt() * x0}[mean_type]

    def p_mean_variance(self, mean_type, var_type, out, x, t, clip):
        out, x = out.double(), x.double()
        C = x.shape[1]
        pred, var_out = (out[:, :C], out[:, C:]) if var_type.startswith("learned") else (out, None)
        x0 = self.x0_from(mean_type, pred, x, t)
        if clip:
            x0 = x0.clamp(-1, 1)
        if var_type == "fixed_small":
            logvar = self.col(self.post_logvar, t).expand_as(x)
        elif var_type == "fixed_large":
            logvar = self.col(self.large_logvar, t).expand_as(x)
        elif var_type == "learned":
            logvar = var_out
        else:
            frac = (var_out + 1) / 2
            logvar = frac * self.col(self.beta.log(), t) + (1 - frac) * self.col(self.post_logvar, t)
        mean = self.col(self.coef_x0, t) * x0 + self.col(self.coef_xt, t) * x
        # As in OpenAI's code, fixed_small reports the unclipped beta-tilde as "variance" (0 at t=0) and
        # the clipped log(beta-tilde) as "log_variance"; everywhere else variance = exp(log_variance).
        variance = self.col(self.post_var, t).expand_as(x) if var_type == "fixed_small" else logvar.exp()
        return {"mean": mean, "variance": variance, "log_variance": logvar, "pred_xstart": x0}

    def p(self, mean_type, var_type, out, x, t, clip):
        """``(mean, log_variance, pred_xstart)`` of p(x_{t-1} | x_t)."""
        out = self.p_mean_variance(mean_type, var_type, out, x, t, clip)
        return out["mean"], out["log_variance"], out["pred_xstart"]

    def vb_bits(self, mean_type, var_type, out, x0, x_t, t, clip=False):
        """L_t per example in bits/dim: KL to the true posterior (t>0), decoder NLL (t=0)."""
        mean, logvar, _ = self.p(mean_type, var_type, out, x_t, t, clip)
        true_mean = self.col(self.coef_x0, t) * x0 + self.col(self.coef_xt, t) * x_t
        v1, v2 = self.col(self.post_logvar, t).exp(), logvar.exp()
        kl = 0.5 * ((v2 / v1).log() + (v1 + (true_mean - mean) ** 2) / v2 - 1)
        nll = -decoder_loglik(x0, mean, 0.5 * logvar)
        per_elem = torch.where(self.col(t, torch.arange(len(t))) == 0, nll, kl)
        return per_elem.flatten(1).mean(1) / LN2
