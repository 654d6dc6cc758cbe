"""The checkpoint on-disk format: names (layout.py), the weights-only loader (safe_load.py),
checksums in COMPLETE (checksums.py), reading any layout into one state dict (weights.py),
`open_checkpoint` (reader.py) and the files that are ours to write (writer.py)."""

from megatron.checkpoint.checksums import ChecksumError
from megatron.checkpoint.reader import (
    Checkpoint,
    ReadOptions,
    add_read_args,
    open_checkpoint,
    read_options,
)
from megatron.checkpoint.safe_load import CheckpointLoadError
from megatron.checkpoint.weights import CheckpointRefused

# Everything a reader raises for a checkpoint it will not use (each names the file).
READ_ERRORS = (CheckpointRefused, ChecksumError, CheckpointLoadError)

__all__ = [
    "READ_ERRORS",
    "Checkpoint",
    "CheckpointLoadError",
    "CheckpointRefused",
    "ChecksumError",
    "ReadOptions",
    "add_read_args",
    "open_checkpoint",
    "read_options",
]
