r"""Neural selectivity transfer (Huang & Wang, 2017): MMD² over channels-as-samples.

Per sample b the student channels are m = C_s samples x_i ∈ R^D and the teacher channels
n = C_t samples y_j ∈ R^D (D = H·W), each L2-normalised like ``F.normalize``:
x̂ = x / max(‖x‖, 1e-12) (so an all-zero channel stays zero). With a kernel k,

    MMD² = mean_{i,i'} k(x̂_i, x̂_i') + mean_{j,j'} k(ŷ_j, ŷ_j') − 2 mean_{i,j} k(x̂_i, ŷ_j).

Every kernel is written through the Gram entry g = x̂ᵀŷ and the normalised row norms
ρ = ‖x̂‖ ∈ {0, 1} (0 only for an all-zero channel):

* ``linear``: k = g
* ``poly``:   k = (g + c)^d
* ``rbf``:    k = Σ_σ² exp(−‖x̂ − ŷ‖² / (2σ²)) with ‖x̂ − ŷ‖² = ρ_x² + ρ_y² − 2g (clamped at 0),
  which is exactly the normalise-then-compute definition, also for all-zero channels.

Options: ``unbiased`` drops the diagonals i = i' and j = j' from the two within-set means
(dividing by m(m−1) and n(n−1)); ``teacher_term=False`` drops the teacher-teacher term (it
has no gradient for the student). ``sigma2="mean"`` sets σ² per sample to the mean squared
distance between distinct rows of the pooled set [X̂; Ŷ] (detached, see
:func:`mean_squared_distance`).

Memory: per-sample Grams through ``bmm`` (B × C × C), never the B·C·C·HW broadcast that
:func:`naive_channel_mmd` (the benchmark's "naive" provider) builds.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kdfast.reference.numerics import NORM_EPS, normalize, upcast_low_precision

KERNELS = ("linear", "poly", "rbf")


def unit_channels(features: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, H*W) with every channel divided by max(its L2 norm, 1e-12)
    (:func:`~kdfast.reference.numerics.normalize`: finite for any finite channel)."""
    return normalize(upcast_low_precision(features).flatten(2), dim=2, eps=NORM_EPS)


def check_unbiased_sizes(num_student: int, num_teacher: int, unbiased: bool,
                         teacher_term: bool) -> None:
    """The unbiased within-set means need at least two channels in each set they use."""
    if not unbiased:
        return
    if num_student < 2:
        raise ValueError(f"unbiased=True needs at least 2 student channels, got {num_student}; "
                         "use unbiased=False")
    if teacher_term and num_teacher < 2:
        raise ValueError(f"unbiased=True needs at least 2 teacher channels, got {num_teacher}; "
                         "use unbiased=False or teacher_term=False")


def as_bandwidths(sigma2) -> tuple[float, ...] | str:
    """``"mean"``, or the σ² values as a tuple (a single number becomes a 1-tuple)."""
    if isinstance(sigma2, str):
        return sigma2
    if isinstance(sigma2, (int, float)):
        return (float(sigma2),)
    return tuple(float(s) for s in sigma2)


@torch.no_grad()
def mean_squared_distance(x_hat: torch.Tensor, y_hat: torch.Tensor) -> torch.Tensor:
    r"""Per sample, the mean of ‖z_i − z_j‖² over ordered pairs i ≠ j of Z = [X̂; Ŷ] (detached).

    Derivation (N = m + n rows z_i, ρ_i² = ‖z_i‖²):
        Σ_{i,j} ‖z_i − z_j‖² = Σ_{i,j} (ρ_i² + ρ_j² − 2 z_iᵀz_j) = 2N Σ_i ρ_i² − 2 ‖Σ_i z_i‖²,
    because the sum of all entries of the Gram ZZᵀ is ‖Σ_i z_i‖². The diagonal terms are 0,
    so dividing by N(N − 1) gives the mean over distinct pairs: the off-diagonal ss and tt
    pairs plus every st pair (counted as st and ts), in O(N·D) without any Gram.
    The result is clamped at 1e-12 so identical (or all-zero) rows never divide by 0.
    Returns (B,).
    """
    n_rows = x_hat.shape[1] + y_hat.shape[1]
    sq_norms = x_hat.pow(2).sum((1, 2)) + y_hat.pow(2).sum((1, 2))
    row_sum = x_hat.sum(1) + y_hat.sum(1)
    total = 2 * n_rows * sq_norms - 2 * row_sum.pow(2).sum(1)
    return (total / (n_rows * (n_rows - 1))).clamp_min(NORM_EPS)


def kernel_values(gram: torch.Tensor, sq_norm_rows: torch.Tensor, sq_norm_cols: torch.Tensor,
                  kernel: str, degree: int, coef: float, bandwidths) -> torch.Tensor:
    """k applied entry-wise to a (B, m, n) Gram of unit rows with (B, m), (B, n) squared norms.

    ``bandwidths`` is a tuple of σ² values or a (B,) tensor (the ``"mean"`` choice).
    """
    if kernel == "linear":
        return gram
    if kernel == "poly":
        return (gram + coef).pow(degree)
    sq_dist = (sq_norm_rows.unsqueeze(2) + sq_norm_cols.unsqueeze(1) - 2 * gram).clamp_min(0)
    if isinstance(bandwidths, torch.Tensor):
        return torch.exp(-sq_dist / (2 * bandwidths.view(-1, 1, 1)))
    return sum(torch.exp(-sq_dist / (2 * s)) for s in bandwidths)


def kernel_slopes(gram: torch.Tensor, sq_norm_rows: torch.Tensor, sq_norm_cols: torch.Tensor,
                  kernel: str, degree: int, coef: float, bandwidths) -> torch.Tensor:
    """∂k/∂g entry-wise: the derivative of :func:`kernel_values` with torch's subgradients.

    linear 1; poly d(g + c)^(d−1); rbf Σ_σ² exp(−‖x̂ − ŷ‖²/(2σ²))/σ² where the distance
    before the clamp is ≥ 0, else 0 (clamp_min passes the gradient where x ≥ min); NaN where
    the distance is NaN.
    ``bandwidths``: a tuple of σ², or a (B,) or (B, S) tensor of per-sample values.
    """
    if kernel == "linear":
        return torch.ones_like(gram)
    if kernel == "poly":
        if degree == 0:
            return torch.zeros_like(gram)
        return degree * (gram + coef).pow(degree - 1)
    sq_dist = sq_norm_rows.unsqueeze(2) + sq_norm_cols.unsqueeze(1) - 2 * gram
    distance = sq_dist.clamp_min(0)
    if isinstance(bandwidths, torch.Tensor):
        sigma2 = bandwidths.reshape(gram.shape[0], -1, 1, 1).to(gram.dtype)
        slope = (torch.exp(-distance.unsqueeze(1) / (2 * sigma2)) / sigma2).sum(dim=1)
    else:
        slope = sum(torch.exp(-distance / (2 * s)) / s for s in bandwidths)
    return torch.where(sq_dist < 0, 0.0, slope)


def block_mean(values: torch.Tensor, exclude_diagonal: bool = False) -> torch.Tensor:
    """Per-sample mean of a (B, m, n) block; without its diagonal (m = n) when asked."""
    rows, cols = values.shape[1:]
    total = values.sum((1, 2))
    if exclude_diagonal:
        return (total - values.diagonal(dim1=1, dim2=2).sum(1)) / (rows * (rows - 1))
    return total / (rows * cols)


def _linear_mmd(x_hat: torch.Tensor, y_hat: torch.Tensor, unbiased: bool,
                teacher_term: bool) -> torch.Tensor:
    """Linear kernel without a Gram: Σ_{i,j} x̂_iᵀŷ_j = (Σ x̂_i)ᵀ(Σ ŷ_j).

    Biased, this is ‖mean x̂ − mean ŷ‖²; unbiased removes Σ_i ρ_i² from the within-set sums.
    """
    def within(z: torch.Tensor) -> torch.Tensor:
        rows = z.shape[1]
        total = z.sum(1).pow(2).sum(1)
        if unbiased:
            return (total - z.pow(2).sum((1, 2))) / (rows * (rows - 1))
        return total / rows**2

    cross = (x_hat.mean(1) * y_hat.mean(1)).sum(1)
    loss = within(x_hat) - 2 * cross
    return loss + within(y_hat) if teacher_term else loss


def feature_gram_mmd(x_hat: torch.Tensor, y_hat: torch.Tensor, coef: float, unbiased: bool,
                     teacher_term: bool) -> torch.Tensor:
    """Poly d=2 through D×D Grams (cheaper than C×C ones when D < m + n) of the unit rows
    x̂ (B, m, D), ŷ (B, n, D); the same math, (B,).

    Σ_{i,j} (g_ij + c)² = Σ g_ij² + 2c Σ g_ij + c²·count, with Σ_{i,j} (x̂_iᵀŷ_j)² =
    ⟨X̂ᵀX̂, ŶᵀŶ⟩_F and Σ_{i,j} x̂_iᵀŷ_j = (Σ x̂_i)ᵀ(Σ ŷ_j). The unbiased within-set sums
    remove the diagonal Σ_i (ρ_i² + c)².
    """
    feat_x = torch.bmm(x_hat.transpose(1, 2), x_hat)
    feat_y = torch.bmm(y_hat.transpose(1, 2), y_hat)
    sum_x, sum_y = x_hat.sum(1), y_hat.sum(1)

    def mean_of(feat_a, feat_b, sum_a, sum_b, count):
        squares = (feat_a * feat_b).sum((1, 2))
        return (squares + 2 * coef * (sum_a * sum_b).sum(1) + coef**2 * count) / count

    def within(feat, row_sum, z):
        rows = z.shape[1]
        full = mean_of(feat, feat, row_sum, row_sum, rows * rows)
        if not unbiased:
            return full
        # The c² term counts all rows² entries; only then is the diagonal taken out.
        diagonal = (z.pow(2).sum(2) + coef).pow(2).sum(1)
        return (full * rows * rows - diagonal) / (rows * (rows - 1))

    loss = within(feat_x, sum_x, x_hat) - 2 * mean_of(feat_x, feat_y, sum_x, sum_y,
                                                      x_hat.shape[1] * y_hat.shape[1])
    return loss + within(feat_y, sum_y, y_hat) if teacher_term else loss


def channel_mmd(student: torch.Tensor, teacher: torch.Tensor, *, kernel: str = "poly",
                degree: int = 2, coef: float = 0.0,
                sigma2: Sequence[float] | str = (1.0,), unbiased: bool = False,
                teacher_term: bool = True) -> torch.Tensor:
    """Per-sample MMD² (B,) between the student's and the teacher's channels.

    student (B, C_s, H, W), teacher (B, C_t, H, W) of equal B, H, W (channels may differ).
    Options as in the module docstring; they are assumed validated (``nst_loss`` does it).
    The algorithm (the same math, chosen for memory) is the one every backend takes:
    :func:`kdfast.ops.mmd.channel_mmd_path`.
    """
    # Imported here: kdfast.ops.mmd imports this module.
    from kdfast.ops.mmd import FEATURE_GRAM, LINEAR, channel_mmd_path

    check_unbiased_sizes(student.shape[1], teacher.shape[1], unbiased, teacher_term)
    x_hat, y_hat = unit_channels(student), unit_channels(teacher)
    path = channel_mmd_path(student, teacher, kernel, degree, teacher_term)
    if path == LINEAR:
        return _linear_mmd(x_hat, y_hat, unbiased, teacher_term)
    if path == FEATURE_GRAM:
        return feature_gram_mmd(x_hat, y_hat, coef, unbiased, teacher_term)

    bandwidths = as_bandwidths(sigma2)
    if bandwidths == "mean":
        bandwidths = mean_squared_distance(x_hat, y_hat)
    sq_x, sq_y = x_hat.pow(2).sum(2), y_hat.pow(2).sum(2)

    def mean_kernel(a_hat, b_hat, sq_a, sq_b, exclude_diagonal=False):
        gram = torch.bmm(a_hat, b_hat.transpose(1, 2))
        values = kernel_values(gram, sq_a, sq_b, kernel, degree, coef, bandwidths)
        return block_mean(values, exclude_diagonal)

    loss = mean_kernel(x_hat, x_hat, sq_x, sq_x, unbiased) - 2 * mean_kernel(x_hat, y_hat,
                                                                             sq_x, sq_y)
    if teacher_term:
        loss = loss + mean_kernel(y_hat, y_hat, sq_y, sq_y, unbiased)
    return loss


def naive_channel_mmd(student: torch.Tensor, teacher: torch.Tensor, *, kernel: str = "poly",
                      degree: int = 2, coef: float = 0.0,
                      sigma2: Sequence[float] | str = (1.0,), unbiased: bool = False,
                      teacher_term: bool = True) -> torch.Tensor:
    """:func:`channel_mmd` the way public code computes it: B·C·C·HW broadcasts.

    Kernel entries come from ``(x.unsqueeze(2) * y.unsqueeze(1)).sum(-1)`` and
    ``((x.unsqueeze(2) - y.unsqueeze(1)) ** 2).sum(-1)``, and ``sigma2="mean"`` from the
    brute-force mean of those distances. Only the benchmark's "naive" provider and the tests
    (as the brute-force definition) use it; it needs O(B·C²·HW) memory.
    """
    check_unbiased_sizes(student.shape[1], teacher.shape[1], unbiased, teacher_term)
    x_hat, y_hat = unit_channels(student), unit_channels(teacher)

    def products(a, b):
        return (a.unsqueeze(2) * b.unsqueeze(1)).sum(-1)

    def sq_distances(a, b):
        return ((a.unsqueeze(2) - b.unsqueeze(1)) ** 2).sum(-1)

    bandwidths = as_bandwidths(sigma2)
    if kernel == "rbf" and bandwidths == "mean":
        with torch.no_grad():
            n_rows = x_hat.shape[1] + y_hat.shape[1]
            total = (sq_distances(x_hat, x_hat).sum((1, 2)) + sq_distances(y_hat, y_hat).sum((1, 2))
                     + 2 * sq_distances(x_hat, y_hat).sum((1, 2)))
            bandwidths = (total / (n_rows * (n_rows - 1))).clamp_min(NORM_EPS)

    def kernel_of(a, b):
        if kernel == "linear":
            return products(a, b)
        if kernel == "poly":
            return (products(a, b) + coef).pow(degree)
        if isinstance(bandwidths, torch.Tensor):
            return torch.exp(-sq_distances(a, b) / (2 * bandwidths.view(-1, 1, 1)))
        return sum(torch.exp(-sq_distances(a, b) / (2 * s)) for s in bandwidths)

    loss = block_mean(kernel_of(x_hat, x_hat), unbiased) - 2 * block_mean(kernel_of(x_hat, y_hat))
    if teacher_term:
        loss = loss + block_mean(kernel_of(y_hat, y_hat), unbiased)
    return loss
