"""The bucket plan both ends of a weight push compute, and the byte packing one broadcast moves."""

import pytest
import torch

from torl.infra.weight_buckets import TensorMeta, bucket_bytes_of, pack, plan_buckets, unpack


def _metas(*sizes, dtype=torch.float32):
    return [TensorMeta(f"t{i}", dtype, (n,)) for i, n in enumerate(sizes)]


def test_buckets_keep_order_and_respect_the_size():
    metas = _metas(10, 10, 10, 30, 5)  # 40, 40, 40, 120, 20 bytes
    plan = plan_buckets(metas, 80)
    assert plan == [[0, 1], [2], [3], [4]]  # 120 bytes is over the bound: it travels alone
    assert [i for b in plan for i in b] == list(range(5))
    assert all(bucket_bytes_of(metas, b) <= 80 for b in plan if len(b) > 1)


def test_one_bucket_when_everything_fits_and_none_for_nothing():
    assert plan_buckets(_metas(1, 2, 3), 1 << 20) == [[0, 1, 2]]
    assert plan_buckets([], 10) == []
    with pytest.raises(ValueError, match="bucket_bytes"):
        plan_buckets(_metas(1), 0)


def test_pack_unpack_round_trip_across_dtypes_and_shapes():
    tensors = [
        torch.randn(3, 4, dtype=torch.bfloat16),
        torch.arange(6, dtype=torch.int64).reshape(2, 3),
        torch.randn(5).t(),
        torch.randn(4, 2).t(),  # not contiguous
    ]
    metas = [TensorMeta(f"t{i}", t.dtype, tuple(t.shape)) for i, t in enumerate(tensors)]
    buffer = pack(tensors)
    assert buffer.dtype == torch.uint8 and buffer.numel() == sum(m.nbytes for m in metas)
    for got, want in zip(unpack(buffer, metas), tensors, strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want)


def test_unpack_refuses_a_buffer_of_the_wrong_size():
    metas = _metas(4)
    with pytest.raises(ValueError, match="holds 15 bytes"):
        unpack(torch.zeros(15, dtype=torch.uint8), metas)
