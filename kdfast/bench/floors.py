r"""The minimum work of each core (docs/design.md), in one place.

A row's *floor time* is ``max(bytes / copy_bandwidth, flops / matmul_rate)`` with the two
machine ceilings measured once per run (:mod:`kdfast.bench.ceilings`); its *fraction of the
floor* is floor time / measured median (1.0 would be a kernel at the machine's limit). These are
lower bounds, not models: the launch overhead, the small O(B·C²) epilogues and the cache misses
of a real kernel are left out. ``e`` is the element size in bytes; flops count a multiply-add as
2. ``fwd`` is the loss value without autograd, ``bwd`` the gradient w.r.t. the student only (the
teacher is detached, as in training), ``full`` = fwd + bwd (a fused forward+backward could save
the second read, but needs the forward's norms first, so the sum is the honest floor).

Derivations, per sample unless said otherwise (student m = C_s rows, teacher n = C_t rows,
D = H·W):

* **AT** (memory-bound): forward reads both feature maps once: B(m+n)D·e. Backward reads the
  student A and writes dA: 2BmD·e. No GEMM.
* **NST, rbf and poly**: forward reads X, Y once: B(m+n)D·e; the Gram of the stacked rows
  [X; Y] computed with symmetry (upper triangles of G_ss, G_tt, all of G_st):
  m²D + n²D + 2mnD = (m+n)²D flops (the non-symmetric product would be 2(m+n)²D; we use the
  symmetric count, the smaller one). Backward dX = M_ss X + M_st Y: 2m(m+n)D flops; reads X, Y,
  writes dX: B(2m+n)D·e. Poly with D < m+n may go through the D×D Grams X̂ᵀX̂, ŶᵀŶ instead:
  (m+n)D² forward, 2mD² backward, so poly takes the smaller of the two.
* **NST, linear**: ‖mean x̂ − mean ŷ‖², no GEMM: the bytes above, 0 flops.
* **SP**: Q_s = B×(mD), Q_t = B×(nD); forward two symmetric B×B Grams: B²(m+n)D flops, reads
  both: B(m+n)D·e. Backward dQ_s = (dA + dAᵀ)Q_s: 2B²mD flops; reads Q_s, writes dQ_s:
  2BmD·e.
* **FSP** (layers a: m = C_s channels, b: n = C_t channels, student and teacher each):
  forward two products X_a X_bᵀ: 2·2mnD flops, reads four maps: 2B(m+n)D·e. Backward
  dX_a = dG X_b, dX_b = dGᵀ X_a: 4mnD flops; reads the two student maps, writes their
  gradients: 2B(m+n)D·e.
* **KD** (B×V logits, memory-bound): forward reads both: 2BV·e; backward reads both (the
  softmaxes are recomputed, not stored) and writes ds: 3BV·e.
* **CWD** (B×C×H×W maps, the KD core on B·C rows of H·W): the same, 2BCHW·e forward and
  3BCHW·e backward.
* **RKD** (B×d_s, B×d_t embeddings): distances need the Gram of each set (symmetric:
  B²d flops), angles the Gram of the unit differences per anchor (symmetric: B³d flops):
  forward (B³ + B²)(d_s + d_t), reading both: B(d_s + d_t)·e; backward the same products for
  the student only, un-symmetric: 2(B³ + B²)d_s flops, reads and writes the student: 2Bd_s·e.
* **Fused linear KD** (N tokens, hidden H, vocab V, the teacher as its hidden states and
  lm_head of the same sizes; GEMM-bound): forward the student and teacher logits h Wᵀ,
  h_t W_tᵀ: 2·2NHV flops, reading h, W, h_t, W_t: 2(NH + VH)·e. Backward dh = G W and
  dW = Gᵀ h: 2·2NHV flops (4 GEMMs of 2NHV for fwd+bwd; a chunked backward that recomputes
  the logits does two more), reading the same and writing dh, dW: (4NH + 4VH)·e. The (N, V)
  logits are never written.
"""

from __future__ import annotations

from dataclasses import dataclass

from kdfast.bench.shapes import EmbeddingShape, FeatureShape, LmHeadShape, LogitShape, MapShape


@dataclass(frozen=True)
class Floor:
    bytes: float
    flops: float

    def __add__(self, other: Floor) -> Floor:
        return Floor(self.bytes + other.bytes, self.flops + other.flops)

    def seconds(self, bytes_per_s: float, flops_per_s: float) -> float:
        return max(self.bytes / bytes_per_s, self.flops / flops_per_s)


def _modes(fwd: Floor, bwd: Floor) -> dict[str, Floor]:
    return {"fwd": fwd, "bwd": bwd, "full": fwd + bwd}


def _feature_sizes(shape: FeatureShape) -> tuple[int, int, int, int]:
    return shape.batch, shape.s_channels, shape.t_channels, shape.height * shape.width


def attention(shape: FeatureShape, e: int) -> dict[str, Floor]:
    b, m, n, d = _feature_sizes(shape)
    return _modes(Floor(b * (m + n) * d * e, 0), Floor(2 * b * m * d * e, 0))


def _mmd_bytes(shape: FeatureShape, e: int) -> tuple[float, float]:
    b, m, n, d = _feature_sizes(shape)
    return b * (m + n) * d * e, b * (2 * m + n) * d * e


def mmd_gram(shape: FeatureShape, e: int) -> dict[str, Floor]:
    b, m, n, d = _feature_sizes(shape)
    fwd_bytes, bwd_bytes = _mmd_bytes(shape, e)
    return _modes(Floor(fwd_bytes, b * (m + n) ** 2 * d), Floor(bwd_bytes, b * 2 * m * (m + n) * d))


def mmd_poly(shape: FeatureShape, e: int) -> dict[str, Floor]:
    b, m, n, d = _feature_sizes(shape)
    fwd_bytes, bwd_bytes = _mmd_bytes(shape, e)
    inner = min(m + n, d)
    return _modes(Floor(fwd_bytes, b * (m + n) * d * inner),
                  Floor(bwd_bytes, b * 2 * m * d * inner))


def mmd_linear(shape: FeatureShape, e: int) -> dict[str, Floor]:
    fwd_bytes, bwd_bytes = _mmd_bytes(shape, e)
    return _modes(Floor(fwd_bytes, 0), Floor(bwd_bytes, 0))


def similarity(shape: FeatureShape, e: int) -> dict[str, Floor]:
    b, m, n, d = _feature_sizes(shape)
    return _modes(Floor(b * (m + n) * d * e, b * b * (m + n) * d),
                  Floor(2 * b * m * d * e, 2 * b * b * m * d))


def fsp(shape: FeatureShape, e: int) -> dict[str, Floor]:
    b, m, n, d = _feature_sizes(shape)
    return _modes(Floor(2 * b * (m + n) * d * e, b * 4 * m * n * d),
                  Floor(2 * b * (m + n) * d * e, b * 4 * m * n * d))


def logit_kd(shape: LogitShape, e: int) -> dict[str, Floor]:
    size = shape.batch * shape.classes
    return _modes(Floor(2 * size * e, 0), Floor(3 * size * e, 0))


def channel_softmax_kl(shape: MapShape, e: int) -> dict[str, Floor]:
    """CWD: the forward reads both maps, the backward reads both and writes the student's
    gradient (the recomputing CPU backward's traffic; no GEMM)."""
    size = shape.batch * shape.channels * shape.height * shape.width
    return _modes(Floor(2 * size * e, 0), Floor(3 * size * e, 0))


def relational(shape: EmbeddingShape, e: int) -> dict[str, Floor]:
    b, ds, dt = shape.batch, shape.s_dim, shape.t_dim
    pairs = b ** 3 + b ** 2
    return _modes(Floor(b * (ds + dt) * e, pairs * (ds + dt)),
                  Floor(2 * b * ds * e, 2 * pairs * ds))


def fused_linear(shape: LmHeadShape, e: int) -> dict[str, Floor]:
    n, h, v = shape.tokens, shape.hidden, shape.vocab
    gemm, inputs = 2 * n * h * v, 2 * (n * h + v * h) * e
    return _modes(Floor(inputs, 2 * gemm), Floor(2 * inputs, 2 * gemm))
