"""The weight update's buckets: planned by size, packed and unpacked bit for bit (the
updates through Ray, vLLM and DeepSpeed are in tests/integration/test_weight_sync.py)."""
import torch

from rollout.buckets import TensorMeta, pack, plan_buckets, unpack


def test_buckets_pack_and_unpack_round_trip():
    metas = [TensorMeta("a", "float32", (2, 3)), TensorMeta("b", "bfloat16", (5,)), TensorMeta("c", "int64", (4,)),
             TensorMeta("d", "float32", (100,))]
    tensors = [torch.randn(2, 3), torch.randn(5).bfloat16(), torch.arange(4), torch.randn(100)]
    # 24 + 10 + 32 = 66 bytes fit in 70; "d" (400 bytes) travels alone
    assert plan_buckets(metas, 70) == [[0, 1, 2], [3]]
    assert plan_buckets(metas, 10**6) == [[0, 1, 2, 3]]
    assert plan_buckets(metas, 1) == [[0], [1], [2], [3]]
    for bucket in plan_buckets(metas, 70):
        flat = pack([tensors[i] for i in bucket])
        assert flat.dtype == torch.uint8 and flat.numel() == sum(metas[i].nbytes for i in bucket)
        for (name, got), i in zip(unpack(flat, [metas[i] for i in bucket]), bucket):
            assert name == metas[i].name and torch.equal(got, tensors[i])
