"""Pages compressed on their way to the page tier, and decoded on their way back.

With ``--compress``, a store on a tier (``hoststore --tier``) compresses each
page before it writes it to the cluster, so that the cluster's memory holds
more pages too: a value is then the version's digits, a byte naming the
encoding (``pagewire.codec.Codec``) and the bytes.  The work runs in the
worker thread that writes (the compressors release the GIL); a value that
does not decode to a page on the way back is damaged, as in the store's own
memory (``decode_errors``, and EIO at the client).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from pagewire.codec import Codec, decode, encode
from pagewire.messages import PAGE_SIZE


@dataclasses.dataclass
class TierCodec:
    codec: Codec
    orig_bytes: int = 0  # pages written compressed, all told
    compr_bytes: int = 0  # what they took in the cluster's values (the encoding's byte included)

    def encode_all(self, pages: Sequence[bytes | memoryview]) -> list[bytes]:
        """Each page as the value's body: its encoding's byte, then its bytes.  (In a worker thread.)"""
        out = []
        for page in pages:
            codec, blob = encode(page, self.codec)
            out.append(bytes((codec,)) + blob)
        return out

    def written(self, sizes: Sequence[int]) -> None:
        """Count values of these sizes the cluster took (in the event loop's thread: no two at once)."""
        self.orig_bytes += len(sizes) * PAGE_SIZE
        self.compr_bytes += sum(sizes)

    @staticmethod
    def decode(body: bytes | memoryview, out: memoryview | bytearray) -> None:
        """A value's body back into the page (DecodeError: damaged)."""
        decode(body[0], memoryview(body)[1:], out)

    def stats(self) -> dict[str, object]:
        return {"algorithm": self.codec.name.lower(), "orig_bytes_written": self.orig_bytes,
                "compr_bytes_written": self.compr_bytes}
