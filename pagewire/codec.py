"""How a page is kept compressed, and how it is read back: defined once for both ends.

A store started with ``--compress`` keeps each page it admits in one of these
encodings; a client whose pages it shares reads them in the same form from
shared memory, so the encodings, the size classes and the bound on the memory
they take are part of the shared layout (``pagewire.sharedmem``).

* A page that does not shrink to :data:`INCOMPRESSIBLE_BYTES` or less is kept
  as it is (:attr:`Codec.RAW`): decompressing it would cost more than the
  little memory it saves (zswap and zram draw the line at about 3/4 of a page
  too).
* Compressed pages are raw blocks without a header of their own (lz4 block,
  zstd frame without a content size): the length is kept with the page, and
  decoding must give back exactly one page, or the page is damaged.
* :attr:`Codec.ZSTD_DICT` pages were recompressed by the store with a
  dictionary trained on its own pages (``hoststore.recompress``); only the
  store holds that dictionary, so a client asks for them over the wire.
"""

from __future__ import annotations

import argparse
import enum
import struct
import threading
from collections.abc import Callable

import lz4.block
import zstandard

from vswapcommon.cliutil import argtype, non_negative, positive
from vswapcommon.sizes import PAGE_SIZE

INCOMPRESSIBLE_BYTES = 3 * PAGE_SIZE // 4
CLASS_STEP = 64  # size classes: 64, 128, ... 3072 bytes, then whole pages
CLASS_SIZES: tuple[int, ...] = (*range(CLASS_STEP, INCOMPRESSIBLE_BYTES + 1, CLASS_STEP), PAGE_SIZE)
CHUNK_BYTES = 64 * 1024  # a size class takes memory in chunks of this much
ZSTD_FAST_LEVEL = 1  # what a page goes in with
ZSTD_IDLE_LEVEL = 6  # what an idle page is recompressed with


class Codec(enum.IntEnum):
    RAW = 0
    LZ4 = 1
    ZSTD = 2
    ZSTD_DICT = 3


COMPRESS_CHOICES = {"off": None, "lz4": Codec.LZ4, "zstd": Codec.ZSTD}
DEFAULT_COMPRESS = "off"
COMPRESS_HELP = ("keep admitted pages compressed: zstd (level 1; the most pages per byte of memory), lz4 "
                 "(half zstd's CPU, less saved) or off (the default: every page at 4 KiB, the fastest); "
                 "pages that do not shrink to 3 KiB are kept as they are, and --capacity and quotas count "
                 "the memory pages take, not how many there are")


DEFAULT_RECOMPRESS_RATE = 2000.0


def add_compress_arguments(ap: argparse._ActionsContainer, compress_default: str | None = DEFAULT_COMPRESS,
                           whose: str = "") -> None:
    """--compress and the idle recompression's options, the same wherever a store is started
    (``whose`` begins each help text: which store they are for)."""
    ap.add_argument("--compress", choices=sorted(COMPRESS_CHOICES), default=compress_default,
                    help=whose + COMPRESS_HELP)
    ap.add_argument("--recompress-after", type=argtype(non_negative), default=None, metavar="SECONDS",
                    help=whose + "with --compress: recompress pages idle that long (no put of them, no read over "
                                 "the wire; reads from shared memory are not seen) with zstd's stronger setting "
                                 "(default: never)")
    ap.add_argument("--recompress-rate", type=argtype(positive), default=None, metavar="PAGES",
                    help=whose + f"at most that many idle pages a second, all clients together (default "
                                 f"{DEFAULT_RECOMPRESS_RATE:g}: about a tenth of a core)")
    ap.add_argument("--recompress-dictionary", action="store_true", default=None,
                    help=whose + "recompress idle pages with a zstd dictionary trained on each client's own "
                                 "(more saved; such pages decode in the store only, so their client asks for them "
                                 "over the wire)")


def recompress_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the recompression options given, if anything."""
    given = args.recompress_rate is not None or args.recompress_dictionary
    if (given or args.recompress_after) and COMPRESS_CHOICES.get(args.compress or DEFAULT_COMPRESS) is None:
        return "--recompress-after and its companions need --compress"
    if given and not args.recompress_after:
        return "--recompress-rate and --recompress-dictionary need --recompress-after"
    return None


class DecodeError(ValueError):
    """Compressed bytes that do not decode to exactly one page."""


def class_of(length: int) -> int:
    """The size class (index into :data:`CLASS_SIZES`) that holds ``length`` bytes."""
    if length > INCOMPRESSIBLE_BYTES:
        return len(CLASS_SIZES) - 1
    return max(0, (length - 1) // CLASS_STEP)


def region_bytes(slots: int) -> int:
    """Memory enough for ``slots`` pages in their size classes, whatever their sizes:
    each class wastes less than one object per chunk (so at most 1/16 of a chunk of
    whole pages), and holds at most one partly filled chunk and one spare."""
    chunks = -(-slots * PAGE_SIZE * 16 // (15 * CHUNK_BYTES)) + 2 * len(CLASS_SIZES)
    return chunks * CHUNK_BYTES


class _Coders(threading.local):
    """Compression contexts are not for two threads at once: one set per thread."""

    def __init__(self) -> None:
        self.zstd_fast = zstandard.ZstdCompressor(level=ZSTD_FAST_LEVEL, write_content_size=False,
                                                  write_checksum=False)
        self.zstd_out = zstandard.ZstdDecompressor()


_CODERS = _Coders()
_SEGMENT = struct.Struct("<QQ")  # a page's offset and length in a batch (zstandard.BufferWithSegments)


def encode(page: bytes | memoryview, codec: Codec) -> tuple[Codec, bytes]:
    """``page`` in ``codec`` if that makes it small enough, else as it is (RAW)."""
    if codec == Codec.LZ4:
        blob = lz4.block.compress(page, store_size=False)
    elif codec == Codec.ZSTD:
        blob = _CODERS.zstd_fast.compress(page)
    else:
        return Codec.RAW, bytes(page)
    if len(blob) > INCOMPRESSIBLE_BYTES:
        return Codec.RAW, bytes(page)
    return codec, blob


def encode_batch(pages: list[bytes], codec: Codec, threads: int = 1) -> list[tuple[Codec, bytes]]:
    """Every page as :func:`encode` gives it; zstd's in one call of C for the whole batch
    (``threads`` at once), which holds the GIL once, not once a page."""
    if codec != Codec.ZSTD or len(pages) < 2:
        return [encode(page, codec) for page in pages]
    data = b"".join(pages)
    segments = b"".join(_SEGMENT.pack(at * PAGE_SIZE, PAGE_SIZE) for at in range(len(pages)))
    out = _CODERS.zstd_fast.multi_compress_to_buffer(zstandard.BufferWithSegments(data, segments), threads=threads)
    encoded = []
    for i, page in enumerate(pages):
        blob = out[i].tobytes()
        encoded.append((Codec.ZSTD, blob) if len(blob) <= INCOMPRESSIBLE_BYTES else (Codec.RAW, page))
    return encoded


def encode_hard(page: bytes | memoryview, compressor: zstandard.ZstdCompressor, codec: Codec) -> tuple[Codec, bytes]:
    """``page`` with a stronger zstd ``compressor`` (a level, perhaps a dictionary: ``codec``
    says which), where that beats keeping it as it is."""
    blob = compressor.compress(page)
    if len(blob) > INCOMPRESSIBLE_BYTES:
        return Codec.RAW, bytes(page)
    return codec, blob


def hard_compressor(dictionary: zstandard.ZstdCompressionDict | None = None) -> zstandard.ZstdCompressor:
    """What idle pages are recompressed with (one per thread: not for two at once)."""
    return zstandard.ZstdCompressor(level=ZSTD_IDLE_LEVEL, dict_data=dictionary, write_content_size=False,
                                    write_checksum=False, write_dict_id=False)


def _check_frame(blob: bytes | memoryview) -> None:
    """A zstd frame that says it holds anything but a page is damaged: zstd would trust
    that size over ``max_output_size`` (a few damaged bytes could ask for terabytes)."""
    size = zstandard.frame_content_size(blob)
    if size not in (-1, PAGE_SIZE):
        raise DecodeError(f"a frame that says it holds {size} bytes, not a page")


def decode(codec: int, blob: bytes | memoryview, out: memoryview | bytearray,
           dictionary: Callable[[], zstandard.ZstdDecompressor] | None = None) -> None:
    """The page ``blob`` holds, into ``out`` (one page); DecodeError if it is not one."""
    try:
        if codec == Codec.RAW:
            page = blob
        elif codec == Codec.LZ4:
            page = lz4.block.decompress(blob, uncompressed_size=PAGE_SIZE)
        elif codec == Codec.ZSTD:
            _check_frame(blob)
            page = _CODERS.zstd_out.decompress(blob, max_output_size=PAGE_SIZE)
        elif codec == Codec.ZSTD_DICT and dictionary is not None:
            _check_frame(blob)
            page = dictionary().decompress(blob, max_output_size=PAGE_SIZE)
        else:
            raise DecodeError(f"no decoder here for encoding {codec}")
    except (lz4.block.LZ4BlockError, zstandard.ZstdError, MemoryError) as exc:
        raise DecodeError(str(exc) or type(exc).__name__) from None
    if len(page) != PAGE_SIZE:
        raise DecodeError(f"decoded to {len(page)} bytes, not a page")
    out[:PAGE_SIZE] = page
