"""Files: PEFT-format adapter folders, written atomically and read without unpickling."""

from lorakit.io.adapter_folder import (
    CONFIG_NAME,
    LEGACY_WEIGHTS_NAME,
    WEIGHTS_NAME,
    atomic_write_bytes,
    fsync_path,
    read_adapter_folder,
    write_adapter_folder,
)

__all__ = [
    "CONFIG_NAME",
    "LEGACY_WEIGHTS_NAME",
    "WEIGHTS_NAME",
    "atomic_write_bytes",
    "fsync_path",
    "read_adapter_folder",
    "write_adapter_folder",
]
