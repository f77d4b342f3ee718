"""LOWER's tree as the kernel knows it through the mount: inode numbers, and a handle on each.

Each inode the kernel knows (it looked it up, and has not forgotten it) holds an
``O_PATH`` descriptor of its LOWER file, so operations reach the very file the kernel
means even when its names change behind the mount's back, and a LOWER inode cannot be
freed and its number reused while the kernel may still ask for it.  Hard links to one
LOWER inode are one inode here, numbered as LOWER numbers it where it can.  Each held
descriptor counts against the open-file limit (``fscache`` raises it to the hard
limit).  Operations on a node's own file go through
``/proc/self/fd/N``; those on names in a directory through ``dir_fd``.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

import pyfuse3

ROOT = pyfuse3.ROOT_INODE
OTHERS = 1 << 62  # the numbers given to inodes whose own number cannot serve


@dataclass(slots=True)
class Node:
    inode: int  # the number the kernel knows it by
    fd: int  # an O_PATH descriptor of the LOWER file
    key: tuple[int, int]  # LOWER's (device, inode)
    mode: int  # its type bits (a file's type never changes)
    lookups: int = 0

    @property
    def path(self) -> str:
        """A path that opens this very file (for calls that take no descriptor)."""
        return f"/proc/self/fd/{self.fd}"

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)


class Tree:
    def __init__(self, lower: str) -> None:
        fd = os.open(lower, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        st = os.fstat(fd)
        root = Node(ROOT, fd, (st.st_dev, st.st_ino), st.st_mode, lookups=1)
        self.nodes: dict[int, Node] = {ROOT: root}
        self._by_key: dict[tuple[int, int], Node] = {root.key: root}
        self._dev = st.st_dev
        self._next = OTHERS

    def __getitem__(self, inode: int) -> Node:
        try:
            return self.nodes[inode]
        except KeyError:
            raise OSError(2, "no such inode (forgotten)") from None  # ENOENT: the kernel no longer knows it

    def find(self, key: tuple[int, int]) -> Node | None:
        return self._by_key.get(key)

    def open_entry(self, parent: Node, name: bytes) -> tuple[int, os.stat_result]:
        """An O_PATH descriptor of ``name`` in ``parent`` and its status (blocking)."""
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent.fd)
        try:
            return fd, os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise

    def learn(self, fd: int, st: os.stat_result) -> Node:
        """The node for a looked-up entry (``fd`` from :meth:`open_entry`, now this tree's or
        closed), its lookup count raised by one."""
        key = (st.st_dev, st.st_ino)
        node = self._by_key.get(key)
        if node is None:
            node = Node(self._number(st), fd, key, stat.S_IFMT(st.st_mode))
            self.nodes[node.inode] = node
            self._by_key[key] = node
        else:
            os.close(fd)
        node.lookups += 1
        return node

    def _number(self, st: os.stat_result) -> int:
        """LOWER's own inode number where it can serve (so that what tools remember of a
        file, as git's index does, still holds after the kernel forgets and looks it up
        again): on LOWER's device, and not the root's number.  Files on filesystems
        mounted inside LOWER get numbers from a range of their own."""
        if st.st_dev == self._dev and ROOT < st.st_ino < OTHERS and st.st_ino not in self.nodes:
            return st.st_ino
        number = self._next
        self._next += 1
        return number

    def forget(self, inode: int, n: int) -> None:
        node = self.nodes.get(inode)
        if node is None or inode == ROOT:
            return
        node.lookups -= n
        if node.lookups <= 0:
            del self.nodes[inode]
            del self._by_key[node.key]
            os.close(node.fd)

    def close(self) -> None:
        for node in self.nodes.values():
            os.close(node.fd)
        self.nodes.clear()
        self._by_key.clear()
