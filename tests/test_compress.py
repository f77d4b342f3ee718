"""Compressed pages (``hoststore --compress``): the encodings, the size classes, the
slab over them, shared reads of compressed slots, and the store's accounting."""

from __future__ import annotations

import os
import random
import struct
import time
from array import array

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hoststore.clientpages import ClientPages
from hoststore.sharedslab import ZSharedSlab
from hoststore.sizeclasses import SPARE_CHUNKS, SizeClasses
from hoststore.zslab import PrivateZSlab
from pagewire.codec import (CHUNK_BYTES, CLASS_SIZES, INCOMPRESSIBLE_BYTES, Codec, DecodeError, class_of, decode,
                            encode, region_bytes)
from pagewire.messages import PAGE_SIZE
from pagewire.sharedmem import SharedPages

from .test_shared import race_reader

RNG_PAGES = random.Random(1)


def sized_page(n: int, seq: int, keep: int) -> bytes:
    """A page that compresses to about ``keep`` bytes: a header naming the page and
    version (so a wrong page never passes for it), that much noise, then zeros."""
    rng = random.Random(n * 1_000_003 + seq)
    head = struct.pack("<QQ", n, seq)
    return (head + rng.randbytes(keep)).ljust(PAGE_SIZE, b"\0")[:PAGE_SIZE]


def zpage(n: int, seq: int) -> bytes:
    """Pages spread over every size class, some incompressible."""
    return sized_page(n, seq, (n * 131 + seq * 61) % 4200)


# -- the encodings ------------------------------------------------------------------------------


@pytest.mark.parametrize("codec", [Codec.LZ4, Codec.ZSTD])
def test_every_size_class_round_trips_and_the_threshold_holds(codec: Codec) -> None:
    seen = set()
    for keep in range(0, 4200, 8):
        page = sized_page(7, keep, keep)
        used, blob = encode(page, codec)
        if used == Codec.RAW:
            assert blob == page
        else:
            assert used == codec and len(blob) <= INCOMPRESSIBLE_BYTES
        seen.add(class_of(len(blob)))
        out = bytearray(PAGE_SIZE)
        decode(used, blob, out)
        assert out == page
    assert seen == set(range(len(CLASS_SIZES)))  # every class, the whole-page one too


def test_the_classes_fit_their_sizes() -> None:
    for length in range(1, PAGE_SIZE + 1):
        cls = class_of(length)
        assert CLASS_SIZES[cls] >= length and (cls == 0 or CLASS_SIZES[cls - 1] < length or cls == len(CLASS_SIZES) - 1)


@pytest.mark.parametrize("codec", [Codec.LZ4, Codec.ZSTD])
def test_damaged_bytes_never_decode_to_a_page(codec: Codec) -> None:
    used, blob = encode(sized_page(1, 1, 500), codec)
    assert used == codec
    out = bytearray(PAGE_SIZE)
    for bad in (blob[: len(blob) // 2], bytes(len(blob)), b"\xff" * len(blob)):
        with pytest.raises(DecodeError):
            decode(codec, bad, out)
    # Bytes damaged inside a block can decode to a page of the right length that is not
    # this one: no decoder can promise otherwise.  The page checksum every client checks
    # (``vswapfs.integrity``) is what stops it; here it only has to be a page or an error.
    for at in range(0, len(blob), 7):
        flipped = bytearray(blob)
        flipped[at] ^= 0x5A
        try:
            decode(codec, bytes(flipped), out)
        except DecodeError:
            continue
        assert len(out) == PAGE_SIZE
    with pytest.raises(DecodeError):
        decode(Codec.ZSTD_DICT, blob, out)  # no dictionary here
    with pytest.raises(DecodeError):
        decode(Codec.RAW, blob, out)  # not a page's length


# -- the size classes ---------------------------------------------------------------------------


class _Region:
    def __init__(self, chunks: int) -> None:
        self.buf = bytearray(chunks * CHUNK_BYTES)
        self.released: list[tuple[int, int]] = []

    def release(self, offset: int, length: int) -> None:
        self.released.append((offset, length))
        self.buf[offset : offset + length] = bytes(length)  # as a punched hole reads


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, len(CLASS_SIZES) - 1), st.integers(0, 10_000)),
                max_size=400))
def test_size_classes_never_overlap_and_count_exactly(ops: list[tuple[bool, int, int]]) -> None:
    """Allocate and free at random: every live object keeps its bytes through the moves
    of its class, no two overlap, and the memory held is what the counts say."""
    region = _Region(128)
    classes = SizeClasses(memoryview(region.buf), region.release)
    where: dict[int, tuple[int, int]] = {}  # owner -> (class, index)
    fill: dict[int, bytes] = {}
    next_owner = 0
    for alloc, cls, pick in ops:
        if alloc or not where:
            owner, next_owner = next_owner, next_owner + 1
            idx = classes.alloc(cls, owner)
            where[owner] = (cls, idx)
            fill[owner] = random.Random(owner).randbytes(CLASS_SIZES[cls])
            at = classes.offset(cls, idx)
            region.buf[at : at + CLASS_SIZES[cls]] = fill[owner]
            continue
        owner = sorted(where)[pick % len(where)]
        cls, idx = where.pop(owner)
        mover = classes.tail_owner(cls)
        classes.free(cls, idx)
        if mover != owner:
            where[mover] = (cls, idx)
    classes.check()
    spans = sorted((classes.offset(c, i), CLASS_SIZES[c], o) for o, (c, i) in where.items())
    for (a, size, _), (b, _, _) in zip(spans, spans[1:]):
        assert a + size <= b
    for owner, (cls, idx) in where.items():
        assert classes.owner(cls, idx) == owner
        at = classes.offset(cls, idx)
        assert bytes(region.buf[at : at + CLASS_SIZES[cls]]) == fill[owner]
    assert classes.object_bytes == sum(CLASS_SIZES[c] for c, _ in where.values())
    for cls in range(len(CLASS_SIZES)):
        live = classes.count(cls)
        assert live == sum(1 for c, _ in where.values() if c == cls)
    written = {  # the pages of each chunk in use that hold an object
        (classes.offset(c, i) // PAGE_SIZE) for c, i in where.values()}
    assert len(written) * PAGE_SIZE <= classes.mem_bytes <= (len(written) + 32 + SPARE_CHUNKS * 16) * PAGE_SIZE


def test_the_region_bound_holds_a_full_slab_of_the_worst_mix() -> None:
    """Every slot full, in the class that wastes most at the end of its chunks."""
    slots = 3000
    worst = max(range(len(CLASS_SIZES)), key=lambda c: (CHUNK_BYTES % CLASS_SIZES[c]) / CLASS_SIZES[c])
    for cls in (worst, len(CLASS_SIZES) - 1):
        region = _Region(region_bytes(slots) // CHUNK_BYTES)
        classes = SizeClasses(memoryview(region.buf), region.release)
        for owner in range(slots):
            classes.alloc(cls, owner)
        classes.check()


def test_the_memory_counted_is_the_memory_the_memfd_holds() -> None:
    """mem_bytes against what the kernel says the memfd holds, filling and emptying:
    the same to the page."""
    slab = PrivateZSlab(4096)
    blocks = lambda: os.fstat(slab.fd).st_blocks * 512  # noqa: E731
    for n in range(3000):
        slot = slab.grow()
        slab.write(slot, encode(zpage(n, 1), Codec.ZSTD))
        slab.publish(slot, n, 1)
        if n % 250 == 0:
            assert blocks() == slab.mapped_bytes
    assert blocks() == slab.mapped_bytes >= slab.charged_bytes
    full = blocks()
    while slab.used > 100:
        slab.shrink()
        assert slab.used % 97 or blocks() == slab.mapped_bytes
    slab.check()
    # What stays: the live pages, and at most a chunk per class (its written tail) and the spares.
    assert blocks() == slab.mapped_bytes <= 100 * PAGE_SIZE + (len(CLASS_SIZES) + SPARE_CHUNKS) * CHUNK_BYTES
    assert slab.mapped_bytes < full // 3
    slab.close()


# -- a client's pages kept compressed -----------------------------------------------------------


def zclient(shared: bool, npages: int = 512) -> ClientPages:
    client = ClientPages("c", npages, "i", b"s" * 32, shared_slots=npages if shared else 0, compress=Codec.ZSTD)
    assert client.zslab is not None and (client.shared is not None) == shared
    return client


def read_back(client: ClientPages, n: int) -> bytes:
    out = bytearray(PAGE_SIZE)
    client.slab.read_into(client.index.get(n), out)
    return bytes(out)


@pytest.mark.parametrize("shared", [False, True])
def test_random_operations_keep_every_page_and_the_reader_in_agreement(shared: bool) -> None:
    rng = random.Random(5)
    client = zclient(shared)
    reader = SharedPages(os.dup(client.shared.fd), client.shared.layout) if shared else None
    truth: dict[int, int] = {}
    seq = 0
    for _ in range(4000):
        n, seq = rng.randrange(512), seq + 1
        slot = client.index.get(n)
        if rng.random() < 0.55:
            data = encode(zpage(n, seq), Codec.ZSTD)
            if slot < 0:
                client.add(n, seq, data, seq)
            else:
                client.replace(slot, seq, data, seq)
            truth[n] = seq
        elif slot >= 0:
            client.remove(slot)
            del truth[n]
    client.check()
    z = client.zslab
    z.check()
    assert z.used == len(truth)
    out = bytearray(PAGE_SIZE)
    for n, version in truth.items():
        assert read_back(client, n) == zpage(n, version)
        if reader is not None:
            assert reader.read(n, version, memoryview(out)) and out == zpage(n, version)
            assert not reader.read(n, version - 1, memoryview(out))
    assert z.incompressible == sum(1 for n, v in truth.items() if encode(zpage(n, v), Codec.ZSTD)[0] == Codec.RAW)
    client.close()


def test_reads_of_compressed_slots_racing_rewrites_moves_and_frees_never_see_a_wrong_page() -> None:
    client = zclient(shared=True, npages=64)
    reader = SharedPages(os.dup(client.shared.fd), client.shared.layout)
    for n in range(64):
        client.add(n, 1, encode(zpage(n, 1), Codec.ZSTD), 1)
    hits, wrong = race_reader(reader, client, zpage, lambda n, seq: encode(zpage(n, seq), Codec.ZSTD), rewrite=0.6)
    assert hits > 500 and wrong == 0, (hits, wrong)


def test_a_page_damaged_in_memory_fails_to_read_and_never_passes_for_data() -> None:
    client = zclient(shared=True, npages=64)
    reader = SharedPages(os.dup(client.shared.fd), client.shared.layout)
    client.add(3, 1, encode(sized_page(3, 1, 300), Codec.ZSTD), 1)
    z = client.zslab
    z.encoded_view(0)[:] = bytes(len(z.encoded_view(0)))  # scribbled over
    out = bytearray(PAGE_SIZE)
    assert not reader.read(3, 1, memoryview(out))
    with pytest.raises(DecodeError):
        client.slab.read_into(0, out)


def test_a_page_compressed_with_the_stores_dictionary_is_not_read_from_shared_memory() -> None:
    import zstandard

    from pagewire.codec import encode_hard, hard_compressor

    client = zclient(shared=True, npages=64)
    reader = SharedPages(os.dup(client.shared.fd), client.shared.layout)
    samples = [sized_page(n, 1, 700) for n in range(200)]
    dictionary = zstandard.train_dictionary(4096, samples)
    client.zslab.set_dictionary(dictionary)
    page = sized_page(5, 1, 700)
    encoded = encode_hard(page, hard_compressor(dictionary), Codec.ZSTD_DICT)
    assert encoded[0] == Codec.ZSTD_DICT
    client.add(5, 1, encoded, 1)
    out = bytearray(PAGE_SIZE)
    assert not reader.read(5, 1, memoryview(out))  # the client has no dictionary: it asks the store
    assert read_back(client, 5) == page  # which has


def test_a_client_page_array_slab_layout_is_what_both_sides_compute() -> None:
    slab = ZSharedSlab(1000, 300)
    lay = slab.layout
    assert lay.compressed and lay.header_words == 3
    assert lay.size == lay.data_offset + region_bytes(300) == os.fstat(slab.fd).st_size
    assert type(lay).from_wire(lay.to_wire()) == lay
    slab.close()
    _ = array  # noqa: F841


# -- from an adversarial read ---------------------------------------------------------------------


def test_a_shared_client_at_its_slot_bound_is_refused_memory_and_stays_consistent() -> None:
    from hoststore.slab import SlabFull

    client = ClientPages("c", 256, "i", b"s" * 32, shared_slots=64, compress=Codec.ZSTD)
    for n in range(64):
        client.add(n, 1, encode(zpage(n, 1), Codec.ZSTD), 1)
    with pytest.raises(SlabFull):
        client.add(100, 1, encode(zpage(100, 1), Codec.ZSTD), 1)
    client.check()
    client.zslab.check()
    client.remove(client.index.get(3))
    client.check()
    assert read_back(client, 63) == zpage(63, 1)
    client.add(100, 1, encode(zpage(100, 1), Codec.ZSTD), 1)  # room again
    assert read_back(client, 100) == zpage(100, 1)


def test_a_frame_that_claims_more_than_a_page_is_damaged_without_being_decoded() -> None:
    import zstandard

    huge = zstandard.ZstdCompressor(level=1).compress(bytes(8 << 20))  # says 8 MiB in its header
    with pytest.raises(DecodeError, match="not a page"):
        decode(Codec.ZSTD, huge, bytearray(PAGE_SIZE))
    sized = zstandard.ZstdCompressor(level=1).compress(zpage(1, 1))  # says 4096: a page, fine
    out = bytearray(PAGE_SIZE)
    decode(Codec.ZSTD, sized, out)
    assert out == zpage(1, 1)


class _HugeRegion:
    """A region of 16 TiB that is never touched: what a big device's would be."""

    def __len__(self) -> int:
        return 16 << 40


def test_size_classes_over_a_huge_region_cost_nothing_until_used() -> None:
    started = time.monotonic()
    classes = SizeClasses(_HugeRegion(), lambda offset, length: None)  # type: ignore[arg-type]
    assert time.monotonic() - started < 0.5 and classes.chunk_count == (16 << 40) // CHUNK_BYTES
    classes.check()


def test_memory_whose_punch_fails_stays_counted() -> None:
    region = _Region(64)

    def failing(offset: int, length: int) -> None:
        raise OSError(5, "no")

    classes = SizeClasses(memoryview(region.buf), failing)
    last = len(CLASS_SIZES) - 1
    for owner in range(16 * 8):  # eight chunks of whole pages
        classes.alloc(last, owner)
    held = classes.mem_bytes
    for _ in range(16 * 8):
        classes.free(last, classes.count(last) - 1)
    classes.check()
    assert classes.mem_bytes == held  # nothing was given back, and nothing claims it was
    for owner in range(16 * 8):  # and the chunks are used again, as they are
        classes.alloc(last, owner)
    classes.check()
    assert classes.mem_bytes == held


def test_a_recompressed_page_changes_its_header_even_in_the_same_place() -> None:
    from hoststore.zslab import where_word

    assert where_word(4096, 700, Codec.ZSTD) != where_word(4096, 700, Codec.ZSTD, hard=True)
    client = zclient(shared=True, npages=64)
    reader = SharedPages(os.dup(client.shared.fd), client.shared.layout)
    data = encode(zpage(1, 1), Codec.ZSTD)
    client.add(1, 1, data, 1)
    before = reader._headers[2]  # noqa: SLF001
    client.recode(0, data, hard=True)  # the very same bytes, place, length and encoding
    assert reader._headers[2] != before and reader._headers[0] == 1  # noqa: SLF001
    out = bytearray(PAGE_SIZE)
    assert reader.read(1, 1, memoryview(out)) and out == zpage(1, 1)


def test_a_batch_encodes_as_its_pages_do_one_by_one() -> None:
    from pagewire.codec import encode_batch

    pages = [zpage(n, 3) for n in range(40)] + [bytes(range(256)) * 16]
    for codec in (Codec.ZSTD, Codec.LZ4):
        assert encode_batch(pages, codec, threads=2) == [encode(p, codec) for p in pages]


def test_the_stores_tally_is_every_clients_class_bytes_and_forgets_a_closed_one() -> None:
    from hoststore.sizeclasses import Tally

    tally = Tally()
    clients = [ClientPages(f"c{k}", 256, "i", b"s" * 32, shared_slots=256 if k else 0, compress=Codec.ZSTD,
                           tally=tally) for k in range(2)]
    rng = random.Random(8)
    for seq in range(1, 600):
        client, n = rng.choice(clients), rng.randrange(256)
        slot = client.index.get(n)
        if slot < 0:
            client.add(n, seq, encode(zpage(n, seq), Codec.ZSTD), seq)
        elif rng.random() < 0.5:
            client.replace(slot, seq, encode(zpage(n, seq), Codec.ZSTD), seq)
        else:
            client.remove(slot)
    assert tally.bytes == sum(c.zslab.charged_bytes for c in clients) > 0
    clients[0].close()
    assert tally.bytes == clients[1].zslab.charged_bytes
    clients[1].close()
    assert tally.bytes == 0


def test_the_fullest_figure_is_sampled_not_walked_for_every_put() -> None:
    from hoststore.storestats import SAMPLE_INTERVAL, Fullest

    now = [100.0]
    client = zclient(shared=False, npages=64)
    client.add(1, 1, encode(zpage(1, 1), Codec.ZSTD), 1)
    fullest = Fullest(clock=lambda: now[0])
    fullest.note(PAGE_SIZE, [client])
    assert (fullest.data_bytes, fullest.mem_bytes) == (PAGE_SIZE, client.slab.mapped_bytes)
    client.add(2, 1, encode(zpage(2, 1), Codec.ZSTD), 1)
    fullest.note(2 * PAGE_SIZE, [client])  # too soon: not looked at
    assert fullest.data_bytes == PAGE_SIZE
    now[0] += 2 * SAMPLE_INTERVAL
    fullest.note(2 * PAGE_SIZE, [client])
    assert fullest.data_bytes == 2 * PAGE_SIZE and fullest.mem_max >= fullest.mem_bytes > 0
    fullest.note(2 * PAGE_SIZE, [client], every=True)  # the compressor's batch: looked at however soon
    assert fullest._last == now[0] and fullest.data_bytes == 2 * PAGE_SIZE
