"""Device check (torch + CUDA only, no vLLM/Ray/DeepSpeed): what the weight sync's
buffer work costs on a GPU, against a device memcpy of the same bytes.

    python scripts/gpu_sync_buffers.py [OUT_DIR]

For Qwen2-shaped models (the benchmark sizes plus 1.5B and 7B shapes) in fp32 and
bf16 (7B: bf16 only), with the sync's 64 MiB buckets: the learner packing every bucket into its two
kept buffers (what learner/broadcast.py does) or into fresh ones, and the generator
side copying every unpacked tensor into place (the device part of a load, without
vLLM's Python). NCCL itself needs two GPUs; this checks that nothing around it is
slower than the wire. Writes gpu_sync_buffers.json.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rollout.buckets import TensorMeta, pack, plan_buckets, unpack  # noqa: E402

SHAPES = {  # hidden, layers, heads, kv heads, intermediate, vocab
    "50M": (512, 12, 8, 8, 2048, 100), "150M": (768, 16, 12, 12, 3072, 100),
    "1.5B": (1536, 28, 12, 2, 8960, 151936), "7B": (3584, 28, 28, 4, 18944, 152064),
}


def qwen2_metas(hidden, layers, heads, kv, inter, vocab, dtype) -> list[TensorMeta]:
    d = str(dtype).removeprefix("torch.")
    kvd = kv * hidden // heads
    out = [TensorMeta("model.embed_tokens.weight", d, (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [TensorMeta(p + n, d, s) for n, s in [
            ("self_attn.q_proj.weight", (hidden, hidden)), ("self_attn.q_proj.bias", (hidden,)),
            ("self_attn.k_proj.weight", (kvd, hidden)), ("self_attn.k_proj.bias", (kvd,)),
            ("self_attn.v_proj.weight", (kvd, hidden)), ("self_attn.v_proj.bias", (kvd,)),
            ("self_attn.o_proj.weight", (hidden, hidden)), ("mlp.gate_proj.weight", (inter, hidden)),
            ("mlp.up_proj.weight", (inter, hidden)), ("mlp.down_proj.weight", (hidden, inter)),
            ("input_layernorm.weight", (hidden,)), ("post_attention_layernorm.weight", (hidden,))]]
    return out + [TensorMeta("model.norm.weight", d, (hidden,))]


def timed(fn, reps=5) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("OUT", "."))
    dev = torch.device("cuda")
    bucket_bytes = 64 * 2**20
    results = []
    for name, shape in SHAPES.items():
        for dtype in (torch.float32, torch.bfloat16):
            if name == "7B" and dtype == torch.float32:
                continue  # five copies of a 30 GB model do not fit; bf16 is what GPUs run anyway
            metas = qwen2_metas(*shape, dtype)
            params = [torch.randn(m.shape, device=dev).to(dtype) for m in metas]
            dest = [torch.empty_like(p) for p in params]
            buckets = plan_buckets(metas, bucket_bytes)
            nbytes = sum(m.nbytes for m in metas)
            kept = [torch.empty(max(bucket_bytes, max(m.nbytes for m in metas)), dtype=torch.uint8, device=dev)
                    for _ in range(2)]
            flats = [pack([params[i] for i in b]).clone() for b in buckets]
            src = torch.cat([f for f in flats])
            dst = torch.empty_like(src)

            def pack_kept():
                for k, b in enumerate(buckets):
                    pack([params[i] for i in b], kept[k % 2] if len(b) > 1 else None)

            def pack_fresh():
                for b in buckets:
                    pack([params[i] for i in b])

            def load():
                for b, flat in zip(buckets, flats):
                    for (_, t), i in zip(unpack(flat, [metas[i] for i in b]), b):
                        dest[i].copy_(t)

            def receive_fresh():
                for b in buckets:
                    torch.empty(sum(metas[i].nbytes for i in b), dtype=torch.uint8, device=dev)

            r = {"model": name, "dtype": str(dtype).removeprefix("torch."), "bytes": nbytes, "buckets": len(buckets),
                 "memcpy_s": timed(lambda: dst.copy_(src)), "pack_kept_s": timed(pack_kept),
                 "pack_fresh_s": timed(pack_fresh), "load_copy_s": timed(load), "alloc_fresh_s": timed(receive_fresh)}
            assert all(torch.equal(d, p) for d, p in zip(dest, params)), "unpack/copy changed bytes"
            for k in ("memcpy", "pack_kept", "pack_fresh", "load_copy"):
                r[f"{k}_gb_per_s"] = nbytes / r[f"{k}_s"] / 1e9
            results.append(r)
            print(f"{name:>5} {r['dtype']:>8} {nbytes / 2**30:6.2f} GiB {len(buckets):4d} buckets | memcpy "
                  f"{r['memcpy_gb_per_s']:7.0f} GB/s | pack kept {r['pack_kept_gb_per_s']:7.0f} | pack fresh "
                  f"{r['pack_fresh_gb_per_s']:7.0f} | load copies {r['load_copy_gb_per_s']:7.0f} | fresh allocs "
                  f"{r['alloc_fresh_s'] * 1e3:.2f} ms", flush=True)
            del params, dest, kept, flats, src, dst
            torch.cuda.empty_cache()
    info = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
            "bucket_bytes": bucket_bytes, "results": results}
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_sync_buffers.json").write_text(json.dumps(info, indent=2))
    print(f"wrote {out / 'gpu_sync_buffers.json'}")


if __name__ == "__main__":
    main()
