"""The binding layer itself: DLPack views and the exceptions C++ checks raise.

These call inferops._C directly (no Python validation in front), so they show
that bad input reaching C++ becomes a clear Python exception, never a crash.
Inputs are CPU tensors: dtype and shape checks run before the device check,
and the device check rejects CPU tensors for a CUDA op.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.dlpack import to_dlpack

import inferops
from inferops._core.extension import extension

pytestmark = pytest.mark.skipif(extension() is None, reason="inferops._C not importable")


def _C():
    return extension()


def _args(v_dtype=torch.float16, T=4, H=2, D=16, lse_dtype=torch.float32):
    v_a = torch.randn(T, H, D).to(v_dtype)
    v_b = torch.randn(T, H, D).to(v_dtype)
    lse_a = torch.randn(T, H).to(lse_dtype)
    lse_b = torch.randn(T, H).to(lse_dtype)
    return dict(v_a=v_a, lse_a=lse_a, v_b=v_b, lse_b=lse_b,
                v_out=torch.empty_like(v_a), lse_out=torch.empty(T, H))


def _call(**tensors):
    caps = {k: (to_dlpack(v) if isinstance(v, torch.Tensor) else v) for k, v in tensors.items()}
    _C().merge_states(**caps, stream=0)


@pytest.mark.parametrize(
    "dtype,code",
    [(torch.float32, "float32"), (torch.float16, "float16"), (torch.bfloat16, "bfloat16"),
     (torch.int8, "int8"), (torch.uint8, "uint8"), (torch.int32, "int32"),
     (torch.int64, "int64"), (torch.bool, "bool"),
     (torch.float8_e4m3fn, "float8_e4m3fn"), (torch.float8_e5m2, "float8_e5m2")],
)
def test_tensor_info_dtypes(dtype, code):
    t = torch.zeros(3, 5, dtype=dtype)
    info = _C().tensor_info(to_dlpack(t))
    assert info["dtype"] == code
    assert info["shape"] == [3, 5] and info["strides"] == [5, 1]
    assert info["device"] == "cpu" and info["contiguous"] and not info["read_only"]
    assert info["data_ptr"] == t.data_ptr()


def test_tensor_info_strides_and_offset():
    base = torch.arange(60, dtype=torch.float32).reshape(3, 4, 5)
    view = base[1:, ::2, 1:4]  # byte offset, non-unit strides
    info = _C().tensor_info(to_dlpack(view))
    assert info["shape"] == [2, 2, 3]
    assert info["strides"] == [20, 10, 1]
    assert info["data_ptr"] == view.data_ptr()
    assert not info["contiguous"]


def test_tensor_info_empty_is_contiguous():
    for t in (torch.empty(0, dtype=torch.int32), torch.from_numpy(np.zeros(0, "int32")),
              torch.empty(3, 0, 5)):
        assert _C().tensor_info(to_dlpack(t))["contiguous"]


def test_tensor_info_versioned_capsule():
    t = torch.ones(2, 3)
    try:
        cap = t.__dlpack__(max_version=(1, 0))
    except TypeError:
        pytest.skip("this torch does not export versioned DLPack")
    info = _C().tensor_info(cap)
    assert info["shape"] == [2, 3] and info["dtype"] == "float32"


def test_valid_call_reaches_device_check():
    # Everything valid except the device: the last check must name it.
    with pytest.raises(ValueError, match=r"expected a CUDA tensor for `v_a`, got a tensor on cpu"):
        _call(**_args())


def test_bad_v_dtype():
    a = _args(v_dtype=torch.int32)
    with pytest.raises(TypeError, match=r"`v_a`.*got int32"):
        _call(**a)


def test_mismatched_v_dtype():
    a = _args()
    a["v_b"] = a["v_b"].to(torch.bfloat16)
    with pytest.raises(TypeError, match=r"expected dtype float16 for `v_b`, got bfloat16"):
        _call(**a)


def test_lse_not_fp32():
    a = _args(lse_dtype=torch.float16)
    with pytest.raises(TypeError, match=r"expected dtype float32 for `lse_a`, got float16"):
        _call(**a)


def test_bad_ndim():
    a = _args()
    a["v_a"] = a["v_a"].reshape(4, 32)
    with pytest.raises(ValueError, match=r"expected a 3-d tensor for `v_a`"):
        _call(**a)


def test_bad_shape():
    a = _args()
    a["lse_b"] = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"expected shape \[4, 2\] for `lse_b`, got \[4, 3\]"):
        _call(**a)


def test_non_contiguous_last_dim():
    a = _args(D=32)
    a["v_b"] = torch.randn(4, 2, 64, dtype=torch.float16)[..., ::2]
    with pytest.raises(ValueError, match=r"`v_b` contiguous in its last dimension"):
        _call(**a)


def test_consumed_capsule():
    a = _args()
    cap = to_dlpack(a["v_a"])
    torch.utils.dlpack.from_dlpack(cap)  # a consumer takes ownership and renames it
    caps = {k: to_dlpack(v) for k, v in a.items()}
    caps["v_a"] = cap
    with pytest.raises(ValueError, match=r"`v_a` was already consumed"):
        _C().merge_states(**caps, stream=0)


def test_not_a_capsule():
    a = _args()
    caps = {k: to_dlpack(v) for k, v in a.items()}
    caps["lse_a"] = a["lse_a"]  # a tensor, not a capsule
    with pytest.raises(TypeError, match=r"expected a DLPack capsule for `lse_a`, got Tensor"):
        _C().merge_states(**caps, stream=0)


def test_capsule_is_borrowed_not_consumed():
    """The binding must not rename or free capsules: the producer keeps ownership."""
    t = torch.arange(6, dtype=torch.float32)
    cap = to_dlpack(t)
    _C().tensor_info(cap)
    again = torch.utils.dlpack.from_dlpack(cap)  # still consumable afterwards
    assert torch.equal(again, t)


def test_device_info_errors_cleanly():
    if inferops.cuda_available():
        info = _C().device_info(0)
        assert info["sm_count"] > 0 and info["max_smem_per_block_optin"] > 0
        return
    with pytest.raises(RuntimeError, match=r"CUDA error|without CUDA"):
        _C().device_info(0)
    if inferops.build_info()["cuda"]:
        with pytest.raises(ValueError, match=r"device index -1 out of range"):
            _C().device_info(-1)
