"""The megatron-core internals the project reads (platform/mcore_internals.py) exist in the installed release: on
the DDP chunks and distributed optimizer a real run builds (every run checks them when it sets up), and here."""
import types

import pytest
from megatron.core.distributed.param_and_grad_buffer import _ParamAndGradBucket, _ParamAndGradBuffer
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

import megatron_edit  # noqa: F401
from megatron_edit.platform import mcore_internals


def test_the_distributed_optimizer_has_the_methods_we_call():
    for name in mcore_internals.OPTIMIZER_METHODS:
        assert callable(getattr(DistributedOptimizer, name, None)), name


def test_buffers_and_buckets_set_the_attributes_we_read():
    """Instance attributes, so read from the constructors' code: each is assigned there."""
    import inspect

    for cls, names in ((_ParamAndGradBuffer, mcore_internals.BUFFER_ATTRIBUTES),
                       (_ParamAndGradBucket, mcore_internals.BUCKET_ATTRIBUTES)):
        source = inspect.getsource(cls.__init__)
        for name in names:
            assert f"self.{name} =" in source, f"{cls.__name__}.{name}"


def test_a_missing_internal_is_named_in_one_line():
    bucket = types.SimpleNamespace(params=[], grad_data=None)  # no offset
    chunk = types.SimpleNamespace(buffers=[types.SimpleNamespace(buckets=[bucket], param_index_map={})])  # no grad_data
    assert mcore_internals.missing([chunk], []) == ["_ParamAndGradBucket.offset", "_ParamAndGradBuffer.grad_data"]
    with pytest.raises(RuntimeError, match="lacks _ParamAndGradBucket.offset, _ParamAndGradBuffer.grad_data, which "
                                           "megatron_edit/platform/mcore_internals.py reads"):
        mcore_internals.check([chunk], [])
