"""Reading the files that DeepSpeed and torch.distributed.checkpoint (DCP) write, without letting
them run code.

A checkpoint may come from another machine (`train.resume=PATH`); unpickling it with
`weights_only=False`, or with plain `pickle`, runs whatever callable the file names. Two
libraries do that on our behalf: DeepSpeed's checkpoint engine (`torch.load(weights_only=False)`
for its model and ZeRO files) and DCP's file reader (`pickle.load` of `.metadata`). Here both
read only plain data: tensors, containers, numbers, strings, and a short list of the libraries'
own data classes, each allowed by name. Anything else is refused with an error naming the file
and the object, before any of it is constructed.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import pickle
from pathlib import Path
from typing import Any, Iterator

import torch

from gan_dist.checkpoint import CheckpointError

# DeepSpeed's ZeRO optimizer files hold these objects besides tensors: an enum, loss scalers (their
# attributes only: the unpickler sets them without running __init__) and a named tuple.
DEEPSPEED_DATA_CLASSES = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
)
FORCE, FORCE_NOT = "TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


def _resolve(qualname: str) -> Any:
    module, _, name = qualname.rpartition(".")
    return getattr(importlib.import_module(module), name)


def refuse_code(files: list[Path], allowed: tuple[str, ...]) -> None:
    """Raise CheckpointError if any torch.save file in `files` names a global that
    weights_only=True would not load and that is not in `allowed` (read without unpickling)."""
    for f in files:
        try:
            found = torch.serialization.get_unsafe_globals_in_checkpoint(f)
        except Exception as exc:  # not a torch zip file: nothing we could read safely
            raise CheckpointError(f"cannot read checkpoint file {str(f)!r}: not a torch.save zip file ({exc})") from None
        bad = sorted(set(found) - set(allowed))
        if bad:
            raise CheckpointError(
                f"checkpoint file {str(f)!r} holds objects that are not plain data ({', '.join(bad)}): "
                "loading it could run code, so it is refused. Use checkpoints you wrote yourself.")


@contextlib.contextmanager
def weights_only_loads(allowed: tuple[str, ...] = ()) -> Iterator[None]:
    """Every torch.load inside (a library's too, even one that passes weights_only=False) loads
    with weights_only=True; the classes named in `allowed` may be constructed."""
    saved = {k: os.environ.pop(k, None) for k in (FORCE, FORCE_NOT)}
    os.environ[FORCE] = "1"  # torch.load reads it on every call, over its weights_only argument
    try:
        with torch.serialization.safe_globals([_resolve(q) for q in allowed]):
            yield
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None)
            if v is not None:
                os.environ[k] = v


@contextlib.contextmanager
def deepspeed_files_as_data(state_dir: Path) -> Iterator[None]:
    """Check every file of one DeepSpeed engine's checkpoint, then let the engine load them as data."""
    refuse_code(sorted(Path(state_dir).rglob("*.pt")), DEEPSPEED_DATA_CLASSES)
    with weights_only_loads(DEEPSPEED_DATA_CLASSES):
        yield


# ---- DCP's .metadata --------------------------------------------------------------------------
_DCP_MODULES = ("torch.distributed.checkpoint.metadata",)
_DCP_GLOBALS = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # a layout by its name
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Constructs only DCP's metadata data classes, torch sizes, dtypes and layouts."""

    def __init__(self, f: Any, where: str) -> None:
        super().__init__(f)
        self.where = where

    def find_class(self, module: str, name: str) -> Any:
        obj = None
        if module in _DCP_MODULES or (module, name) in _DCP_GLOBALS:
            obj = getattr(importlib.import_module(module), name, None)
        elif module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            obj = getattr(torch, name)
        if obj is None or (module in _DCP_MODULES and not (isinstance(obj, type) and obj.__module__ == module)):
            raise CheckpointError(
                f"checkpoint file {self.where!r} holds {module}.{name}, which is not checkpoint metadata: "
                "loading it could run code, so it is refused. Use checkpoints you wrote yourself.")
        return obj


def safe_dcp_reader(path: Path) -> Any:
    """DCP's FileSystemReader for the checkpoint directory `path`, whose `.metadata` has been read
    (now, so that a refusal is our error, not one of DCP's wrapped ones) by an unpickler that
    allows only the classes DCP's metadata is made of."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.filesystem import _metadata_fn
    from torch.distributed.checkpoint.metadata import StorageMeta

    where = Path(path) / _metadata_fn
    with open(where, "rb") as f:
        metadata = _MetadataUnpickler(f, str(where)).load()

    class SafeFileSystemReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            if kwargs.get("rank") is not None:  # gan_dist writes one global .metadata, never per rank
                raise FileNotFoundError(f"{where.parent}: no per-rank metadata")
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeFileSystemReader(str(path))
