"""Tensors cross the wire as (dtype, shape, bytes) and are checked before use."""

import pytest
import torch

from p2pllm.transport.wire import (
    TensorBlob, WireError, blob_to_tensor, pack_blob, tensor_to_blob, unpack_blob,
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32])
def test_round_trip_is_bit_exact(dtype):
    t = (torch.randn(5, 7) * 100).to(dtype)
    back = blob_to_tensor(unpack_blob(pack_blob(tensor_to_blob(t))), expect_shape=(5, 7))
    assert back.dtype == dtype and torch.equal(back, t)


def test_an_activation_travels_as_its_own_bytes_whatever_its_layout():
    t = torch.randn(6, 4)
    for view in (t, t.t(), t[::2], t.requires_grad_(False)):
        blob = tensor_to_blob(view)
        assert blob.dtype == "float32" and blob.shape == tuple(view.shape)
        assert torch.equal(blob_to_tensor(blob), view)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_are_refused_in_every_activation_dtype(dtype, bad):
    t = torch.randn(3, 5).to(dtype)
    assert torch.equal(blob_to_tensor(tensor_to_blob(t), finite=True), t)
    t[2, 4] = bad
    assert not torch.isfinite(blob_to_tensor(tensor_to_blob(t))).all()  # refused only when asked
    with pytest.raises(WireError, match="NaN or infinity"):
        blob_to_tensor(tensor_to_blob(t), finite=True)


def test_wire_dtype_casts_activations():
    t = torch.randn(3, 4)
    blob = tensor_to_blob(t, "float16")
    assert blob.dtype == "float16" and len(blob.data) == 3 * 4 * 2
    back = blob_to_tensor(blob, out_dtype=torch.float32)
    assert torch.allclose(back, t, atol=1e-2)


def test_shape_mismatch_is_refused():
    blob = tensor_to_blob(torch.zeros(2, 8))
    with pytest.raises(WireError, match="does not match"):
        blob_to_tensor(blob, expect_shape=(2, 16))
    blob_to_tensor(blob, expect_shape=(None, 8))


def test_byte_length_must_equal_elements_times_itemsize():
    with pytest.raises(WireError, match="expected 32"):
        blob_to_tensor(TensorBlob("float32", (2, 4), b"\0" * 31))


def test_disallowed_and_unknown_dtypes_are_refused():
    blob = tensor_to_blob(torch.zeros(2, dtype=torch.int64))
    with pytest.raises(WireError, match="not allowed"):
        blob_to_tensor(blob, allowed=("float32",))
    with pytest.raises(WireError, match="not allowed"):
        blob_to_tensor(TensorBlob("object", (1,), b"x"))


def test_absurd_shapes_are_refused_before_allocating():
    with pytest.raises(WireError, match="exceeds"):
        blob_to_tensor(TensorBlob("float32", (1 << 20, 1 << 20), b""))
    with pytest.raises(WireError, match="bad shape"):
        blob_to_tensor(TensorBlob("float32", (-1, 4), b""))


@pytest.mark.parametrize("garbage", [b"", b"\x93\x01\x02", b"\xc1", b"\x81\xa1x\x01", bytes(range(256))])
def test_garbage_messages_raise_wire_error(garbage):
    with pytest.raises(WireError):
        unpack_blob(garbage)


@pytest.mark.parametrize("message", ["SequenceStart", "GenerateRequest"])
def test_sampling_params_that_a_float32_rounds_to_zero_still_pass_the_stages_checks(message):
    """A top_p of 1e-300 (accepted by the gateway) became 0.0 on the wire, and the last stage
    refused the micro-batch it came in, failing the other requests in it too."""
    from p2pllm.model.sampling import SamplingParams
    from p2pllm.proto import p2pllm_pb2 as pb
    from p2pllm.transport.sampling_wire import sampling_fields, sampling_from

    sent = SamplingParams(temperature=1e-300, top_p=1e-300, presence_penalty=1e-300).validate()
    msg = getattr(pb, message).FromString(getattr(pb, message)(**sampling_fields(sent)).SerializeToString())
    received = sampling_from(msg)
    assert 0.0 < received.top_p < 1e-37 and received.greedy
