"""Embedding vectors on the wire: float32 [n, hidden] in one Tensor message, checked on arrival
(result frames from the last stage, Embed replies from the coordinator)."""

from __future__ import annotations

import torch

from ..proto import p2pllm_pb2 as pb
from .wire import TensorBlob, WireError, blob_to_tensor, tensor_to_blob

_UNIT = 1e-3  # how far from length 1 a pooled, L2-normalized float32 vector may be


def vectors_message(vectors: list[torch.Tensor]) -> pb.Tensor:
    blob = tensor_to_blob(torch.stack([v.to(torch.float32) for v in vectors]))
    return pb.Tensor(dtype=blob.dtype, shape=list(blob.shape), data=blob.data)


def vectors_from(msg: pb.Tensor, n: int, hidden: int) -> list[torch.Tensor]:
    """The `n` vectors a message carries; WireError unless they are float32 [n, hidden], finite,
    and of unit length (or zero: the mean of states that cancel out)."""
    t = blob_to_tensor(TensorBlob(msg.dtype, tuple(msg.shape), msg.data), expect_shape=(n, hidden),
                       allowed=("float32",), finite=True)
    norms = torch.linalg.vector_norm(t.double(), dim=1)
    if bool(((norms - 1).abs() > _UNIT).logical_and(norms != 0).any()):
        raise WireError("an embedding that is not of unit length")
    return list(t.unbind(0))
