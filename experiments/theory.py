"""The paper's sensitivity analysis (Sections 3.3-3.4, Eq. 3-13, supplementary 7) as functions.

An FC classifier scores a feature z by z . w_c; an l2 classifier by ||z - w_d||. For a feature
perturbation eps, their relative output changes are S_c (Eq. 3) and S_d (Eq. 4). The paper
shows S_c >= sup S_d whenever |cos theta_c| / |sin theta_d| <= |cos gamma| (Eq. 7-8; theta_c,
theta_d: the angles between z and the reference vectors, gamma: between eps and w_c), and
asks how often that holds: F_X(c) = P(|cos theta_c| / |sin theta_d| <= c), for directions
uniform on the sphere (Eq. 9-11) and for angles drawn from a mixture of truncated Gaussians
fitted to real features (Eq. 12-13).

Where a printed equation disagrees with its independent check (tests/test_experiments.py), the
function named for the quantity implements the form the check confirms and the printed form is
kept beside it, named for it (`cdf_isotropic_as_printed`).
Angles are in radians. numpy and scipy only: not part of the copyable head.
"""
import math

import numpy as np
from scipy import integrate, optimize, special, stats

# Eq. 3-8: sensitivities of one feature -----------------------------------------------------------

def sensitivity_fc(z, w, eps):
    """Eq. 3, by its definition: S_c = |(z + eps) . w - z . w| / |z . w|."""
    return abs(np.dot(z + eps, w) - np.dot(z, w)) / abs(np.dot(z, w))


def sensitivity_fc_from_angles(z_norm, eps_norm, cos_theta_c, cos_gamma):
    """Eq. 3, its right-hand side: ||eps|| |cos gamma| / (||z|| |cos theta_c|)."""
    return eps_norm * abs(cos_gamma) / (z_norm * abs(cos_theta_c))


def sensitivity_l2(z, w, eps):
    """Eq. 4: S_d = | ||z + eps - w|| - ||z - w|| | / ||z - w||."""
    return abs(np.linalg.norm(z + eps - w) - np.linalg.norm(z - w)) / np.linalg.norm(z - w)


def sup_sensitivity_l2(z_norm, w_norm, cos_theta_d, eps_norm):
    """Eq. 5: sup over directions of eps of S_d, ||eps|| / ||z - w|| (the triangle inequality;
    reached when eps is collinear with z - w)."""
    return eps_norm / math.sqrt(z_norm ** 2 + w_norm ** 2 - 2 * z_norm * w_norm * cos_theta_d)


def fc_at_least_as_sensitive(z_c, w_c, eps_c, z_d, w_d, eps_d):
    """Eq. 6, the exact condition: S_c >= sup S_d."""
    cos_d = np.dot(z_d, w_d) / (np.linalg.norm(z_d) * np.linalg.norm(w_d))
    return sensitivity_fc(z_c, w_c, eps_c) >= sup_sensitivity_l2(
        np.linalg.norm(z_d), np.linalg.norm(w_d), cos_d, np.linalg.norm(eps_d))


def sufficient_condition(cos_theta_c, cos_gamma, sin_theta_d):
    """Eq. 7 (and Eq. 8 divided through): |cos theta_c| <= |cos gamma| |sin theta_d|, which
    implies Eq. 6 when ||z|| and ||eps|| are the same under both classifiers (the paper's
    assumption): then ||z - w|| >= ||z|| |sin theta_d| closes the gap."""
    return abs(cos_theta_c) <= abs(cos_gamma) * abs(sin_theta_d)


# Eq. 9-11: directions uniform on the sphere in R^d ------------------------------------------------

def _log_c(d):
    """log of C = Gamma(d/2) / (Gamma((d-1)/2) sqrt(pi)), the normaliser of Eq. 10 and 23."""
    return special.gammaln(d / 2) - special.gammaln((d - 1) / 2) - 0.5 * math.log(math.pi)


def density_cos(eta, d):
    """Eq. 10, p_H: the density of cos(theta) for a direction uniform on the sphere in R^d."""
    return np.exp(_log_c(d)) * (1 - np.asarray(eta, float) ** 2) ** ((d - 3) / 2)


def density_sin(tau, d):
    """Eq. 10, p_T: the density of sin(theta) on [0, 1] (theta in [0, pi], both halves)."""
    tau = np.asarray(tau, float)
    return 2 * np.exp(_log_c(d)) * tau ** (d - 2) / np.sqrt(1 - tau ** 2)


def cdf_abs_cos(a, d):
    """P(|cos theta| <= a) = 2 int_0^a p_H: cos^2 theta ~ Beta(1/2, (d-1)/2)."""
    return special.betainc(0.5, (d - 1) / 2, np.clip(a, 0, 1) ** 2)


def cdf_isotropic(c, d):
    """Eq. 9: F_X(c) = P(|cos theta_c| / |sin theta_d| <= c) for independent directions uniform on
    the sphere in R^d, as int_0^1 p_T(tau) P(|H| <= tau c) dtau, computed with tau = sin t
    (which removes the 1/sqrt(1 - tau^2) singularity): 2C int_0^{pi/2} sin^{d-2} t P(|H| <= c sin t) dt."""
    log_c = _log_c(d)

    def f(t):
        return 2 * math.exp(log_c + (d - 2) * math.log(math.sin(t))) * cdf_abs_cos(c * math.sin(t), d) if t > 0 else 0.0
    return integrate.quad(f, 0, math.pi / 2, limit=400, epsabs=1e-11, epsrel=1e-9)[0]


def cdf_isotropic_as_printed(c, d):
    """Eq. 11 as the paper prints it (n = d):
    2 Gamma^2(n/2) / (pi Gamma^2((n-1)/2)) int_0^1 x^{d-2} / sqrt(1 - x^2) int_0^{x c} (1 - y^2)^{(n-3)/2} dy dx.
    Its constant is 2 C^2 where Eq. 28 of the supplementary (and the check) has 4 C^2: it is half
    of F_X(c) for c <= 1 (test_eq11_as_printed_is_half_the_cdf); for c > 1 its inner integral
    also runs past y = 1."""
    log_c = _log_c(d)
    half_beta = 0.5 * special.beta(0.5, (d - 1) / 2)

    def f(t):  # x = sin t; the inner integral in closed form (to min(x c, 1); nan beyond in print)
        x = math.sin(t)
        return math.exp((d - 2) * math.log(x)) * half_beta * special.betainc(0.5, (d - 1) / 2, min(x * c, 1) ** 2) \
            if t > 0 else 0.0
    return 2 * math.exp(2 * log_c) * integrate.quad(f, 0, math.pi / 2, limit=400, epsabs=1e-12, epsrel=1e-10)[0]


# Eq. 12-13: angles of real features, a mixture of truncated Gaussians -------------------------

def truncated_normal_pdf(x, mu, sigma):
    """Eq. 12's t(x, mu, sigma): a Gaussian truncated to [0, pi]."""
    x = np.asarray(x, float)
    z = stats.norm.cdf((math.pi - mu) / sigma) + stats.norm.cdf(mu / sigma) - 1
    inside = (x >= 0) & (x <= math.pi)
    return np.where(inside, stats.norm.pdf((x - mu) / sigma) / (sigma * z), 0.0)


def truncated_normal_cdf(x, mu, sigma):
    x = np.clip(np.asarray(x, float), 0, math.pi)
    lo = stats.norm.cdf(-mu / sigma)
    return (stats.norm.cdf((x - mu) / sigma) - lo) / (stats.norm.cdf((math.pi - mu) / sigma) - lo)


def angle_pdf(x, alpha, mu_pos, sd_pos, mu_neg, sd_neg):
    """Eq. 12: alpha t(x, mu+, sigma+) + (1 - alpha) t(x, mu-, sigma-); alpha the share of pairs
    (feature, reference vector) of the feature's own class."""
    return alpha * truncated_normal_pdf(x, mu_pos, sd_pos) + (1 - alpha) * truncated_normal_pdf(x, mu_neg, sd_neg)


def angle_cdf(x, alpha, mu_pos, sd_pos, mu_neg, sd_neg):
    return alpha * truncated_normal_cdf(x, mu_pos, sd_pos) + (1 - alpha) * truncated_normal_cdf(x, mu_neg, sd_neg)


def angle_stats(c, d, degrees=True):
    """The angle statistics of Eq. 12 as the dict cdf_empirical takes (radians inside): for the FC
    classifier c and the l2 one d, each (mean, sd of the angle to its own class's reference,
    mean, sd to the others', mixture weight alpha)."""
    k = math.pi / 180 if degrees else 1.0
    return {name: (alpha, mu_pos * k, sd_pos * k, mu_neg * k, sd_neg * k)
            for name, (mu_pos, sd_pos, mu_neg, sd_neg, alpha) in (("c", c), ("d", d))}


# The paper's ResNet-50 on ImageNet (Section 3.4): one positive reference vector of 1,000 per
# feature, so alpha = 1/1000 for both classifiers (our reading of "the ratio of number of
# samples with corresponding category").
PAPER_RESNET50 = angle_stats((66.81, 5.56, 90.01, 3.02, 1 / 1000), (74.3, 7.9, 101.3, 4.3, 1 / 1000))


def cdf_empirical(c, stats_):
    """Eq. 13 (the supplementary's Eq. 30 with x = sin t): F_X(c) when theta_c and theta_d are
    independent draws from the Eq. 12 mixtures in stats_ (angle_stats):
    int_0^{pi/2} (p_d(t) + p_d(pi - t)) P(|cos theta_c| <= c sin t) dt, the inner probability
    in closed form from the mixture's CDF."""
    pc, pd = stats_["c"], stats_["d"]

    def f(t):
        a = min(c * math.sin(t), 1.0)
        inner = angle_cdf(math.acos(-a), *pc) - angle_cdf(math.acos(a), *pc)  # P(|cos theta_c| <= a)
        return float(angle_pdf(t, *pd) + angle_pdf(math.pi - t, *pd)) * float(inner)
    edges = sorted({0.0, math.pi / 2} | {min(max(m, 0), math.pi / 2) for m in (pd[1], math.pi - pd[1], pd[3],
                                                                               math.pi - pd[3])})
    return sum(integrate.quad(f, a, b, limit=200, epsabs=1e-11)[0] for a, b in zip(edges, edges[1:]))


def sample_angles(n, alpha, mu_pos, sd_pos, mu_neg, sd_neg, rng):
    """n angles drawn from the Eq. 12 mixture (for Monte Carlo checks)."""
    pos = rng.random(n) < alpha
    out = np.empty(n)
    for mask, mu, sd in ((pos, mu_pos, sd_pos), (~pos, mu_neg, sd_neg)):
        a, b = (0 - mu) / sd, (math.pi - mu) / sd
        out[mask] = stats.truncnorm.rvs(a, b, loc=mu, scale=sd, size=int(mask.sum()), random_state=rng)
    return out


def fit_truncated_normal(angles):
    """(mu, sigma) of a Gaussian truncated to [0, pi] fitted to angles by maximum likelihood."""
    angles = np.asarray(angles, float)

    def nll(p):
        mu, log_sd = p
        return -np.log(np.maximum(truncated_normal_pdf(angles, mu, math.exp(log_sd)), 1e-300)).sum()
    res = optimize.minimize(nll, [angles.mean(), math.log(max(angles.std(), 1e-3))], method="Nelder-Mead",
                            options=dict(xatol=1e-8, fatol=1e-8, maxiter=4000))
    return float(res.x[0]), float(math.exp(res.x[1]))
