"""A compiled CPU loop for 4-bit dequantisation, built on first use; PyTorch ops when it can't be.

PyTorch has no single CPU op for "look a byte up in a table and scale it": the best pure-PyTorch
path is an int32 conversion, an ``index_select`` and a multiply — three passes, ~0.5 ns per index
on one thread, about half bitsandbytes' C kernel speed. This module compiles one plain C loop
(no torch headers: ``cc -O3 -shared``, well under a second) that reads each byte once, looks its
two values up in the 256-entry pair table and multiplies by the block scale, rebuilding nested
scales inline (``code2[q] · absmax2[b // 256] + offset``), so a call allocates nothing besides
its output and nothing is cached between calls. It is called through ``ctypes`` on tensor
pointers, single-threaded (the QLoRA step's time is in the matmuls, which keep torch's threads).

Bits are those of the PyTorch path: the same float32 products and sums in the same order, no FMA
contraction (``-ffp-contract=off``), bf16 through the same round-to-nearest-even bit trick as
c10::BFloat16, fp16 through the compiler's IEEE ``_Float16`` conversion (also round-to-nearest-
even; if the compiler lacks ``_Float16``, fp16 output takes the PyTorch path).

The library is built once per source version into ``$LORAKIT_CACHE`` (default
``~/.cache/lorakit``). With no C compiler (``$CC`` or ``cc``), ``LORAKIT_NATIVE=0``, or a failed
build, ``available()`` is False (a failure is logged once) and callers use the PyTorch ops:
slower, same results.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <immintrin.h>

/* out_kind: 0 = float32, 1 = bfloat16, 2 = float16 */

static inline float block_scale(int64_t b, const float* scales, const uint8_t* q, const float* code2,
                                const float* absmax2, float offset, int64_t nested_bs) {
  if (q) {
    float s = code2[q[b]] * absmax2[b / nested_bs];
    return s + offset;
  }
  return scales[b];
}

static inline uint16_t to_bf16(float f) {  /* c10::BFloat16's round-to-nearest-even */
  if (f != f) return 0x7FC0;
  uint32_t u;
  memcpy(&u, &f, 4);
  u += ((u >> 16) & 1u) + 0x7FFFu;
  return (uint16_t)(u >> 16);
}

int lk_has_f16(void) {
#ifdef __FLT16_MAX__
  return 1;
#else
  return 0;
#endif
}

static void store_scalar(void* out, int64_t i, float v, int kind) {
  if (kind == 0) {
    ((float*)out)[i] = v;
  } else if (kind == 1) {
    ((uint16_t*)out)[i] = to_bf16(v);
  } else {
#ifdef __FLT16_MAX__
    ((_Float16*)out)[i] = (_Float16)v;
#endif
  }
}

static void run_scalar(const uint8_t* p, const float* table, const float* scales, const uint8_t* q,
                       const float* code2, const float* absmax2, float offset, int64_t nested_bs,
                       void* out, int64_t nblocks, int64_t bs, int kind) {
  const int64_t half = bs / 2;
  for (int64_t b = 0; b < nblocks; ++b) {
    const float s = block_scale(b, scales, q, code2, absmax2, offset, nested_bs);
    for (int64_t j = 0; j < half; ++j) {
      const float* e = table + 2 * (int64_t)p[b * half + j];
      store_scalar(out, b * bs + 2 * j, e[0] * s, kind);
      store_scalar(out, b * bs + 2 * j + 1, e[1] * s, kind);
    }
  }
}

/* AVX-512: the 16-entry code lives in one register; each output lane picks its nibble
   (high nibble first) and looks it up with one permute, then one multiply by the block scale. */
__attribute__((target("avx512f")))
static inline __m512i bf16_bits_512(__m512 v) {
  __m512i u = _mm512_castps_si512(v);
  __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(u, 16),
                                   _mm512_set1_epi32(1)), _mm512_set1_epi32(0x7FFF)));
  r = _mm512_srli_epi32(r, 16);
  __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  return _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7FC0));
}

__attribute__((target("avx512f")))
static void run_avx512(const uint8_t* p, const float* code, const float* scales, const uint8_t* q,
                       const float* code2, const float* absmax2, float offset, int64_t nested_bs,
                       void* out, int64_t nblocks, int64_t bs, int kind) {
  const __m512 cv = _mm512_loadu_ps(code);
  const __m512i pick_lo = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
  const __m512i pick_hi = _mm512_setr_epi32(8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13, 14, 14, 15, 15);
  const __m512i shifts = _mm512_setr_epi32(4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0);
  const __m512i mask = _mm512_set1_epi32(15);
  const int64_t half = bs / 2;
  for (int64_t b = 0; b < nblocks; ++b) {
    const __m512 s = _mm512_set1_ps(block_scale(b, scales, q, code2, absmax2, offset, nested_bs));
    for (int64_t j = 0; j < half; j += 16) {
      const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(p + b * half + j)));
      for (int h = 0; h < 2; ++h) {
        __m512i nib = _mm512_permutexvar_epi32(h ? pick_hi : pick_lo, bytes);
        nib = _mm512_and_si512(_mm512_srlv_epi32(nib, shifts), mask);
        const __m512 v = _mm512_mul_ps(_mm512_permutexvar_ps(nib, cv), s);
        const int64_t o = b * bs + 2 * j + 16 * h;
        if (kind == 0) {
          _mm512_storeu_ps((float*)out + o, v);
        } else if (kind == 1) {
          _mm256_storeu_si256((__m256i*)((uint16_t*)out + o), _mm512_cvtepi32_epi16(bf16_bits_512(v)));
        } else {
          _mm256_storeu_si256((__m256i*)((uint16_t*)out + o),
                              _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        }
      }
    }
  }
}

/* AVX2: the code in two 8-lane registers, a permute in each and a blend on bit 3 of the nibble. */
__attribute__((target("avx2")))
static void run_avx2(const uint8_t* p, const float* code, const float* scales, const uint8_t* q,
                     const float* code2, const float* absmax2, float offset, int64_t nested_bs,
                     float* out, int64_t nblocks, int64_t bs) {
  const __m256 c_lo = _mm256_loadu_ps(code), c_hi = _mm256_loadu_ps(code + 8);
  const __m256i pick_lo = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3);
  const __m256i pick_hi = _mm256_setr_epi32(4, 4, 5, 5, 6, 6, 7, 7);
  const __m256i shifts = _mm256_setr_epi32(4, 0, 4, 0, 4, 0, 4, 0);
  const __m256i mask = _mm256_set1_epi32(15);
  const int64_t half = bs / 2;
  for (int64_t b = 0; b < nblocks; ++b) {
    const __m256 s = _mm256_set1_ps(block_scale(b, scales, q, code2, absmax2, offset, nested_bs));
    for (int64_t j = 0; j < half; j += 8) {
      const __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(p + b * half + j)));
      for (int h = 0; h < 2; ++h) {
        __m256i nib = _mm256_permutevar8x32_epi32(bytes, h ? pick_hi : pick_lo);
        nib = _mm256_and_si256(_mm256_srlv_epi32(nib, shifts), mask);
        const __m256 lo = _mm256_permutevar8x32_ps(c_lo, nib), hi = _mm256_permutevar8x32_ps(c_hi, nib);
        const __m256 sel = _mm256_castsi256_ps(_mm256_slli_epi32(nib, 28));  /* bit 3 -> sign bit */
        _mm256_storeu_ps(out + b * bs + 2 * j + 8 * h, _mm256_mul_ps(_mm256_blendv_ps(lo, hi, sel), s));
      }
    }
  }
}

/* code: the 16-entry fp32 code book; table: its (256, 2) pair table (scalar path). */
void lk_dequant4(const uint8_t* p, const float* code, const float* table, const float* scales,
                 const uint8_t* q, const float* code2, const float* absmax2, float offset,
                 int64_t nested_bs, void* out, int64_t nblocks, int64_t bs, int kind, int simd) {
  /* simd: 2 = the best the CPU has, 1 = at most AVX2, 0 = scalar (tests pin each path) */
  if (simd >= 2 && __builtin_cpu_supports("avx512f")) {
    run_avx512(p, code, scales, q, code2, absmax2, offset, nested_bs, out, nblocks, bs, kind);
  } else if (simd >= 1 && kind == 0 && __builtin_cpu_supports("avx2")) {
    run_avx2(p, code, scales, q, code2, absmax2, offset, nested_bs, (float*)out, nblocks, bs);
  } else {
    run_scalar(p, table, scales, q, code2, absmax2, offset, nested_bs, out, nblocks, bs, kind);
  }
}
"""

_VERSION = hashlib.sha256(_SOURCE.encode()).hexdigest()[:12]
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_failed = False
_has_f16 = False


def _enabled() -> bool:
    return os.environ.get("LORAKIT_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def _cache_dir() -> Path:
    root = os.environ.get("LORAKIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lorakit"
    )
    return Path(root)


def _build(target: Path) -> None:
    cc = os.environ.get("CC") or "cc"
    if shutil.which(cc) is None:
        raise FileNotFoundError(f"no C compiler ({cc!r}) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp) / "dequant4.c"
        src.write_text(_SOURCE)
        lib = Path(tmp) / target.name
        cmd = [cc, "-O3", "-ffp-contract=off", "-fno-fast-math", "-fPIC", "-shared", str(src), "-o", str(lib)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()[:500]}")
        os.replace(lib, target)  # atomic: concurrent builders never load a half-written file


def _load() -> ctypes.CDLL | None:
    global _lib, _failed, _has_f16
    if _lib is not None or _failed:
        return _lib
    with _lock:
        if _lib is not None or _failed:
            return _lib
        target = _cache_dir() / f"lorakit_dequant4_{_VERSION}.so"
        try:
            if not target.exists():
                log.info("building lorakit's native 4-bit dequantisation loop into %s", target)
                _build(target)
            lib = ctypes.CDLL(str(target))
            ptr, i64 = ctypes.c_void_p, ctypes.c_int64
            lib.lk_dequant4.argtypes = [ptr] * 7 + [ctypes.c_float, i64, ptr, i64, i64, ctypes.c_int, ctypes.c_int]
            lib.lk_dequant4.restype = None
            _has_f16 = bool(lib.lk_has_f16())
            _lib = lib
        except Exception as exc:  # no compiler, read-only cache, odd platform: PyTorch ops still work
            _failed = True
            log.warning(
                "lorakit's native 4-bit dequantisation loop is unavailable (%s: %s); using the slower "
                "PyTorch path (same results). Set LORAKIT_NATIVE=0 to skip the attempt.",
                type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "",
            )
    return _lib


def available(dtype: torch.dtype = torch.float32) -> bool:
    """True when the compiled loop can write ``dtype`` and ``LORAKIT_NATIVE`` doesn't disable it."""
    if not _enabled() or _load() is None:
        return False
    return dtype in (torch.float32, torch.bfloat16) or (dtype == torch.float16 and _has_f16)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def dequant_full_blocks(
    data: torch.Tensor, code: torch.Tensor, table: torch.Tensor, state, out: torch.Tensor, nblocks: int,
    simd: int = 2,
) -> None:
    """Write the first ``nblocks`` full blocks of ``state`` into ``out``.

    ``data``: contiguous CPU uint8 codes; ``code``: the (16,) fp32 code book; ``table``: its
    (256, 2) pair table; ``out``: contiguous CPU fp32/bf16/fp16 of at least ``nblocks · blocksize``
    values (check ``available(out.dtype)`` first). ``simd``: 2 uses the best of AVX-512 / AVX2 /
    scalar the CPU has, 1 at most AVX2, 0 the scalar loop (tests pin each path; all give the same bits).
    """
    if nblocks == 0:
        return
    keep = [data, code, table, out]  # every tensor whose pointer goes to C stays alive until it returns
    if state.state2 is not None:
        q = state.absmax.contiguous()
        code2 = state.state2.code.float().contiguous()
        absmax2 = state.state2.absmax.float().contiguous()
        keep += [q, code2, absmax2]
        scales, offset, nested_bs = None, float(state.offset), state.state2.blocksize
    else:
        scales = state.absmax.float().contiguous()
        keep.append(scales)
        q = code2 = absmax2 = None
        offset, nested_bs = 0.0, 1
    _lib.lk_dequant4(
        _ptr(data), _ptr(code), _ptr(table), _ptr(scales), _ptr(q), _ptr(code2), _ptr(absmax2), offset,
        nested_bs, _ptr(out), nblocks, state.blocksize, _KINDS[out.dtype], int(simd),
    )
    del keep
