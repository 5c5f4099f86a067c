"""sync.transport=shared: a weight push through memory the learner and its generators
share on one node, instead of a collective. The learner packs every bucket into one
buffer it exports; each generator opens it by handle and copies the buckets out.

- CPU: a file in /dev/shm (mode 0600, created exclusively by the learner's process,
  unlinked when the transport closes), mapped by both sides. It runs in CI: the
  colocated e2e test pushes through it.
- GPU: a CUDA allocation exported with a CUDA IPC handle (the mechanism of vLLM's `ipc`
  weight-transfer backend and of torch.multiprocessing); NCCL refuses two ranks on one
  GPU, so colocated pairs on GPUs need this. Unverified: no GPU machine ran it.

A handle is a dict of plain values (str, int, bytes): it crosses Ray and vLLM's
collective_rpc without pickling any object of ours, and the receiver checks it before
opening anything (`open_shared`).
"""
from __future__ import annotations

import os
import secrets
import stat
from typing import Any

import torch

SHM_DIR = "/dev/shm"
PREFIX = "grpo-sync-"


class SharedBuffer:
    """The sender's exported buffer, grown (re-exported under a new handle) when a push
    needs more bytes than it holds; kept across pushes otherwise."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.tensor: torch.Tensor | None = None
        self.path: str | None = None  # CPU: its /dev/shm file
        self._handle: dict[str, Any] | None = None  # exported once per allocation
        if device.type != "cuda":
            remove_stale()

    def get(self, nbytes: int) -> torch.Tensor:
        if self.tensor is None or self.tensor.numel() < nbytes:
            self.close()
            self.tensor = self._cuda(nbytes) if self.device.type == "cuda" else self._shm(nbytes)
        return self.tensor

    def _shm(self, nbytes: int) -> torch.Tensor:
        path = os.path.join(SHM_DIR, f"{PREFIX}{os.getpid()}-{secrets.token_hex(8)}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            # reserved now: a full /dev/shm (Docker's default is 64 MiB) fails here, with its
            # size in the error, instead of killing the packing process with SIGBUS later
            os.posix_fallocate(fd, 0, max(nbytes, 1))
        except OSError as e:
            os.close(fd)
            os.unlink(path)
            raise OSError(e.errno, f"shared transport: cannot reserve {nbytes} bytes in {SHM_DIR} ({e.strerror}); "
                                   f"enlarge it (docker run --shm-size) or use sync.transport=collective") from e
        os.close(fd)
        self.path = path
        return torch.from_file(path, shared=True, size=max(nbytes, 1), dtype=torch.uint8)

    def _cuda(self, nbytes: int) -> torch.Tensor:
        return torch.empty(max(nbytes, 1), dtype=torch.uint8, device=self.device)

    def handle(self) -> dict[str, Any]:
        """What a receiver needs to open the buffer (plain values only). Exported once per
        allocation: each CUDA export takes a reference-counter slot of its own."""
        if self.tensor is None:
            raise RuntimeError("shared transport: nothing exported yet")
        if self._handle is not None:
            return self._handle
        if self.path is not None:
            self._handle = {"kind": "shm", "path": self.path, "nbytes": self.tensor.numel()}
            return self._handle
        (_device, handle, size_bytes, offset_bytes, ref_handle, ref_offset, event_handle,
         event_sync) = self.tensor.untyped_storage()._share_cuda_()
        self._handle = {"kind": "cuda_ipc", "nbytes": self.tensor.numel(), "handle": bytes(handle),
                        "storage_size_bytes": int(size_bytes), "storage_offset_bytes": int(offset_bytes),
                        "ref_counter_handle": bytes(ref_handle), "ref_counter_offset": int(ref_offset),
                        "event_handle": bytes(event_handle), "event_sync_required": bool(event_sync)}
        return self._handle

    def close(self) -> None:
        cuda = self.tensor is not None and self.tensor.device.type == "cuda"
        self.tensor, self._handle = None, None
        if cuda:
            torch.cuda.ipc_collect()  # blocks the receivers no longer hold go back to the allocator
        if self.path is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            self.path = None


def remove_stale() -> int:
    """Remove this user's /dev/shm buffers whose learner process is gone (killed before
    it could unlink them); -> how many."""
    removed = 0
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return 0
    for name in names:
        pid = name[len(PREFIX):].split("-", 1)[0]
        if not name.startswith(PREFIX) or not pid.isdigit() or os.path.exists(f"/proc/{pid}"):
            continue
        path = os.path.join(SHM_DIR, name)
        try:
            if os.lstat(path).st_uid == os.getuid():
                os.unlink(path)
                removed += 1
        except OSError:
            pass
    return removed


def check_handle(handle: Any) -> dict[str, Any]:
    """A handle as it arrived from the learner: its fields and their types, and for a
    /dev/shm file, that it is one of ours (our prefix, directly in /dev/shm, a regular
    file of this user, not a link, large enough). -> the handle; ValueError naming the
    field at fault otherwise."""
    if not isinstance(handle, dict) or handle.get("kind") not in ("shm", "cuda_ipc"):
        raise ValueError(f"shared transport: the handle's kind must be 'shm' or 'cuda_ipc', got {handle!r:.200}")
    nbytes = handle.get("nbytes")
    if not isinstance(nbytes, int) or nbytes <= 0:
        raise ValueError(f"shared transport: handle.nbytes must be a positive int, got {nbytes!r}")
    if handle["kind"] == "shm":
        path = handle.get("path")
        if (not isinstance(path, str) or os.path.dirname(path) != SHM_DIR
                or not os.path.basename(path).startswith(PREFIX) or ".." in path):
            raise ValueError(f"shared transport: handle.path {path!r} is not a {SHM_DIR}/{PREFIX}* file")
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
            raise ValueError(f"shared transport: {path} is not a regular file of this user")
        if st.st_size < nbytes:
            raise ValueError(f"shared transport: {path} holds {st.st_size} bytes, the handle says {nbytes}")
        return handle
    for key, kind in (("handle", bytes), ("storage_size_bytes", int), ("storage_offset_bytes", int),
                      ("ref_counter_handle", bytes), ("ref_counter_offset", int), ("event_handle", bytes),
                      ("event_sync_required", bool)):
        if not isinstance(handle.get(key), kind):
            raise ValueError(f"shared transport: handle.{key} must be {kind.__name__}, got {type(handle.get(key)).__name__}")
    return handle


def open_shared(handle: dict[str, Any], device: torch.device) -> torch.Tensor:
    """The learner's buffer, opened in this process from its (checked) handle: a flat
    uint8 tensor of handle["nbytes"] bytes. CUDA: opened on this process's `device`
    (each process numbers the shared GPU its own way)."""
    handle = check_handle(handle)
    if handle["kind"] == "shm":
        return torch.from_file(handle["path"], shared=True, size=handle["nbytes"], dtype=torch.uint8)
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    n = handle["nbytes"]
    return rebuild_cuda_tensor(
        torch.Tensor, (n,), (1,), 0, torch.UntypedStorage, torch.uint8, device.index or 0,
        handle["handle"], handle["storage_size_bytes"], handle["storage_offset_bytes"], False,
        handle["ref_counter_handle"], handle["ref_counter_offset"], handle["event_handle"],
        handle["event_sync_required"])
