"""Wire format of the trainer -> receiver weight sync.

Everything here is pure Python + torch and is safe to run on bytes that came
from an untrusted peer: there is no pickle and no eval, every size is checked
against :class:`WireLimits` *before* anything is parsed or allocated, every
manifest field is type- and range-checked, and decoders raise only
:class:`WireError` subclasses.

One step is a sequence of messages broadcast from rank 0. A message is a
control transfer of fixed size (``CONTROL_SIZE``: the 64-byte header, then
``header.manifest_len`` bytes of UTF-8 JSON, zero padded) and, for a BUCKET,
a payload transfer (``header.payload_len`` raw bytes + ``SEAL_SIZE`` bytes of
seal). A bucket's payload goes out one message later than its control::

    C1  C2 P1  C3 P2  ...  Cn P(n-1)  C_END Pn

so a receiver knows the size of every payload one message ahead: it posts
the next control and the next payload before it waits for the current
payload, and the wire never idles on a host round trip between buckets. A
sender that gave up still sends every payload it announced, with a void
seal, and an ABORT control in the next control's place.

Message kinds: ``BUCKET`` (tensors packed into a uint8 payload), ``END``
(end-of-step summary) and ``ABORT`` (the sender failed mid-step). The group
handshake records that fix the protocol and limits before any of this flows
are in :mod:`.framing`. See ``docs/sync.md`` for the specification.

Modules: :mod:`.framing` (fixed-size records: header, seal, handshake),
:mod:`.manifest` (JSON schema, limits, cache), :mod:`.integrity` (seal and
checksums), :mod:`.payload` (packing and zero-copy views), :mod:`.errors`.
"""

from .errors import (
    BadMagicError,
    ChecksumError,
    HeaderError,
    LimitExceededError,
    ManifestError,
    ProtocolError,
    ReceiverBrokenError,
    StepAbortedError,
    TruncatedStepError,
    VersionMismatchError,
    WireError,
)
from .framing import (
    ACK_SIZE,
    ALIGNMENT,
    BACKEND_CODES,
    FLAG_LAST,
    GO_SIZE,
    HEADER_SIZE,
    HELLO_SIZE,
    MAGIC,
    PROTOCOL_VERSION,
    SEAL_SIZE,
    CONTROL_SIZE,
    MAX_INLINE_MANIFEST,
    Ack,
    ChecksumAlgo,
    Header,
    Hello,
    MessageKind,
    check_manifest_crc,
    check_seal,
    decode_ack,
    decode_control,
    encode_control,
    encode_void_seal,
    decode_go,
    decode_header,
    decode_hello,
    encode_ack,
    encode_go,
    encode_header,
    encode_hello,
    encode_seal,
)
from .integrity import check_payload_seal, clear_seal, payload_checksum, sum64, write_seal
from .manifest import (
    DEFAULT_LIMITS,
    DTYPES,
    BucketManifest,
    EndOfStep,
    ManifestCache,
    TensorEntry,
    WireLimits,
    decode_abort,
    decode_bucket_manifest,
    decode_end,
    dtype_to_str,
    dumps,
    encode_abort,
    encode_end,
    encode_manifest,
    str_to_dtype,
    validate_layout,
    validate_name,
)
from .payload import bucket_transfers, encode_bucket, step_transfers, pack_into, plan_offsets, tensor_bytes, tensor_nbytes, tensors_from_buffer

__all__ = [
    "MAGIC", "PROTOCOL_VERSION", "HEADER_SIZE", "SEAL_SIZE", "CONTROL_SIZE", "MAX_INLINE_MANIFEST", "ALIGNMENT", "MessageKind", "ChecksumAlgo", "FLAG_LAST",
    "WireLimits", "DEFAULT_LIMITS", "Header", "TensorEntry", "BucketManifest", "EndOfStep",
    "WireError", "BadMagicError", "VersionMismatchError", "HeaderError", "ManifestError", "LimitExceededError",
    "ChecksumError", "TruncatedStepError", "ProtocolError", "StepAbortedError", "ReceiverBrokenError",
    "DTYPES", "dtype_to_str", "str_to_dtype", "validate_name", "validate_layout", "dumps",
    "encode_header", "decode_header", "check_manifest_crc", "encode_control", "decode_control",
    "encode_seal", "encode_void_seal", "check_seal",
    "encode_manifest", "decode_bucket_manifest", "ManifestCache",
    "encode_end", "decode_end", "encode_abort", "decode_abort",
    "payload_checksum", "sum64", "write_seal", "clear_seal", "check_payload_seal",
    "tensors_from_buffer", "plan_offsets", "tensor_bytes", "tensor_nbytes", "pack_into", "encode_bucket",
    "bucket_transfers", "step_transfers",
    "HELLO_SIZE", "ACK_SIZE", "GO_SIZE", "BACKEND_CODES", "Hello", "Ack",
    "encode_hello", "decode_hello", "encode_ack", "decode_ack", "encode_go", "decode_go",
]
