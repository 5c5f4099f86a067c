"""The weight update's buckets: planned by size, packed and unpacked bit for bit (the
updates through Ray, vLLM and DeepSpeed are in tests/integration/test_weight_sync.py)."""
import pytest
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


def test_delta_encoding_brings_the_receiver_bit_equal_in_the_fewest_bytes():
    import pytest

    from rollout import delta

    torch.manual_seed(0)
    metas = [TensorMeta("same", "float32", (8, 8)), TensorMeta("few", "bfloat16", (64, 4)),
             TensorMeta("third", "bfloat16", (300,)), TensorMeta("most", "float32", (50,)),
             TensorMeta("zero", "float32", (6,))]
    old = [torch.randn(8, 8), torch.randn(64, 4).bfloat16(), torch.randn(300).bfloat16(), torch.randn(50), torch.zeros(6)]
    new = [t.clone() for t in old]
    new[1].view(-1)[[3, 100, 255]] += 1.0  # 3 of 256 bf16 elements: indices
    new[2][::3] += 1.0  # 100 of 300: a bit mask (38 B) + values beats indices (600 B) and dense (600 B)
    new[3] *= 1.5  # all 50 fp32: the whole tensor
    new[4][2] = -0.0  # equal as a float, not as bits: must travel (1 bit-mask byte + 4)
    sender = [t.clone().view(-1) for t in old]
    receiver = [t.clone() for t in old]

    counts, sent = [], []
    for m, n, last in zip(metas, new, sender):
        count, parts = delta.encode(m, n, last)
        counts.append(count)
        sent += parts
    assert counts == [0, 3, 100, 50, 1]
    assert [delta.encoding(m, c) for m, c in zip(metas, counts)] == ["same", "sparse", "mask", "dense", "mask"]
    wire = delta.wire(metas, counts)
    assert [m.name for m in wire] == ["few#index", "few#value", "third#mask", "third#value", "most",
                                      "zero#mask", "zero#value"]
    assert [tuple(t.shape) for t in sent] == [m.shape for m in wire]
    assert [str(t.dtype).removeprefix("torch.") for t in sent] == [m.dtype for m in wire]
    assert sum(m.nbytes for m in wire) == 3 * (4 + 2) + (38 + 100 * 2) + 50 * 4 + (1 + 4)
    for s, n in zip(sender, new):  # the sender's copy is now the new weights
        assert torch.equal(s.view(torch.uint8), n.reshape(-1).view(torch.uint8))

    # through the wire format: packed, unpacked, applied
    flat = pack(sent)
    parts = iter(t for _, t in unpack(flat, wire))
    for meta, count, target in zip(metas, counts, receiver):
        delta.apply(target, meta, count, [next(parts) for _ in range(delta.PARTS[delta.encoding(meta, count)])])
    for r, n in zip(receiver, new):
        assert torch.equal(r.view(-1).view(torch.uint8), n.reshape(-1).view(torch.uint8))
    assert str(receiver[4][2].item()) == "-0.0"

    bits = torch.rand(21) < 0.5  # the mask's bit order round-trips at any length
    assert torch.equal(delta.unpack_bits(delta.pack_bits(bits), 21), bits)
    with pytest.raises(ValueError, match="few"):  # an index outside the tensor names it
        delta.apply(torch.zeros(64, 4).bfloat16(), metas[1], 3, [torch.tensor([1, 2, 256], dtype=torch.int32),
                                                                 torch.zeros(3).bfloat16()])
    with pytest.raises(ValueError, match="third"):  # a mask that disagrees with its values
        delta.apply(torch.zeros(300).bfloat16(), metas[2], 100, [delta.pack_bits(torch.ones(300, dtype=torch.bool)),
                                                                 torch.zeros(100).bfloat16()])
    with pytest.raises(ValueError, match="few reports 300 changed elements of 256"):
        delta.wire(metas, [0, 300, 0, 0, 0])


def test_rendezvous_port_is_free_and_outside_the_ephemeral_range():
    """A rendezvous port is never one a port-0 bind or an outgoing connection could take
    between its pick and the store's listen (CI: EADDRINUSE at the learner's TCPStore)."""
    import socket

    from rollout.weight_sync import rendezvous_port

    low, high = map(int, open("/proc/sys/net/ipv4/ip_local_port_range").read().split())
    ports = {rendezvous_port() for _ in range(50)}
    assert len(ports) > 40  # random picks, not one fixed port two jobs would share
    for port in ports:
        assert not low <= port <= high and port >= 20000, port
    port = rendezvous_port()
    with socket.socket() as s:
        s.bind(("", port))  # free when handed out


def test_shared_transport_buffer_round_trip_and_handle_checks(tmp_path):
    """sync.transport=shared on CPU: buckets packed into the learner's /dev/shm buffer in
    the receivers' layout come out bit-equal in another mapping; a handle that does not
    name one of our buffers is refused before anything is opened."""
    import os

    from rollout.buckets import bucket_layout
    from rollout.shared import SharedBuffer, check_handle, open_shared

    torch.manual_seed(0)
    tensors = [torch.randn(3, 5), torch.randn(7), torch.randn(2, 2).to(torch.bfloat16), torch.randn(300)]
    metas = [TensorMeta(f"t{i}", str(t.dtype).split(".")[-1], tuple(t.shape)) for i, t in enumerate(tensors)]
    buckets = plan_buckets(metas, 200)
    sizes = [sum(metas[i].nbytes for i in b) for b in buckets]
    starts, total = bucket_layout(sizes)
    assert all(s % 64 == 0 for s in starts) and total >= sum(sizes)
    sender = SharedBuffer(torch.device("cpu"))
    buf = sender.get(total)
    for b, start, size in zip(buckets, starts, sizes):
        pack([tensors[i] for i in b], buf[start:start + size])  # a lone tensor is copied in too
    handle = sender.handle()
    assert handle["kind"] == "shm" and oct(os.stat(handle["path"]).st_mode & 0o777) == "0o600"
    seen = open_shared(handle, torch.device("cpu"))
    out = [t for b, start, size in zip(buckets, starts, sizes) for _, t in unpack(seen[start:start + size], [metas[i] for i in b])]
    for a, b in zip(tensors, out):
        assert torch.equal(a, b)
    assert sender.get(total) is buf  # kept across pushes while large enough
    bigger = sender.get(total * 4)
    assert sender.handle()["path"] != handle["path"] and not os.path.exists(handle["path"])  # regrown: new file
    assert bigger.numel() == total * 4

    bad = [({"kind": "pickle"}, "kind"), ({**sender.handle(), "nbytes": 0}, "nbytes"),
           ({**sender.handle(), "path": str(tmp_path / "grpo-sync-x")}, "is not a /dev/shm/grpo-sync-*"),
           ({**sender.handle(), "path": "/dev/shm/other"}, "is not a /dev/shm/grpo-sync-*"),
           ({**sender.handle(), "nbytes": total * 4 + 1}, "holds"),
           ({"kind": "cuda_ipc", "nbytes": 8, "handle": "not bytes"}, "handle.handle must be bytes")]
    link = "/dev/shm/grpo-sync-link-test"
    os.symlink(sender.handle()["path"], link)
    try:
        bad.append(({**sender.handle(), "path": link}, "not a regular file"))
        for h, words in bad:
            with pytest.raises(ValueError, match=words.replace("*", r"\*")):
                check_handle(h)
    finally:
        os.unlink(link)
    path = sender.handle()["path"]
    sender.close()
    assert not os.path.exists(path)


def test_buffers_a_killed_learner_left_in_dev_shm_are_removed_and_live_ones_kept():
    import os

    from rollout.shared import SharedBuffer, remove_stale

    gone = "/dev/shm/grpo-sync-999999999-0123456789abcdef"  # no such pid
    mine = f"/dev/shm/grpo-sync-{os.getpid()}-feedfacefeedface"
    for path in (gone, mine):
        open(path, "wb").close()
    try:
        SharedBuffer(torch.device("cpu"))  # a learner's transport clears up when it starts
        assert not os.path.exists(gone) and os.path.exists(mine)
        assert remove_stale() == 0
    finally:
        for path in (gone, mine):
            if os.path.exists(path):
                os.unlink(path)
