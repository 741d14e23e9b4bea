"""Fused GEMM + reduce-scatter (T3): ``gemm_reduce_scatter``, ``GemmReduceScatter``,
the virtual-rank mode and ``virtual_gemm_reduce_scatter``.

Semantics everywhere: ``out = reduce_scatter_tensor(a @ b)`` along rows, i.e. rank
``r`` of ``W`` gets rows ``r * M/W : (r + 1) * M/W`` of ``sum_s a_s @ b_s``.

Paths (``GemmReduceScatter.path`` says which one a given object runs):

* ``"symm_mem"``: real ranks, one GPU each, NCCL group; peer-addressable buffers
  from ``torch.distributed._symmetric_memory`` (``empty`` + ``rendezvous`` +
  ``buffer_ptrs``), the fused kernel (csrc/tp/gemm_rs.cu) on every rank.
* ``"virtual"``: ``W`` ranks simulated on one GPU (tests and benchmarks): ``W``
  buffers on the device, each rank's kernel on its own stream with at most
  ``SMs / W`` blocks, so all ranks' spin-waiting kernels are resident at once.
* ``"local"``: one rank (no group, or a group of size 1): the fused kernel with
  its epilogue writing the output directly. Also CPU tensors under the SIMT
  executor backend (``inferops.testing.backend("simt")``), which runs the kernel;
  virtual ranks (W > 1) run there too, their W grids as one concurrent pool of
  fibers (``simt_concurrent_begin``/``end``), since they wait on each other.
* ``"fallback"``: matmul then ``dist.reduce_scatter_tensor`` (CPU / gloo, no
  symmetric memory, fp32, or no compiled kernel); ``fallback_reason`` says why.
* ``"reference"``: the PyTorch reference on one process (CPU tensors, or no kernel).

Kernel tiles are pushed in the input dtype (as a matmul followed by NCCL's
reduce-scatter would send them) and summed in fp32 in rank order.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings

import torch
import torch.distributed as dist

from .._core import ops
from .._core.demos import Demo, register_demo
from .._core.extension import build_info
from ..reference import tp as ref
from ..validation import check_dtype, check_same_device, check_tensor

__all__ = [
    "GemmReduceScatter",
    "buffer_bytes",
    "gemm_main_loop",
    "gemm_reduce_scatter",
    "symm_mem_status",
    "virtual_gemm_reduce_scatter",
]

KERNEL_DTYPES = (torch.float16, torch.bfloat16)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TILE_M = TILE_N = 128  # csrc/tp/tp.h kTileM / kTileN
STATE_WORDS = 8  # csrc/tp/tp.h kStateWords: epoch, done, error, error source, error tile
MAX_WORLD = 32
DEFAULT_TIMEOUT_S = float(os.environ.get("INFEROPS_TP_TIMEOUT_S", "5"))
_OP = "virtual_gemm_reduce_scatter"
GEMM_ENV = "INFEROPS_TP_GEMM"  # main loop of the kernel: "mma" (default) or "wgmma" (sm_90a, opt-in)
GEMM_MAIN_LOOPS = ("mma", "wgmma")


def gemm_main_loop() -> str:
    """The kernel's main loop selected by ``INFEROPS_TP_GEMM``: ``"mma"`` (default: unset or
    empty) or ``"wgmma"`` (experimental, sm_90a only, ``b = weight.t()`` only: a row-major
    ``[K, N]`` ``b`` always runs mma.sync). Read at every call, by csrc/tp/gemm_rs.cu too."""
    v = os.environ.get(GEMM_ENV, "")
    if v not in ("",) + GEMM_MAIN_LOOPS:
        raise ValueError(f"expected {GEMM_ENV} to be 'mma' or 'wgmma', got {v!r}")
    return v or "mma"


def _check_gemm_main_loop(device: torch.device) -> None:
    """Refuse INFEROPS_TP_GEMM=wgmma where the wgmma kernel cannot run, before any launch."""
    if gemm_main_loop() != "wgmma":
        return
    if device.type != "cuda":  # CPU tensors reach a kernel only on the SIMT executor, which models wgmma
        return
    archs = str(build_info().get("cuda_archs", "")).replace(";", ",").split(",")
    if "90a" not in archs:  # without the arch-specific target the kernel body is compiled out
        raise ValueError(f"expected an extension built for sm_90a (INFEROPS_CUDA_ARCHS with 90a) for "
                         f"{GEMM_ENV}=wgmma, got archs {build_info().get('cuda_archs')!r}")
    cap = torch.cuda.get_device_capability(device)
    if tuple(cap) != (9, 0):
        raise ValueError(f"expected an sm_90 (Hopper) device for {GEMM_ENV}=wgmma (wgmma is sm_90a only), "
                         f"got sm_{cap[0]}{cap[1]} on {device}")


def buffer_bytes(max_m: int, n: int, world: int, elem_bytes: int) -> int:
    """Bytes of one rank's symmetric buffer (mirror of ``buffer_layout`` in csrc/tp/tp.h):
    ``[2 parities][W][ceil(max_m / W) * n]`` partial tiles (each slot rounded up to 8
    elements, so slots stay 16-byte aligned when ``n`` is not a multiple of 8), then
    ``[2][W][tiles]`` uint32 flags, then ``[2][tiles]`` uint32 "reduced in the epilogue" marks."""
    m_local = -(-max_m // world)
    tiles = -(-max_m // TILE_M) * -(-n // TILE_N)
    slot = -(-(m_local * n) // 8) * 8
    data = 2 * world * slot * elem_bytes
    return -(-data // 128) * 128 + 2 * world * tiles * 4 + 2 * tiles * 4


def symm_mem_status() -> str | None:
    """None when ``torch.distributed._symmetric_memory`` has what the fused path needs,
    else why not."""
    try:
        from torch.distributed import _symmetric_memory as symm_mem
    except Exception as e:  # noqa: BLE001  (any import failure means: not available)
        return f"torch.distributed._symmetric_memory cannot be imported: {e}"
    missing = [n for n in ("empty", "rendezvous") if not hasattr(symm_mem, n)]
    if missing:
        return f"torch.distributed._symmetric_memory lacks {', '.join(missing)}"
    return None


# --- the registered op: W ranks' operands stacked on one device ----------------------------


@functools.cache
def _side_streams(device_index: int, world: int) -> tuple:
    return tuple(torch.cuda.Stream(device=device_index) for _ in range(world))


@functools.cache
def _sm_count(device_index: int) -> int:
    return int(ops.ext().device_info(device_index)["sm_count"])


# Blocks per rank on the SIMT executor: all W grids run as one pool of fibers (one per
# thread), so a few blocks per rank keep the pool small; the kernel is persistent (a block
# loops over tiles), so any count computes every tile.
_EXECUTOR_BLOCKS_PER_RANK = 2


def _executor_refusal(device: torch.device, world: int) -> str | None:
    """Why virtual ranks cannot run on ``device``'s kernels, or None. The SIMT executor
    (CPU tensors) runs the W ranks' grids concurrently, as one pool
    (``simt_concurrent_begin``/``simt_concurrent_end``): every rank's reduce phase waits
    for tiles the other ranks' grids push, so they must run together."""
    return None


@contextlib.contextmanager
def _concurrent_grids(ext, device: torch.device):
    """On the SIMT executor, the launches inside run together as one pool when the block
    ends (not one grid after another); nothing changes on a GPU (streams already overlap)."""
    if device.type == "cuda":
        yield
        return
    ext.simt_concurrent_begin()
    try:
        yield
    except BaseException:
        ext.simt_concurrent_end(False)
        raise
    ext.simt_concurrent_end(True)


def _virtual_cuda(a, b, workspace, state, peers, max_m, n_max, timeout_s):
    W, M, _ = a.shape
    if a.dtype not in KERNEL_DTYPES or _executor_refusal(a.device, W) is not None:
        return ref.gemm_reduce_scatter_stacked(a, b)  # no kernel for these: the op's reference
    a, b = a.detach(), b.detach()  # DLPack refuses tensors that require grad (inference op)
    N = b.shape[2]
    out = torch.empty((W, M // W, N), dtype=a.dtype, device=a.device)
    ext, dev = ops.ext(), a.device
    nbytes = workspace.shape[1] if workspace.dim() == 2 else 0
    if W == 1:
        ext.gemm_reduce_scatter(ops.dlpack(a[0]), ops.dlpack(b[0]), ops.dlpack(out[0]), ops.dlpack(peers),
                                ops.dlpack(state[0]), 0, 1, max_m, n_max, nbytes, timeout_s, 0,
                                ops.cuda_stream(dev))
        return out
    # One stream per rank, forked from and joined back into the caller's stream
    # (capturable in a CUDA graph). Each rank gets at most SMs / W blocks: the
    # kernels spin-wait on each other, so all W must be resident together.
    if dev.type != "cuda":  # the SIMT executor: the W grids as one pool of fibers
        with _concurrent_grids(ext, dev):
            for r in range(W):
                ext.gemm_reduce_scatter(ops.dlpack(a[r]), ops.dlpack(b[r]), ops.dlpack(out[r]), ops.dlpack(peers),
                                        ops.dlpack(state[r]), r, W, max_m, n_max, nbytes, timeout_s,
                                        _EXECUTOR_BLOCKS_PER_RANK, ops.cuda_stream(dev))
        return out
    main = torch.cuda.current_stream(dev)
    streams = _side_streams(dev.index, W)
    blocks = max(1, _sm_count(dev.index) // W)
    for r, s in enumerate(streams):
        s.wait_stream(main)
        ext.gemm_reduce_scatter(ops.dlpack(a[r]), ops.dlpack(b[r]), ops.dlpack(out[r]), ops.dlpack(peers),
                                ops.dlpack(state[r]), r, W, max_m, n_max, nbytes, timeout_s, blocks,
                                s.cuda_stream)
    for s in streams:
        main.wait_stream(s)
    return out


def _virtual_fake(a, b, workspace, state, peers, max_m, n_max, timeout_s):
    W, M, _ = a.shape
    return a.new_empty((W, M // W, b.shape[2]))


@ops.register_op(_OP, family="tp", mutates_args=("workspace", "state"), fake=_virtual_fake,
                 cuda_impl=_virtual_cuda, cuda_kernel="gemm_reduce_scatter")
def _virtual_op(a: torch.Tensor, b: torch.Tensor, workspace: torch.Tensor, state: torch.Tensor,
                peers: torch.Tensor, max_m: int, n_max: int, timeout_s: float) -> torch.Tensor:
    return ref.gemm_reduce_scatter_stacked(a, b)


# --- validation (every check runs before anything is launched) ------------------------------


def _kernel_layout_checks(a: torch.Tensor, b: torch.Tensor) -> None:
    K, N = b.shape[-2], b.shape[-1]
    if K % 8 or N % 8:
        raise ValueError(f"expected K and N multiples of 8 for the fused kernel, got K={K}, N={N}")
    if a.stride(-1) != 1 or a.stride(-2) % 8 or a.data_ptr() % 16:
        raise ValueError(f"expected `a` contiguous in its last dim with 16-byte aligned rows, got strides "
                         f"{list(a.stride())}")
    if not (b.stride(-1) == 1 and b.stride(-2) % 8 == 0) and not (b.stride(-2) == 1 and b.stride(-1) % 8 == 0):
        raise ValueError("expected `b` [K, N] row-major or the transpose of a row-major [N, K] weight "
                         f"(16-byte aligned rows), got strides {list(b.stride())}")
    if b.data_ptr() % 16:
        raise ValueError("expected `b` 16-byte aligned")


class GemmReduceScatter:
    """Owns the symmetric buffers for ``M <= max_m`` rows and ``N <= n`` columns and
    runs ``reduce_scatter_tensor(a @ b)`` on them; build once, call for every layer.

    Args:
        group: a ``torch.distributed`` process group; None: the default group when
            one is initialised, else a single rank.
        max_m: most rows (tokens) of ``a`` per call, over all ranks (the full M).
        n: most output columns (``out_features``).
        dtype: of ``a``, ``b`` and the output: bf16 / fp16 (kernel) or fp32 (fallback only).
        device: defaults to the current CUDA device when CUDA is available, else CPU.
        timeout_s: a kernel waiting longer than this for a peer's tile gives up and
            records the error (read by :meth:`check`).
        check_every_call: call :meth:`check` after every call (a host sync; debug only).

    Buffer memory per rank: ``2 * max_m * n`` elements plus flags (see docs/tp.md).
    Building it is collective (all ranks of ``group``, same arguments).
    """

    def __init__(self, group=None, max_m: int = 8192, n: int = 8192, dtype: torch.dtype = torch.bfloat16,
                 device=None, *, timeout_s: float = DEFAULT_TIMEOUT_S, check_every_call: bool = False) -> None:
        if group is None and dist.is_available() and dist.is_initialized():
            group = dist.group.WORLD
        self.group = group
        world = dist.get_world_size(group) if group is not None else 1
        rank = dist.get_rank(group) if group is not None else 0
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        self._setup(world, rank, max_m, n, dtype, torch.device(device), timeout_s, check_every_call, False)
        if world == 1:
            self._alloc_local(1)
            return
        reason = self._fused_unavailable_reason()
        if "nccl" in str(dist.get_backend(group)):  # every rank must take the same path, or peers hang
            dev = self.device if self.device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
            ok = torch.tensor([int(reason is None)], device=dev)
            dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=group)
            if reason is None and not int(ok.item()):
                reason = "another rank cannot use the fused path"
        self.fallback_reason = reason
        if reason is None:
            try:
                self._alloc_symm_mem()
                self.path = "symm_mem"
            except Exception as e:  # noqa: BLE001  (any failure of the optional engine: fall back)
                self.fallback_reason = f"symmetric memory setup failed: {type(e).__name__}: {e}"
        if self.path != "symm_mem":
            self.path = "fallback"

    @classmethod
    def virtual(cls, world_size: int, max_m: int, n: int, dtype: torch.dtype = torch.bfloat16, device=None, *,
                timeout_s: float = DEFAULT_TIMEOUT_S, check_every_call: bool = False) -> GemmReduceScatter:
        """``world_size`` ranks on one device: call with ``a`` ``[W, M, K]`` and ``b``
        ``[W, K, N]`` (rank r's operands at index r); returns ``[W, M / W, N]``."""
        if not isinstance(world_size, int) or not 1 <= world_size <= MAX_WORLD:
            raise ValueError(f"expected world_size in 1..{MAX_WORLD}, got {world_size!r}")
        self = cls.__new__(cls)
        self.group = None
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        self._setup(world_size, 0, max_m, n, dtype, torch.device(device), timeout_s, check_every_call, True)
        self._alloc_local(world_size)
        return self

    # --- construction helpers ---------------------------------------------------------------

    def _setup(self, world, rank, max_m, n, dtype, device, timeout_s, check_every_call, virtual) -> None:
        if not isinstance(max_m, int) or max_m < 1:
            raise ValueError(f"expected max_m >= 1, got {max_m!r}")
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"expected n >= 1, got {n!r}")
        if dtype not in _DTYPES:
            raise TypeError(f"expected dtype float16, bfloat16 or float32 for `dtype`, got {dtype}")
        if not timeout_s > 0:
            raise ValueError(f"expected timeout_s > 0, got {timeout_s!r}")
        if world > MAX_WORLD:
            raise ValueError(f"expected a world size <= {MAX_WORLD}, got {world}")
        if device.type == "cuda" and device.index is None:  # "cuda" means the current device
            device = torch.device("cuda", torch.cuda.current_device())
        self.world_size, self.rank, self.max_m, self.n = world, rank, max_m, n
        self.dtype, self.device, self.timeout_s = dtype, device, float(timeout_s)
        self.check_every_call = check_every_call or os.environ.get("INFEROPS_TP_CHECK", "") not in ("", "0")
        self.is_virtual = virtual
        self.fallback_reason: str | None = None
        self.path = "reference"
        self.workspace = self.state = self.peers = None
        self._symm_handle = None

    def _kernel_usable(self, world: int) -> bool:
        """The kernel runs for this object's tensors: a CUDA device with the compiled kernel,
        or CPU tensors under the SIMT backend (``inferops.testing.backend("simt")``), one rank
        or virtual ranks (their grids run as one concurrent pool there)."""
        return (self.dtype in KERNEL_DTYPES and ops.kernel_backend(_OP, self.device) in ("cuda", "simt")
                and _executor_refusal(self.device, world) is None)

    def _fused_unavailable_reason(self) -> str | None:
        if self.device.type != "cuda":
            return f"tensors on {self.device}"
        if self.dtype not in KERNEL_DTYPES:
            return f"no kernel for dtype {self.dtype}"
        if ops.kernel_backend(_OP, self.device) != "cuda":
            return "the gemm_reduce_scatter CUDA kernel is not available in this build"
        backend = str(dist.get_backend(self.group))
        if "nccl" not in backend:
            return f"process group backend {backend!r} (symmetric memory needs NCCL)"
        return symm_mem_status()

    def _alloc_local(self, world: int) -> None:
        """Buffers of ``world`` ranks on this device (virtual mode, or one rank)."""
        dev = self.device
        if not self._kernel_usable(world):
            self.path = "reference"
            kernel = ops.kernel_backend(_OP, dev) != "reference"  # the CUDA kernel, or the executor's
            if dev.type != "cuda" and not kernel:
                self.fallback_reason = f"tensors on {dev}"
            elif self.dtype not in KERNEL_DTYPES:
                self.fallback_reason = f"no kernel for dtype {self.dtype}"
            elif kernel:
                self.fallback_reason = f"{world} virtual ranks on {dev}: {_executor_refusal(dev, world)}"
            else:
                self.fallback_reason = "the gemm_reduce_scatter CUDA kernel is not available in this build"
            self.workspace = torch.zeros((world, 0), dtype=torch.uint8, device=dev)
            self.state = torch.zeros((world, STATE_WORDS), dtype=torch.int32, device=dev)
            self.peers = torch.zeros((world,), dtype=torch.int64, device=dev)
            return
        per = 0 if world == 1 else -(-buffer_bytes(self.max_m, self.n, world, self.dtype.itemsize) // 256) * 256
        self.workspace = torch.zeros((world, per), dtype=torch.uint8, device=dev)
        self.state = torch.zeros((world, STATE_WORDS), dtype=torch.int32, device=dev)
        self.peers = torch.tensor([self.workspace[r].data_ptr() for r in range(world)], dtype=torch.int64,
                                  device=dev)
        self.path = "virtual" if self.is_virtual and world > 1 else "local"

    def _alloc_symm_mem(self) -> None:
        from torch.distributed import _symmetric_memory as symm_mem

        enable = getattr(symm_mem, "enable_symm_mem_for_group", None)  # needed before torch 2.8 (no-op after)
        if enable is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                enable(self.group.group_name)
        nbytes = buffer_bytes(self.max_m, self.n, self.world_size, self.dtype.itemsize)
        buf = symm_mem.empty(nbytes, dtype=torch.uint8, device=self.device)
        buf.zero_()  # flags start at 0 < every epoch
        handle = symm_mem.rendezvous(buf, self.group)
        ptrs = [int(p) for p in handle.buffer_ptrs]
        if len(ptrs) != self.world_size:
            raise RuntimeError(f"rendezvous returned {len(ptrs)} buffers for a group of {self.world_size}")
        self._symm_handle, self._symm_buf = handle, buf
        self.workspace = buf.view(1, -1)
        self.state = torch.zeros((1, STATE_WORDS), dtype=torch.int32, device=self.device)
        self.peers = torch.tensor(ptrs, dtype=torch.int64, device=self.device)
        torch.cuda.synchronize(self.device)
        dist.barrier(group=self.group)  # every buffer zeroed before any peer pushes into it

    # --- calls ------------------------------------------------------------------------------

    def _validate(self, a, b, out, group) -> tuple[int, int, int]:
        check_tensor("a", a)
        check_tensor("b", b)
        check_dtype("a", a, (self.dtype,))
        check_dtype("b", b, (a.dtype,))
        if group is not None:
            gw = dist.get_world_size(group)
            if gw != self.world_size:
                raise ValueError(f"expected a group of size {self.world_size} (the buffers' world size), "
                                 f"got a group of size {gw}")
        if self.is_virtual:
            if a.dim() != 3 or b.dim() != 3:
                raise ValueError(f"expected `a` [W, M, K] and `b` [W, K, N] in virtual mode, got "
                                 f"{list(a.shape)} and {list(b.shape)}")
            if a.shape[0] != self.world_size or b.shape[0] != self.world_size:
                raise ValueError(f"expected W = {self.world_size} (the buffers' world size) stacked ranks in "
                                 f"`a` and `b`, got {a.shape[0]} and {b.shape[0]}")
        elif a.dim() != 2 or b.dim() != 2:
            raise ValueError(f"expected `a` [M, K] and `b` [K, N], got {list(a.shape)} and {list(b.shape)}")
        M, K = a.shape[-2], a.shape[-1]
        if b.shape[-2] != K:
            raise ValueError(f"expected `b` of shape [K, N] with K = {K} (a.shape[-1]), got {list(b.shape)}")
        N = b.shape[-1]
        W = self.world_size
        if M % W:
            raise ValueError(f"expected M = {M} (rows of `a`) divisible by the world size {W}")
        if M > self.max_m or N > self.n:
            raise ValueError(f"expected M <= {self.max_m} and N <= {self.n} (the buffers' shape), got M = {M}, "
                             f"N = {N}")
        check_same_device({"a": a, "b": b})
        if self.path in ("symm_mem", "virtual", "local") and a.device != self.device:
            raise ValueError(f"expected `a` on {self.device} (the buffers' device), got {a.device}")
        if out is not None:
            check_tensor("out", out)
            check_dtype("out", out, (a.dtype,))
            want = (W, M // W, N) if self.is_virtual else (M // W, N)
            if tuple(out.shape) != want:
                raise ValueError(f"expected shape {list(want)} for `out`, got {list(out.shape)}")
            if out.device != a.device:
                raise ValueError(f"expected `out` on {a.device}, got {out.device}")
        if self.path in ("symm_mem", "virtual", "local"):
            _check_gemm_main_loop(a.device)
            if a.dim() == 3:
                for r in range(W):
                    _kernel_layout_checks(a[r], b[r])
            else:
                _kernel_layout_checks(a, b)
        return M, K, N

    def __call__(self, a: torch.Tensor, b: torch.Tensor, *, out: torch.Tensor | None = None,
                 group=None) -> torch.Tensor:
        """``reduce_scatter_tensor(a @ b)`` along rows.

        Args:
            a: ``[M, K_local]`` (virtual mode: ``[W, M, K_local]``), the buffers' dtype,
                contiguous in the last dim; ``M <= max_m``, ``M % W == 0``.
            b: ``[K_local, N]`` (virtual: ``[W, K_local, N]``), row-major or the transpose
                of a row-major ``[N, K_local]`` weight (``weight.t()``); ``N <= n``.
            out: optional ``[M / W, N]`` (virtual: ``[W, M / W, N]``) to write into.
            group: optional; when given its size must equal the buffers' world size.

        Returns ``[M / W, N]`` (virtual: ``[W, M / W, N]``) in a's dtype.
        """
        self._validate(a, b, out, group)
        if self.path == "fallback":
            return ref.gemm_reduce_scatter_fallback(a, b, self.group, out=out)
        if self.path == "symm_mem":
            res = self._call_symm_mem(a, b)
        else:
            stacked = (a, b) if self.is_virtual else (a[None], b[None])
            res = torch.ops.inferops.virtual_gemm_reduce_scatter(
                stacked[0], stacked[1], self.workspace, self.state, self.peers, self.max_m, self.n, self.timeout_s)
            if not self.is_virtual:
                res = res[0]
        if self.check_every_call:
            self.check()
        if out is not None:
            out.copy_(res)
            return out
        return res

    def _call_symm_mem(self, a, b):
        a, b = a.detach(), b.detach()  # DLPack refuses tensors that require grad (inference op)
        M, N = a.shape[0], b.shape[1]
        out = torch.empty((M // self.world_size, N), dtype=a.dtype, device=a.device)
        # The kernel spin-waits on peers, so it runs with every block resident (grid
        # sized by occupancy in the launcher); a graph break under torch.compile.
        ops.ext().gemm_reduce_scatter(
            ops.dlpack(a), ops.dlpack(b), ops.dlpack(out), ops.dlpack(self.peers), ops.dlpack(self.state[0]),
            self.rank, self.world_size, self.max_m, self.n, self.workspace.shape[1], self.timeout_s, 0,
            ops.cuda_stream(a.device))
        return out

    # --- errors and recovery ----------------------------------------------------------------

    def check(self) -> None:
        """Raise RuntimeError if a kernel of this object timed out waiting for a peer.

        One host sync (reads the per-rank state). Call it after a run, or pass
        ``check_every_call=True`` / set ``INFEROPS_TP_CHECK=1`` while debugging. After
        an error the buffers are out of step: call :meth:`reset` (on every rank).
        """
        if self.state is None or self.path in ("fallback", "reference"):
            return
        st = self.state.cpu()
        for r in range(st.shape[0]):
            if int(st[r, 2]) != 0:
                rank = r if self.is_virtual else self.rank
                raise RuntimeError(
                    f"gemm_reduce_scatter: rank {rank} timed out after {self.timeout_s} s waiting for rank "
                    f"{int(st[r, 3])} to publish tile {int(st[r, 4])} (the peer never arrived); its output is "
                    f"incomplete. Call reset() on every rank before using these buffers again.")

    def reset(self) -> None:
        """Zero flags, epochs and errors (collective on real ranks). No call may be in flight."""
        if self.state is None or self.path in ("fallback", "reference"):
            return
        _synchronize(self.device)
        if self.path == "symm_mem":
            dist.barrier(group=self.group)
        self.workspace.zero_()
        self.state.zero_()
        _synchronize(self.device)
        if self.path == "symm_mem":
            dist.barrier(group=self.group)

    def __repr__(self) -> str:
        return (f"GemmReduceScatter(path={self.path!r}, world_size={self.world_size}, rank={self.rank}, "
                f"max_m={self.max_m}, n={self.n}, dtype={self.dtype}, device={self.device})")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":  # the SIMT executor (CPU tensors) runs every launch to completion
        torch.cuda.synchronize(device)


# --- functional forms ---------------------------------------------------------------------------

_ENGINES: dict = {}


def _engine_for(key, make, m: int):
    eng = _ENGINES.get(key)
    if eng is None or eng.max_m < m:
        _ENGINES.pop(key, None)  # release the old buffers before allocating bigger ones
        eng = make(max(m, eng.max_m * 2 if eng is not None else m))
        _ENGINES[key] = eng
    return eng


def gemm_reduce_scatter(a: torch.Tensor, b: torch.Tensor, group=None, *,
                        out: torch.Tensor | None = None) -> torch.Tensor:
    """``reduce_scatter_tensor(a @ b)`` along rows on ``group`` (None: the default group,
    or a single rank when torch.distributed is not initialised).

    ``a``: ``[M, K_local]``, ``b``: ``[K_local, N]`` (row-major or ``weight.t()``), same dtype;
    returns ``[M / W, N]``. Keeps one :class:`GemmReduceScatter` per (group, device, dtype,
    N) and grows it when M grows (collective: every rank calls with the same shapes). For
    CUDA-graph capture or explicit buffer sizing, build a ``GemmReduceScatter`` instead.
    """
    check_tensor("a", a)
    check_tensor("b", b)
    check_dtype("a", a, _DTYPES)
    if group is None and dist.is_available() and dist.is_initialized():
        group = dist.group.WORLD
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(f"expected `a` [M, K] and `b` [K, N], got {list(a.shape)} and {list(b.shape)}")
    n = b.shape[1]
    # the backend too: an engine sizes its buffers for the path it chose (none for the
    # reference), so one built before a switch to the executor must not be reused after it
    key = (id(group), a.device, a.dtype, n, ops.kernel_backend(_OP, a.device))
    eng = _engine_for(key, lambda m: GemmReduceScatter(group, m, n, a.dtype, a.device), a.shape[0])
    return eng(a, b, out=out, group=group)


def virtual_gemm_reduce_scatter(a: torch.Tensor, b: torch.Tensor, *,
                                out: torch.Tensor | None = None) -> torch.Tensor:
    """Virtual ranks on one device: ``a`` ``[W, M, K]``, ``b`` ``[W, K, N]`` -> ``[W, M / W, N]``,
    ``out[r] = sum_s (a[s] @ b[s])[r * M/W : (r + 1) * M/W]``. Keeps one virtual
    :class:`GemmReduceScatter` per (device, W, dtype, N)."""
    check_tensor("a", a)
    check_tensor("b", b)
    check_dtype("a", a, _DTYPES)
    if a.dim() != 3:
        raise ValueError(f"expected `a` [W, M, K], got {list(a.shape)}")
    W, n = a.shape[0], b.shape[-1]
    key = ("virtual", W, a.device, a.dtype, n, ops.kernel_backend(_OP, a.device))
    eng = _engine_for(key, lambda m: GemmReduceScatter.virtual(W, m, n, a.dtype, a.device), a.shape[1])
    return eng(a, b, out=out)


# --- main-job demo --------------------------------------------------------------------------------
# One rank (the protocol-free path: GEMM with the fused epilogue), so the shared output
# tolerance applies; W > 1 rounds each rank's partial to bf16 before the sum, which
# the GPU tests check against the same-precision sequential error (tests/tp/).


def _demo_shape(device):
    return (4096, 4096, 4096) if device.type == "cuda" else (256, 256, 128)  # M, K, N


def _demo_inputs(device, g):
    M, K, N = _demo_shape(device)
    a = (torch.randn(1, M, K, generator=g) * K ** -0.5).to(device, torch.bfloat16)
    w = torch.randn(1, N, K, generator=g).to(device, torch.bfloat16)
    return a, w.transpose(1, 2)  # b = weight^T, as RowParallelLinear passes it


register_demo(Demo(
    op=_OP,
    sizes=lambda dv: "W=1 M={} K={} N={}".format(*_demo_shape(dv)),
    make_inputs=_demo_inputs,
    run=virtual_gemm_reduce_scatter,
    baseline=lambda a, b: torch.matmul(a[0], b[0])[None],
    reference64=lambda a, b: ref.gemm_reduce_scatter_stacked(a.double(), b.double(), round_partials=False,
                                                             compute_dtype=torch.float64),
    dtype=torch.bfloat16,
))
