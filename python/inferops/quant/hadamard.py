"""Hadamard matrices of order n = m * 2^k and the online rotation ``hadamard_quantize``.

Construction (deterministic, cached, built in Python with integer arithmetic):

* ``2^k``: Sylvester, ``H_2k = [[H, H], [H, -H]]`` (symmetric).
* ``m`` in :data:`DENSE_ORDERS` = {12, 20, 28, 108, 344}: Paley construction I for a
  prime power ``q = m - 1 = 3 (mod 4)`` (11, 19, 27 = 3^3, 107, 343 = 7^3). With
  ``chi`` the quadratic character of GF(q) and the Jacobsthal matrix
  ``Q[a, b] = chi(a - b)`` (antisymmetric because -1 is a non-square when
  q = 3 mod 4), ``S = [[0, 1^T], [-1, Q]]`` and ``H = I + S``; then
  ``H H^T = (q + 1) I``. GF(p^3) is built as polynomials over GF(p) modulo the
  first monic irreducible cubic in lexicographic order, so the matrix is the same
  on every machine.
* ``n = m * 2^k``: ``H_n = kron(H_m, H_{2^k})``. Index ``i = a * 2^k + b``: a row ``x``
  viewed as ``X [m, 2^k]`` maps to ``H_m^T X H_{2^k}``, which is what the kernel
  computes (fast Walsh-Hadamard transform along ``b`` and the dense ``m x m`` factor
  along ``a``; the factors commute: m <= 28 applies the FWHT first, m = 108 / 344 the
  dense factor first, on tensor cores).

11008 (Llama-2 7B intermediate size) = 172 * 64 in the usual QuaRot tables; an
order-172 Hadamard matrix needs Williamson-type constructions, so here
11008 = 344 * 32 uses the Paley matrix of order 344 instead. Any Hadamard matrix
gives an orthogonal rotation; a model must be rotated and run with the same one
(use :func:`hadamard_matrix` to fuse it into weights).

The rotation applied is ``x @ H_n / sqrt(n)`` (orthonormal).
"""

from __future__ import annotations

import functools
import itertools
import math

import torch

from .._core import ops
from .._core.demos import Demo, register_demo
from ..reference import quant_w8a8 as ref
from ..validation import check_dtype, check_tensor

__all__ = [
    "DENSE_ORDERS",
    "MAX_HADAMARD_N",
    "dense_factor",
    "dense_factor_fragments",
    "hadamard_factorization",
    "hadamard_matrix",
    "hadamard_quantize",
    "hadamard_transform",
    "prepare_hadamard",
    "supported_hadamard_sizes",
]

# Orders of the dense factors (Paley I, q = m - 1).
DENSE_ORDERS = (12, 20, 28, 108, 344)
_PALEY_Q = {12: (11, 1), 20: (19, 1), 28: (3, 3), 108: (107, 1), 344: (7, 3)}  # m -> (p, k), q = p^k
MAX_HADAMARD_N = 1 << 15  # powers of two up to 32768; m * 2^k up to m * 32768 / 8 (see below)
_MAX_DENSE_N = 1 << 15    # m * 2^k <= 32768 as well (covers 28672 = 28 * 1024)


# --- GF(p^k) and the Paley construction ---------------------------------------------------


def _poly_mulmod(a, b, mod, p):
    """(a * b) mod `mod` over GF(p); polynomials as coefficient tuples, lowest degree first."""
    k = len(mod) - 1
    prod = [0] * (2 * k - 1)
    for i, ai in enumerate(a):
        if ai:
            for j, bj in enumerate(b):
                prod[i + j] = (prod[i + j] + ai * bj) % p
    for d in range(len(prod) - 1, k - 1, -1):  # reduce with the monic modulus
        c = prod[d]
        if c:
            for j in range(k + 1):
                prod[d - k + j] = (prod[d - k + j] - c * mod[j]) % p
    return tuple(prod[:k])


def _irreducible(p, k):
    """First monic irreducible polynomial of degree k over GF(p) (k <= 3: no roots)."""
    if k == 1:
        return (0, 1)
    for low in itertools.product(range(p), repeat=k):
        mod = (*low, 1)
        if low[0] == 0:
            continue
        if all(sum(c * pow(x, i, p) for i, c in enumerate(mod)) % p for x in range(p)):
            return mod
    raise AssertionError(f"no irreducible polynomial of degree {k} over GF({p})")


def _quadratic_character(p, k):
    """chi over GF(p^k) as a list indexed by the element's base-p integer encoding."""
    q = p**k
    if k == 1:
        chi = [-1] * q
        chi[0] = 0
        for x in range(1, p):
            chi[x * x % p] = 1
        return chi
    mod = _irreducible(p, k)
    elems = [tuple((e // p**i) % p for i in range(k)) for e in range(q)]
    chi = [-1] * q
    chi[0] = 0
    for e in elems[1:]:
        sq = _poly_mulmod(e, e, mod, p)
        chi[sum(c * p**i for i, c in enumerate(sq))] = 1
    return chi


def _paley_matrix(m):
    p, k = _PALEY_Q[m]
    q = p**k
    chi = _quadratic_character(p, k)
    digits = torch.tensor([[(e // p**i) % p for i in range(k)] for e in range(q)])
    diff = (digits[:, None, :] - digits[None, :, :]) % p  # a - b digit-wise = field subtraction
    idx = (diff * torch.tensor([p**i for i in range(k)])).sum(-1)
    jac = torch.tensor(chi)[idx]  # Jacobsthal matrix Q[a, b] = chi(a - b)
    s = torch.zeros(q + 1, q + 1, dtype=torch.long)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = jac
    return s + torch.eye(q + 1, dtype=torch.long)


@functools.cache
def _dense_factor(m: int) -> torch.Tensor:
    if m == 1:
        return torch.ones(1, 1, dtype=torch.int8)
    return _paley_matrix(m).to(torch.int8)


def dense_factor(m: int) -> torch.Tensor:
    """``H_m`` (int8 +-1, ``[m, m]``, cached) for ``m`` = 1 or one of :data:`DENSE_ORDERS`."""
    if m != 1 and m not in DENSE_ORDERS:
        raise ValueError(f"expected a dense Hadamard order in {list(DENSE_ORDERS)}, got {m}")
    return _dense_factor(m)


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.int8)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def supported_hadamard_sizes() -> str:
    return (f"2^k (2 <= n <= {MAX_HADAMARD_N}) or m * 2^k <= {_MAX_DENSE_N} with m in "
            f"{list(DENSE_ORDERS)}, e.g. 4096, 5120 = 20*256, 8192, 11008 = 344*32, "
            f"13824 = 108*128, 14336 = 28*512, 28672 = 28*1024")


def hadamard_factorization(n: int) -> tuple[int, int]:
    """``(m, p)`` with ``n = m * p``, ``p`` a power of two and ``m`` 1 or a dense order.

    The power-of-two part is taken whole (``m`` = n / p must be 1 or in DENSE_ORDERS).
    Raises ValueError naming the supported sizes otherwise.
    """
    if not isinstance(n, int) or isinstance(n, bool):
        raise TypeError(f"expected an int for `n`, got {type(n).__name__}")
    if n >= 2 and n & (n - 1) == 0 and n <= MAX_HADAMARD_N:
        return 1, n
    for m in DENSE_ORDERS:
        if n % m == 0 and n <= _MAX_DENSE_N:
            p = n // m
            if p >= 1 and p & (p - 1) == 0:
                return m, p
    raise ValueError(f"expected a Hadamard size `n` = {supported_hadamard_sizes()}; got {n}")


def _hadamard_int8(n: int) -> torch.Tensor:
    # Not cached: n^2 bytes (822 MB at n = 28672); only the small factors are cached.
    m, p = hadamard_factorization(n)
    return torch.kron(_dense_factor(m), _sylvester(p))


def hadamard_matrix(n: int, *, dtype: torch.dtype = torch.float64, normalized: bool = False,
                    device=None) -> torch.Tensor:
    """The ``[n, n]`` Hadamard matrix (entries +-1, ``H H^T = n I``) that the kernels apply.

    ``normalized=True`` returns ``H / sqrt(n)`` (orthogonal), the rotation ``hadamard_quantize``
    applies; fuse it into the next layer's weights with ``fuse_rotation``.
    """
    h = _hadamard_int8(n).to(device=device, dtype=dtype)
    return h / math.sqrt(n) if normalized else h


def _tc_pad(m: int) -> int:
    return (m + 15) // 16 * 16


def _tc_stride(p: int) -> int:
    return p + (16 if p == 8 else 8)


def dense_factor_fragments(m: int) -> torch.Tensor:
    """``H_m^T`` as tensor-core A-fragment sign words (int32 ``[m16 / 16, ceil(m16 / 64), 32]``,
    ``m16`` = m rounded up to 16), the operand of the CUDA kernel for m = 108 and 344.

    For the mma.sync m16n8k16 A tile (rows c, columns k) of row tile ``ct`` and k-tile
    ``kt = 4 kw + t``, lane ``l`` (``g = l // 4``, ``q = l % 4``) holds 4 registers of two
    values: register ``i`` = ``A[r_i, k_i]``, ``A[r_i, k_i + 1]`` with ``r = (g, g + 8, g, g + 8)``
    and ``k = (2q, 2q, 2q + 8, 2q + 8)``. Word ``[ct, kw, l]`` has the sign of the first (second)
    value at bit ``15 - (4 t + i)`` (``31 - (4 t + i)``); ``A[c, k] = H_m[k, c]``, +1 where padded.
    The kernel rebuilds register i as ``ONE | ((word << (4 t + i)) & 0x80008000)``.
    """
    h = _dense_factor(m).long()
    m16 = _tc_pad(m)
    ht = torch.ones(m16, m16, dtype=torch.long)
    ht[:m, :m] = h.t()  # A[c, k] = H_m[k, c]
    neg = (ht < 0).long()
    n_ct, n_kw = m16 // 16, (m16 // 16 + 3) // 4
    lane = torch.arange(32)
    g, q = lane // 4, lane % 4
    words = torch.zeros(n_ct, n_kw, 32, dtype=torch.long)
    for ct in range(n_ct):
        for kt in range(m16 // 16):
            kw, t = divmod(kt, 4)
            for i, (dr, dk) in enumerate(((0, 0), (8, 0), (0, 8), (8, 8))):
                r = ct * 16 + g + dr
                k = kt * 16 + 2 * q + dk
                shift = 4 * t + i
                words[ct, kw] |= neg[r, k] << (15 - shift)
                words[ct, kw] |= neg[r, k + 1] << (31 - shift)
    words = torch.where(words >= 2**31, words - 2**32, words)  # as int32 bit patterns
    return words.to(torch.int32)


def _dense_factor_for_kernel(m: int, device: torch.device) -> torch.Tensor:
    """The ``hm`` operand of the kernel: ``H_m`` int8 ``[m, m]`` on the host for m <= 28
    (copied into the kernel parameters at launch); for m = 108, 344 the tensor-core sign
    words (:func:`dense_factor_fragments`) on ``device`` (cached per device)."""
    return _dense_factor(m) if m <= 28 else _dense_factor_cached(m, str(device))


@functools.cache
def _dense_factor_cached(m: int, device: str) -> torch.Tensor:
    return dense_factor_fragments(m).to(device).contiguous()


def prepare_hadamard(n: int, device: torch.device | str) -> None:
    """Build and cache on ``device`` what :func:`hadamard_quantize` needs for size ``n`` (the
    tensor-core sign words for m = 108 / 344, copied to the device once), so that the first
    call may be inside a CUDA-graph capture. Validates ``n``. No-op on CPU devices."""
    m, _ = hadamard_factorization(n)
    device = torch.device(device)
    if device.type == "cuda" and m > 28:
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        _dense_factor_cached(m, str(device))


# --- public ops ----------------------------------------------------------------------------

_IN_DTYPES = (torch.float16, torch.bfloat16)
_QUANT_DTYPES = {torch.int8: "int8", torch.float8_e4m3fn: "fp8"}


def _check_x(x, n_name="x"):
    check_tensor(n_name, x)
    check_dtype(n_name, x, _IN_DTYPES)
    if x.dim() < 1:
        raise ValueError(f"expected `{n_name}` with at least 1 dim [..., n], got a 0-dim tensor")
    n = x.shape[-1]
    hadamard_factorization(int(n))
    return n


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).contiguous()


def kernel_smem_bytes(n: int) -> int:
    """Shared memory the CUDA kernel needs for one row of size ``n`` (mirrors
    ``hadamard_smem_bytes`` in csrc/quant/quant.h)."""
    m, p = hadamard_factorization(n)
    if m <= 28:
        return 4 * n  # fp32 row (H_m travels in the kernel parameters)
    m16 = _tc_pad(m)
    # fp32 row, the fp16/bf16 row [m16][stride] for ldmatrix, the A-fragment sign words
    return 4 * n + 2 * m16 * _tc_stride(p) + 4 * 32 * (m16 // 16) * ((m16 // 16 + 3) // 4)


def _kernel_ok(n: int, device: torch.device) -> bool:
    """Sizes the kernel takes: 2^k >= 8 (its FWHT starts with an 8-point transform in
    registers) and the row fits in shared memory; others run the reference on the GPU."""
    if hadamard_factorization(n)[1] < 8:
        return False
    return kernel_smem_bytes(n) + 256 <= _smem_optin(device)  # + static shared memory


def _smem_optin(device: torch.device) -> int:
    """Opt-in shared memory per block of the device the kernel runs on (for CPU tensors, the
    SIMT executor's modelled sm_90)."""
    return int(ops.kernel_device_info(device)["max_smem_per_block_optin"])


def _hadamard_cuda(x: torch.Tensor, out_dtype: str):
    n = x.shape[-1]
    m, _ = hadamard_factorization(n)
    if not _kernel_ok(n, x.device):
        return _hadamard_ref(x, out_dtype)
    if x.data_ptr() % 16:  # the kernel loads 16-byte vectors
        x = x.clone()
    qdt = {"int8": torch.int8, "fp8": torch.float8_e4m3fn, "none": x.dtype}[out_dtype]
    out = torch.empty(x.shape, dtype=qdt, device=x.device)
    scale = torch.empty(x.shape[0] if out_dtype != "none" else 0, dtype=torch.float32, device=x.device)
    if x.shape[0] > 0:
        hm = None if m == 1 else ops.dlpack(_dense_factor_for_kernel(m, x.device))
        ops.ext().hadamard_quantize(ops.dlpack(x), hm, ops.dlpack(out), ops.dlpack(scale), m,
                                    ops.cuda_stream(x.device))
    return out, scale


def _hadamard_ref(x: torch.Tensor, out_dtype: str):
    if out_dtype == "none":
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32  # float64: gradcheck
        return (ref.hadamard_transform(x, compute_dtype=compute),
                torch.empty(0, dtype=torch.float32, device=x.device))
    qdt = torch.int8 if out_dtype == "int8" else torch.float8_e4m3fn
    return ref.hadamard_quantize(x, qdt)


def _hadamard_fake(x, out_dtype):
    qdt = {"int8": torch.int8, "fp8": torch.float8_e4m3fn, "none": x.dtype}[out_dtype]
    return (torch.empty(x.shape, dtype=qdt, device=x.device),
            torch.empty(x.shape[0] if out_dtype != "none" else 0, dtype=torch.float32, device=x.device))


@ops.register_op("hadamard_quantize", family="quant", fake=_hadamard_fake, cuda_impl=_hadamard_cuda)
def _hadamard_op(x: torch.Tensor, out_dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    out, scale = _hadamard_ref(x, out_dtype)
    return out.contiguous(), scale.contiguous()


def _hadamard_setup(ctx, inputs, output):
    ctx.out_dtype = inputs[1]


def _hadamard_backward(ctx, grad_out, grad_scale):
    """The rotation is linear and orthonormal: ``dx = dy @ (H_n / sqrt(n))^T``. The quantized
    outputs (int8 / fp8) have no useful derivative: QuantLinear's w8a8 path differentiates
    through w8a8_linear (straight-through) instead."""
    if ctx.out_dtype != "none":
        raise RuntimeError("hadamard_quantize with a quantized output (int8 / fp8) has no gradient; "
                           "differentiate the rotation alone (dtype=None) or use QuantLinear / w8a8_linear")
    compute = torch.float64 if grad_out.dtype == torch.float64 else torch.float32
    return ref.hadamard_rotate(grad_out, compute_dtype=compute, transpose=True).to(grad_out.dtype), None


_hadamard_op.register_autograd(_hadamard_backward, setup_context=_hadamard_setup)


def hadamard_quantize(x: torch.Tensor, dtype: torch.dtype | None = None):
    """Online Hadamard rotation ``x @ H_n / sqrt(n)`` per token, fused with per-token quantization.

    Args:
        x: ``[..., n]`` fp16 or bf16; ``n`` a supported Hadamard size
            (:func:`supported_hadamard_sizes`).
        dtype: ``torch.int8`` or ``torch.float8_e4m3fn``: quantize each rotated row
            symmetrically (as :func:`inferops.quant.quantize_per_token`); ``None``: return
            the rotated rows in x's dtype.

    Returns:
        ``(x_rot_q, scale)``: ``x_rot_q`` ``[..., n]`` int8 / fp8 e4m3 and ``scale``
        ``[...]`` fp32 with ``x @ H / sqrt(n) ~= x_rot_q * scale[..., None]``; or
        ``(x_rot, None)`` with ``x_rot`` ``[..., n]`` in x's dtype when ``dtype`` is None.
        Rotated values and the scale are computed in fp32 from the unrounded rotation.
    """
    n = _check_x(x)
    if dtype is not None and dtype not in _QUANT_DTYPES:
        raise TypeError(f"expected `dtype` torch.int8, torch.float8_e4m3fn or None, got {dtype}")
    lead = x.shape[:-1]
    out_dtype = "none" if dtype is None else _QUANT_DTYPES[dtype]
    out, scale = torch.ops.inferops.hadamard_quantize(_as_rows(x), out_dtype)
    out = out.reshape(*lead, n)
    return (out, None) if dtype is None else (out, scale.reshape(lead))


def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """``x @ H_n / sqrt(n)`` per token in x's dtype (``hadamard_quantize(x, None)[0]``)."""
    return hadamard_quantize(x, None)[0]


# --- main-job demo --------------------------------------------------------------------------


def _demo_shape(device):
    return (4096, 14336) if device.type == "cuda" else (8, 14336)


register_demo(Demo(
    op="hadamard_quantize",
    sizes=lambda d: "rotate only, M={} n={} (28*512)".format(*_demo_shape(d)),
    make_inputs=lambda d, g: (torch.randn(*_demo_shape(d), generator=g).to(d).bfloat16(),),
    run=hadamard_transform,
    baseline=ref.hadamard_transform,
    reference64=lambda x: ref.hadamard_rotate(x, compute_dtype=torch.float64),
    dtype=torch.bfloat16,
))
