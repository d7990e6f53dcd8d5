"""Benchmark 6a's torch side (issue 5): the shapes of bench/bench_tree_attention.c through
torch FlexAttention with an equivalent block mask and through scaled_dot_product_attention with a
dense boolean mask, timed the same way (CUDA events, median of groups of back-to-back calls,
rotating among K/V sets so that 256 MiB lie between two uses of one set; copy bandwidth of a
1 GiB device-to-device copy measured in the same run as the limit).

Llama-3-8B heads (32 q, 8 kv, d 128), bf16, n tree nodes (random trees: node i's parent a random
earlier node) over a prefix of L tokens, batch 1 and 8. Keys are the L prefix tokens followed by
the n nodes; node i sees the whole prefix and its ancestors (itself included).

FlexAttention is compiled per shape with dynamic=False; where its decode kernel fails to compile
for some n, the shape is compiled again with kernel_options={"FORCE_USE_FLEX_ATTENTION": True}
(the "forced" column says so). Compilation is slow: --budget bounds the seconds spent on
FlexAttention shapes (n = 64 first, the shapes the issue's aim names); the rest are reported as
skipped.

    python3 tools/bench_attention_torch.py [--budget SECONDS] [--quick]
"""
import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

HQ, HKV, HD = 32, 8, 128
ROTATE_BYTES = 256 << 20
GROUPS = 7


def time_us(fn, per):
    """Median over GROUPS of `per` back-to-back calls fn(i), microseconds per call."""
    fn(0)
    torch.cuda.synchronize()
    i, ts = 1, []
    for _ in range(GROUPS):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(per):
            fn(i)
            i += 1
        b.record()
        b.synchronize()
        ts.append(1e3 * a.elapsed_time(b) / per)
    return statistics.median(ts)


def copy_bandwidth():
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda").fill_(0x3C)
    dst = torch.empty_like(src)
    us = time_us(lambda i: dst.copy_(src), 3)
    del src, dst
    return 2 * n / (us * 1e-6) / 1e9


def random_tree_mask(n, g):
    """[n][n] bool: node i sees its ancestors and itself."""
    m = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        if i:
            p = int(torch.randint(0, i, (1,), generator=g))
            m[i] = m[p]
        m[i, i] = True
    return m


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=300.0, help="seconds for FlexAttention shapes (compile included)")
    ap.add_argument("--quick", action="store_true", help="batch 1, L 4k only")
    args = ap.parse_args()
    torch._dynamo.config.cache_size_limit = 1024
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = 1024
    if hasattr(torch._dynamo.config, "accumulated_recompile_limit"):
        torch._dynamo.config.accumulated_recompile_limit = 4096
    dev = torch.cuda.get_device_name()
    bw = copy_bandwidth()
    print(f"{dev}, torch {torch.__version__}; copy bandwidth (1 GiB device-to-device, read + write): {bw:.0f} GB/s")
    g = torch.Generator().manual_seed(0)

    shapes = [(b, n, L) for b in (1, 8) for n in (1, 16, 64, 128) for L in (1024, 4096, 16384, 32768)]
    if args.quick:
        shapes = [s for s in shapes if s[0] == 1 and s[2] == 4096]
    results = {}
    flex_spent = 0.0
    # n = 64 first: the aim is stated there, and FlexAttention's compile time may run out.
    for b, n, L in sorted(shapes, key=lambda s: (s[1] != 64, s)):
        kv_bytes = b * L * HKV * HD * 2 * 2
        set_bytes = b * (L + n) * HKV * HD * 2 * 2
        n_sets = max(2, -(-ROTATE_BYTES // set_bytes))
        q = torch.randn(b, HQ, n, HD, device="cuda", dtype=torch.bfloat16)
        ks = [torch.randn(b, HKV, L + n, HD, device="cuda", dtype=torch.bfloat16) for _ in range(n_sets)]
        vs = [torch.randn(b, HKV, L + n, HD, device="cuda", dtype=torch.bfloat16) for _ in range(n_sets)]
        tree = torch.stack([random_tree_mask(n, g) for _ in range(b)]).cuda()  # [b][n][n]
        dense = torch.cat([torch.ones(b, n, L, dtype=torch.bool, device="cuda"), tree], dim=2)[:, None]  # [b][1][n][L+n]

        # SDPA with the dense boolean mask.
        sdpa = lambda i: F.scaled_dot_product_attention(q, ks[i % n_sets], vs[i % n_sets], attn_mask=dense,
                                                        enable_gqa=True)
        ref = sdpa(0).float()
        t_sdpa = time_us(sdpa, 3)

        # FlexAttention with the same mask as a block mask.
        t_flex, forced, err = None, False, ""
        if flex_spent < args.budget:
            t0 = time.time()

            def mask_mod(bi, h, qi, ki):
                return (ki < L) | tree[bi, qi, (ki - L).clamp(min=0)]

            bm = create_block_mask(mask_mod, b, None, n, L + n, device="cuda")
            for opts in (None, {"FORCE_USE_FLEX_ATTENTION": True}):
                try:
                    fa = torch.compile(flex_attention, dynamic=False)
                    flex = lambda i: fa(q, ks[i % n_sets], vs[i % n_sets], block_mask=bm, enable_gqa=True,
                                        kernel_options=opts)
                    out = flex(0).float()
                    d = ((out - ref).norm() / ref.norm()).item()
                    if not d < 2e-2:
                        raise RuntimeError(f"FlexAttention differs from SDPA: rel L2 {d:.2e}")
                    t_flex, forced = time_us(flex, 3), opts is not None
                    break
                except Exception as e:  # noqa: BLE001 - report and try the forced kernel
                    err = f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
                    torch._dynamo.reset()
            flex_spent += time.time() - t0
            if t_flex is None:
                print(f"  flex b={b} n={n} L={L} failed: {err}", file=sys.stderr)
        results[(b, n, L)] = (kv_bytes, t_flex, forced, t_sdpa)
        # As measured, so that a run cut short by a time limit still reports what it did.
        print(f"  measured b={b} n={n} L={L}: flex {t_flex if t_flex else float('nan'):.1f} us, sdpa {t_sdpa:.1f} us",
              flush=True)
        del q, ks, vs, tree, dense, ref
        torch.cuda.empty_cache()

    print("\nLlama-3-8B heads (32 q / 8 kv, d 128), bf16; limit = prefix K/V bytes / copy bandwidth")
    print(f"{'batch':>5} {'n':>4} {'L':>6} | {'flex us':>10} {'% limit':>8} {'forced':>6} | {'sdpa us':>10} {'% limit':>8}")
    for b, n, L in shapes:
        kv_bytes, t_flex, forced, t_sdpa = results[(b, n, L)]
        limit_us = kv_bytes / (bw * 1e9) * 1e6
        fl = f"{t_flex:10.1f} {100 * limit_us / t_flex:7.2f}% {('yes' if forced else 'no'):>6}" if t_flex else \
            f"{'skipped':>10} {'':>8} {'':>6}"
        print(f"{b:5d} {n:4d} {L:6d} | {fl} | {t_sdpa:10.1f} {100 * limit_us / t_sdpa:7.2f}%")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
