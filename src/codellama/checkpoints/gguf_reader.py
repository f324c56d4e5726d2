"""A faster drop-in gguf.GGUFReader.

The package's reader slices a numpy.memmap once per array element (each slice runs memmap's Python
hooks), so opening a file with a 49k-token vocabulary takes seconds. This subclass parses through a plain
ndarray view of the same map and reads whole arrays in one pass, producing the very same ReaderField
structure (one part per element, the same `data` indices), so code written for GGUFReader works unchanged.
"""

from __future__ import annotations

import numpy as np
from gguf import GGUFReader, GGUFValueType


class FastGGUFReader(GGUFReader):
    def _plain_view(self) -> np.ndarray:
        plain = self.__dict__.get("_plain")
        if plain is None:  # a plain ndarray over the memmap: slicing it is C-speed (and keeps the map alive)
            plain = self._plain = self.data.view(np.ndarray)
        return plain

    def _get(self, offset, dtype, count=1, override_order=None):
        count = int(count)
        dt = np.dtype(dtype)
        arr = self._plain_view()[offset : offset + dt.itemsize * count].view(dt)[:count]
        return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

    def _get_field_parts(self, orig_offs: int, raw_type: int):
        if GGUFValueType(raw_type) != GGUFValueType.ARRAY or self.byte_order != "I":
            return super()._get_field_parts(orig_offs, raw_type)
        offs = orig_offs
        raw_itype = self._get(offs, np.uint32)
        alen = self._get(offs + 4, np.uint64)
        offs += 12
        itype = GGUFValueType(int(raw_itype[0]))
        n = int(alen[0])
        parts: list[np.ndarray] = [raw_itype, alen]
        nptype = self.gguf_scalar_to_np.get(itype)
        if nptype is not None and n:
            values = self._get(offs, nptype, n)
            parts += [values[i : i + 1] for i in range(n)]
            offs += int(values.nbytes)
            return offs - orig_offs, parts, list(range(2, 2 + n)), [GGUFValueType.ARRAY, itype]
        if itype == GGUFValueType.STRING and n:
            plain = self._plain_view()
            raw = memoryview(plain)
            u64 = np.dtype(np.uint64)
            for _ in range(n):
                slen = int.from_bytes(raw[offs : offs + 8], "little")
                parts.append(plain[offs : offs + 8].view(u64))
                parts.append(plain[offs + 8 : offs + 8 + slen])
                offs += 8 + slen
            return offs - orig_offs, parts, list(range(3, 2 + 2 * n, 2)), [GGUFValueType.ARRAY, itype]
        return super()._get_field_parts(orig_offs, raw_type)  # empty or nested arrays: rare, keep the original
