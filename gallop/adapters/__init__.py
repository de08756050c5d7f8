"""GaLLoP adapters: the file format (``format``), saving and loading them for models (``io``), and the PEFT export
(``peft``). The public names of ``format`` are re-exported here, as ``gallop.adapters`` offered them before it was a
package."""

from .format import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    FORMAT_VERSION,
    LEGACY_CONFIG,
    LEGACY_WEIGHTS,
    MODEL_CARD,
    REQUIRED_KEYS,
    Adapter,
    AdapterTensor,
    PathLike,
    atomic_write_text,
    base_fingerprint,
    check_writable_folder,
    decode_gaps,
    encode_gaps,
    model_card,
    prepare_folder,
    read_adapter,
    write_adapter,
)
from .peft import export_peft

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "FORMAT_VERSION",
    "LEGACY_CONFIG",
    "LEGACY_WEIGHTS",
    "MODEL_CARD",
    "REQUIRED_KEYS",
    "Adapter",
    "AdapterTensor",
    "PathLike",
    "atomic_write_text",
    "base_fingerprint",
    "check_writable_folder",
    "decode_gaps",
    "encode_gaps",
    "export_peft",
    "model_card",
    "prepare_folder",
    "read_adapter",
    "write_adapter",
]
