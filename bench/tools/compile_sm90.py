"""Compile the latent decode kernel for sm_90a (H100/H200) without a GPU and print what the compiler made of it:
registers and spills (ptxas -v), global loads by width (PTX) and layout conversions (TTGIR), per stream geometry.

    python -m bench.tools.compile_sm90

A static check for the sessions without a GPU (speed itself is measured by bench/kernels.py on one): scalar
`ld.global.b8/b16` loads of a tile instead of `v2/v4` vectors, spills, or many `convert_layout`s are what to look
for. The arguments are specialized as Triton's JIT specializes them at run time (unit strides of the last dims are
constants, pointers and row strides divisible by 16).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections import Counter

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from bench.common import argument_parser
from kvconvert.kernels import decode_attention as kd

KERNEL = kd._latent_decode_split_kernel
UNIT_STRIDES = ("stride_ql_r", "stride_qr_w", "stride_lat_w", "stride_tail_w", "stride_rope_w", "stride_po_r", "stride_out_r",
                "stride_lsc_k", "stride_tsc_k", "stride_rsc_k", "stride_ks_k", "stride_lw_s", "stride_hb_h", "stride_ru_r",
                "stride_pos_s")
# (heads, latent width, bits, group, rope width, rope bits, rope group[, 2-bit tail width]): SmolLM2 at 2%, wider
# latents, an odd group, SmolLM2's 0.25 plan with its 2-bit tail
POINTS = [(9, 32, 4, 32, 32, 4, 32), (9, 128, 4, 32, 32, 16, 1), (9, 512, 4, 32, 32, 16, 1), (9, 512, 16, 1, 32, 16, 1),
          (16, 192, 4, 64, 64, 8, 64), (9, 36, 4, 12, 12, 4, 6), (9, 128, 4, 32, 64, 8, 32, 96)]
# Rope keys from the latent, rebuilt in the kernel (rope width: 3 kv heads x 64; the rope stream's bits unused):
# SmolLM2's default 2% plan (32 @ 4 + 64 @ 2, group 32) and 0.25 plan (32 @ 8 + 224 @ 4, group 32)
ROPE_UP_POINTS = [(9, 32, 4, 32, 192, 16, 1, 64, 2), (9, 32, 8, 32, 192, 16, 1, 224, 4)]


def compile_point(H, R, bits, group, WR, rbits, rgroup, tail=0, tail_bits=2, gather=False, rope_up=False) -> str:
    types = {n: "i32" for n in KERNEL.arg_names}
    types.update(Q_LAT="*bf16", Q_ROPE="*bf16", LAT="*u8" if bits < 16 else "*bf16", LAT_SCALES="*fp16",
                 TAIL="*u8", TAIL_SCALES="*fp16",
                 ROPE="*u8" if rbits < 16 else "*bf16", ROPE_SCALES="*fp16", SEQ_LENS="*i32", LOG_W="*fp32",
                 KEY_SCALE="*fp16", HEAD_BIAS="*fp32", PART_OUT="*fp32", PART_LSE="*fp32", OUT="*bf16", qk_scale="fp32",
                 ROPE_UP="*bf16", ROPE_UP_BIAS="*bf16", ROPE_FREQ="*fp32", ROPE_POS="*fp32", rope_scaling="fp32")
    lat, rope = kd._tile_geometry(bits, group, R), kd._tile_geometry(rbits, rgroup, WR)
    tl_geom = kd._tile_geometry(tail_bits, group, tail) if tail else (16, 16, 1)
    block_h = min(max(16, triton.next_power_of_2(H)), kd._MAX_BLOCK_H)
    whp = max(16, triton.next_power_of_2(WR // 2)) if rope_up else 0
    block_t, warps = kd._tile_config(block_h, lat[1] * lat[2] + (tl_geom[1] * tl_geom[2] if tail else 0),
                                     2 * whp if rope_up else rope[1] * rope[2])
    const = dict(R=R, RT=tail, WR=WR, LAT_BITS=bits, LAT_GROUP=lat[0], LAT_GW=lat[1], LAT_NG=lat[2],
                 TAIL_BITS=tail_bits if tail else 16, TAIL_GROUP=tl_geom[0], TAIL_GW=tl_geom[1], TAIL_NG=tl_geom[2],
                 HAS_TAIL=bool(tail), ROPE_BITS=rbits,
                 ROPE_GROUP=rope[0], ROPE_GW=rope[1], ROPE_NG=rope[2], HAS_Q_LAT=not rope_up, HAS_ROPE=not rope_up,
                 HAS_WINDOW=False, HAS_LOG_W=False, HAS_KEY_SCALE=False, HAS_HEAD_BIAS=False, HAS_ROPE_UP=rope_up,
                 HAS_ROPE_BIAS=False, HAS_POS=False, WH=WR // 2 if rope_up else 0, WHP=whp, DIRECT_OUT=False,
                 DOT_DTYPE=tl.bfloat16, DOT_PRECISION="tf32", BLOCK_H=block_h, BLOCK_T=block_t,
                 GATHER=gather) | dict.fromkeys(UNIT_STRIDES, 1)
    signature = {n: "constexpr" if n in const else types[n] for n in KERNEL.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(KERNEL.arg_names)
             if n not in const and (types[n].startswith("*") or (n.startswith("stride") and not n.endswith(("_g", "_k"))))}
    src = ASTSource(fn=KERNEL, signature=signature, attrs=attrs,
                    constexprs={(KERNEL.arg_names.index(k),): v for k, v in const.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "enable_fp_fusion": True})
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas-blackwell")
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        run = subprocess.run([ptxas, "-arch=sm_90a", "-v", ptx, "-o", os.path.join(tmp, "k.o")], capture_output=True, text=True)
    usage = " ".join(re.findall(r"Used \d+ registers|\d+ bytes spill stores", run.stdout + run.stderr)) or run.stderr[-200:]
    loads = dict(Counter(re.findall(r"ld\.global[.\w]*", compiled.asm["ptx"])))
    trig = dict(Counter(re.findall(r"(?:sin|cos)\.[.\w]*", compiled.asm["ptx"])))
    rope_text = f"rope {WR:3d} from the latent" if rope_up else f"rope {WR:3d}@{rbits:2d}b"
    return (f"H {H:2d} R {R:3d}@{bits:2d}b{f' + {tail}@{tail_bits}b' if tail else ''} g{group:<3d} {rope_text} "
            f"{'gather' if gather else 'tile  '}: BLOCK_T {block_t:3d} warps {warps} | {usage} | convert_layout "
            f"{compiled.asm['ttgir'].count('convert_layout')} | loads {loads}" + (f" | sin/cos {trig}" if rope_up else ""))


def main() -> None:
    argument_parser(__doc__).parse_args()  # no options; --help says what it does
    for point in POINTS:
        for gather in (False, True):
            print(compile_point(*point, gather=gather), flush=True)
    for *point, tail, tail_bits in ROPE_UP_POINTS:
        print(compile_point(*point, tail=tail, tail_bits=tail_bits, rope_up=True), flush=True)


if __name__ == "__main__":
    main()
