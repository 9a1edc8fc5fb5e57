"""Block sizes of the attention kernels: one fixed config under the interpreter (its autotuner cannot
benchmark), a small autotuned space on a GPU keyed on power-of-2 length and batch x heads buckets,
the GPU model, head dim and the variant flags, and fixed blocks for fp32 and for the packed
(varlen) layout, whose tile schedule depends on them. benchmarks/kernel_audit.py compiles every
config here for sm_90 and holds it to 0 spills.
"""
from __future__ import annotations

import functools
import zlib

import torch
import triton
import triton.testing


# (BLOCK_M, BLOCK_N) under the interpreter, whose cost is per tile, not per element: 64 x 64 was the
# fastest there (N = 197 runs 4 ragged tiles). Tests pass other tilings explicitly.
INTERPRETER_BLOCKS = {"fwd": (64, 64), "dq": (64, 64), "dkdv": (64, 64), "dkdv_fused": (64, 64)}
# fp32 on a GPU (true fp32 dots on FMA units, not a speed path): one fixed (BLOCK_M, BLOCK_N,
# warps, stages); small tiles, because ptxas took a minute over a 64 x 64 tile at head dim 128.
# dK/dV walks 16-query tiles: at 32 x 32 it sat at 255 registers and spilled 8-40 B (fused: 800 B);
# at 16 x 32 it needs 104-158 and spills nothing (benchmarks/kernel_audit.py, the fp32 rows).
FP32_BLOCKS = {"fwd": (32, 32, 4, 2), "dq": (32, 32, 4, 2), "dkdv": (16, 32, 4, 2), "dkdv_fused": (16, 32, 4, 2)}
# The packed layout on a GPU (fp16/bf16): 64-row query tiles hold several short sequences; dK/dV
# programs own 64 keys and walk 32-query tiles (wgmma wants the keys side >= 64), 16-query ones fused.
VARLEN_BLOCKS = {"fwd": (64, 64, 4, 3), "dq": (64, 64, 4, 3), "dkdv": (32, 64, 4, 3),
                 # the fused backward: `gpu_configs("dkdv_fused")`'s tile (1 stage: see there)
                 "dkdv_fused": (16, 64, 4, 1)}

# BH_BUCKET: the same lengths at B*H = 192 and 3072 fill the GPU differently, so a config tuned on
# one must not be reused for the other (tuning results are also cached on disk, per key).
# DEVICE_KEY (`device_key`): Triton's own disk key names the architecture only (sm_90), so without
# it a result tuned on an H100 would be reused on an H200 sharing the cache (an NFS home).
TUNE_KEY = ["LQ_BUCKET", "LK_BUCKET", "BH_BUCKET", "DEVICE_KEY", "HEAD_DIM", "IS_CAUSAL", "HAS_MASK",
             "HAS_DROPOUT"]


def device_key(name: str, sm_count: int, total_memory: int) -> int:
    """A 31-bit id of a GPU model (name, SM count, memory size: an H100 SXM, an H100 PCIe and an
    H200 differ in at least one), for the autotuner's key."""
    return zlib.crc32(f"{name}|{sm_count}|{total_memory}".encode()) & 0x7FFFFFFF


@functools.lru_cache(maxsize=None)
def _cuda_device_key(index: int) -> int:
    props = torch.cuda.get_device_properties(index)
    return device_key(props.name, props.multi_processor_count, props.total_memory)


def tensor_device_key(device: torch.device) -> int:
    """`device_key` of a CUDA tensor's GPU; 0 elsewhere (the interpreter does not autotune)."""
    if device.type != "cuda":
        return 0
    return _cuda_device_key(device.index if device.index is not None else torch.cuda.current_device())


def gpu_configs(kind: str):
    """A small space (each config costs a compile per variant). wgmma on Hopper wants the M side
    of a dot >= 64: fwd/dq tile queries by 64 or 128; dkdv's dots have keys on the M side.
    BLOCK_N is a multiple of 16 (the tail tiles and the dropout layout, `attention_dropout._dropout_draws`)."""
    shapes = {  # (BLOCK_M, BLOCK_N, num_warps, num_stages)
        "fwd": [(64, 64, 4, 3), (128, 64, 8, 3), (64, 32, 4, 4)],
        "dq": [(64, 64, 4, 3), (64, 32, 4, 3)],
        # (16, 64): 123-164 registers, so 6-8 warps per SM (occupancy 0.19-0.25) where 32 x 64 gets
        # 4-6, at about 1.6x the instructions per query row (a 16-wide wgmma): only a timing can choose.
        "dkdv": [(32, 64, 4, 3), (16, 64, 4, 3), (64, 128, 8, 2)],
        # one program per (batch, head) walking every tile (`backward(fused_dq=True)`). Without
        # software pipelining (1 stage): with 2-3 stages, 64 x 64 and 64 x 128 tiles, the dropout or
        # causal variants spill under triton 3.9 or 3.6 (benchmarks/kernel_audit.py --fused-bwd).
        # The fifth dot runs transposed, K^T dS^T (head dim on its M side: wgmma); with it, 32-query
        # tiles sit at 255 registers and spill 8-72 B, 16-query tiles need 134-226 and spill nothing
        # under triton 3.9 and 3.6 (occupancy 0.125-0.188 against 0.125, ~1.45x instructions per row).
        "dkdv_fused": [(16, 64, 4, 1)],
    }[kind]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


def fits_registers(config, has_dropout: bool) -> bool:
    """False for the 128-key dK/dV tile with dropout: it sits at the 255-register cap and spills
    under triton 3.9 (benchmarks/kernel_audit.py, which skips it too)."""
    return not (has_dropout and config.kwargs["BLOCK_N"] >= 128)


def prune(configs, named_args, **kwargs):
    """Drop tiles far larger than the sequence (a 128-row tile for 35 queries is mostly padding),
    the largest tiles at head dim 128 and the largest dK/dV tile with dropout (register pressure)."""
    args = {**named_args, **kwargs}
    lq, lk, d = args["LQ_BUCKET"], args["LK_BUCKET"], args["HEAD_DIM"]
    kept = [c for c in configs
            if c.kwargs["BLOCK_M"] <= max(64, lq) and c.kwargs["BLOCK_N"] <= max(64, lk)
            and not (d >= 128 and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] > 64 * 64)
            and fits_registers(c, bool(args.get("HAS_DROPOUT", False)))]
    return kept or configs[:1]


def quick_bench(kernel_call, quantiles):
    # Short timing runs: these kernels take microseconds, and tuning time counts in every GPU job.
    return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)
