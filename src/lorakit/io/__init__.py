"""Files: PEFT-format adapter folders, written atomically and read without unpickling; the atomic writers."""

from lorakit.io.adapter_folder import (
    CONFIG_NAME,
    LEGACY_WEIGHTS_NAME,
    WEIGHTS_NAME,
    read_adapter_folder,
    write_adapter_folder,
)
from lorakit.io.atomic import (
    atomic_write_bytes,
    atomic_write_file,
    clean_stale,
    fsync_path,
    fsync_tree,
    write_folder_atomically,
)

__all__ = [
    "CONFIG_NAME",
    "LEGACY_WEIGHTS_NAME",
    "WEIGHTS_NAME",
    "atomic_write_bytes",
    "atomic_write_file",
    "clean_stale",
    "fsync_path",
    "fsync_tree",
    "read_adapter_folder",
    "write_adapter_folder",
    "write_folder_atomically",
]
