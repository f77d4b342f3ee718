"""Where a backing file or device may be, and who may touch it.

Refused outright (BackingError, with the reason):

* a file on a filesystem that keeps its data in RAM (tmpfs, ramfs, hugetlbfs):
  its pages could be swapped to the very device they back, and swapoff hangs
  for good; overlay and FUSE unless the user says they are on disk;
* a file inside the vswapfs mount it would back;
* an existing file that others could read or write, or that is not ours, or a
  directory others may write to without the sticky bit: every swapped page
  would be theirs to read or change;
* a block device that holds anything: mounted, swapped on, claimed by a
  device-mapper or md stack, cut into partitions, or carrying a filesystem,
  swap or partition-table signature; or a RAM-backed one (zram, brd).

Named, not refused (``pressure_risks``): what keeps a backing from being safe
under machine-wide memory pressure (docs/pressure.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import stat

from .extents import FiemapUnsupported, unwritten_ranges  # noqa: F401 (re-exported for the checks' users)


class BackingError(Exception):
    """The backing file or device cannot be used; the message says why."""


TMPFS_MAGIC = 0x01021994
RAMFS_MAGIC = 0x858458F6
HUGETLBFS_MAGIC = 0x958458F6
OVERLAYFS_MAGIC = 0x794C7630
FUSE_MAGIC = 0x65735546
EXT4_MAGIC = 0xEF53  # ext2, ext3 and ext4 share it
XFS_MAGIC = 0x58465342
# Filesystems whose pages live in RAM: never a backing file (swapoff hangs for good).
_RAM_FS = {TMPFS_MAGIC: "tmpfs", RAMFS_MAGIC: "ramfs", HUGETLBFS_MAGIC: "hugetlbfs"}
# Filesystems that may sit on RAM (an overlay on tmpfs, a FUSE filesystem serving
# from memory): refused unless the user says they do not (--allow-backing-fs).
_MAYBE_RAM_FS = {OVERLAYFS_MAGIC: "overlay", FUSE_MAGIC: "fuse"}
# Filesystems whose O_DIRECT overwrite of a written, unshared extent changes no
# metadata (docs/pressure.md): only there can a backing *file* be pressure-safe.
PRESSURE_SAFE_FS = {EXT4_MAGIC: "ext4", XFS_MAGIC: "xfs"}

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def fs_type(path: str) -> int:
    """statfs(2) f_type of the filesystem holding ``path`` (os.statvfs does not report it)."""
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on 64-bit Linux
    if _libc.statfs(os.fsencode(path), buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


def is_block_device(path: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


def check_location(path: str, mountpoint: str | None, allow_fs: frozenset[str] = frozenset()) -> None:
    """Refuse a backing file on tmpfs/ramfs (or overlay/FUSE, unless allowed) or
    inside our own mount."""
    directory = os.path.dirname(os.path.abspath(path)) or "."
    real_dir = os.path.realpath(directory)
    if mountpoint is not None:
        real_mnt = os.path.realpath(mountpoint)
        if real_dir == real_mnt or real_dir.startswith(real_mnt.rstrip("/") + "/"):
            raise BackingError(f"backing file {path} is inside the vswapfs mount {mountpoint}")
    try:
        magic = fs_type(real_dir)
    except OSError as exc:
        raise BackingError(f"cannot check the filesystem of {directory}: {exc.strerror}") from None
    kind = _RAM_FS.get(magic)
    if kind:
        raise BackingError(
            f"backing file {path} is on {kind}: its pages could be swapped to the device they back, "
            "and swapoff would hang for good; put it on a disk filesystem"
        )
    kind = _MAYBE_RAM_FS.get(magic)
    if kind and kind not in allow_fs:
        raise BackingError(
            f"backing file {path} is on {kind}, which may keep its data in RAM (and then swapoff can hang "
            f"for good); put it on a disk filesystem, or pass --allow-backing-fs {kind} if this one is on disk"
        )


def check_directory(path: str, uid: int | None = None) -> None:
    """Every directory on the way to the backing file: nobody but root or us may own one, nor
    write to one (and so swap a name in it for a link elsewhere), unless the sticky bit keeps
    them from removing or renaming what is not theirs (/tmp).  The file itself
    :func:`check_owner` sees to."""
    uid = os.geteuid() if uid is None else uid
    directory = os.path.dirname(os.path.abspath(path)) or "/"
    chain = [directory]
    while chain[-1] != "/":
        chain.append(os.path.dirname(chain[-1]))
    for directory in reversed(chain):  # from / down
        st = os.stat(directory)
        if st.st_uid not in (0, uid):
            raise BackingError(f"{directory} (on the way to backing file {path}) belongs to uid {st.st_uid}: it "
                               f"could replace what is below it; use a directory of root's or ours")
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            raise BackingError(f"{directory} (on the way to backing file {path}) is writable by others (mode "
                               f"{stat.S_IMODE(st.st_mode):04o}) without the sticky bit: they could replace the "
                               f"file; use a private directory")


def check_owner(st: os.stat_result, path: str, uid: int | None = None) -> None:
    """An existing backing file: ours alone (every swapped page is in it)."""
    uid = os.geteuid() if uid is None else uid
    if st.st_uid != uid:
        raise BackingError(f"backing file {path} belongs to uid {st.st_uid}, not to us (uid {uid}): its owner "
                           f"could read every page swapped to it; remove it, or give a file of our own")
    if st.st_mode & 0o077:
        raise BackingError(f"backing file {path} is readable or writable by others (mode "
                           f"{stat.S_IMODE(st.st_mode):04o}): they could read every page swapped to it; chmod 600 it")


# -- block devices ----------------------------------------------------------------------

_SIGNATURES = (  # (offset, bytes, what): enough to refuse a device somebody's data is on
    (0x438, b"\x53\xef", "an ext2/3/4 filesystem"),
    (0, b"XFSB", "an XFS filesystem"),
    (0x10040, b"_BHRfS_M", "a btrfs filesystem"),
    (4086, b"SWAPSPACE2", "a swap area"),
    (4086, b"SWAP-SPACE", "a swap area"),
    (0, b"LUKS\xba\xbe", "a LUKS volume"),
    (512, b"EFI PART", "a GPT partition table"),
    (510, b"\x55\xaa", "a boot sector or MBR partition table"),
    (0x8001, b"CD001", "an ISO 9660 filesystem"),
    (0x218, b"LVM2 001", "an LVM physical volume"),
)
SIGNATURE_BYTES = 0x10048  # the furthest signature's end


def signature(head: bytes) -> str | None:
    """What the first SIGNATURE_BYTES of a device say it holds, or None."""
    for offset, magic, what in _SIGNATURES:
        if head[offset : offset + len(magic)] == magic:
            return what
    return None


def check_signature(path: str, head: bytes) -> None:
    """Refuse a device whose first bytes say somebody's data is on it."""
    what = signature(head)
    if what is not None:
        raise BackingError(f"backing device {path} holds {what}: vswapfs will not overwrite it "
                           f"(wipe it first, e.g. wipefs -a {path}, if its data is not needed)")


def _sysfs(dev: int) -> str:
    return f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}"


def _mounted_devices(mountinfo: str = "/proc/self/mountinfo") -> set[str]:
    with open(mountinfo) as f:
        return {line.split()[2] for line in f}


def _swapped_on(path: str, swaps: str = "/proc/swaps") -> bool:
    real = os.path.realpath(path)
    with open(swaps) as f:
        return any(os.path.realpath(line.split()[0]) == real for line in list(f)[1:] if line.strip())


def check_device(path: str, st: os.stat_result) -> None:
    """Refuse a block device that holds, or may hold, something (see the module's doc)."""
    sysfs = _sysfs(st.st_rdev)
    name = os.path.basename(os.path.realpath(sysfs))
    if name.startswith(("zram", "ram")):
        raise BackingError(f"{path} ({name}) keeps its data in RAM: a backing device must be a disk")
    if f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}" in _mounted_devices():
        raise BackingError(f"{path} is mounted: give a device nothing else uses")
    if _swapped_on(path):
        raise BackingError(f"{path} is swapped on: give a device nothing else uses")
    try:
        holders = os.listdir(os.path.join(sysfs, "holders"))
    except OSError:
        holders = []
    if holders:
        raise BackingError(f"{path} is in use by {', '.join(holders)}: give a device nothing else uses")
    try:
        partitions = [entry for entry in os.listdir(sysfs) if entry.startswith(name)]
    except OSError:
        partitions = []
    if partitions:
        raise BackingError(f"{path} has partitions ({', '.join(sorted(partitions))}): give one partition, "
                           f"or a device without any")
    backing_file = os.path.join(sysfs, "loop", "backing_file")
    if os.path.exists(backing_file):
        with open(backing_file) as f:
            check_location(f.read().strip(), None)
