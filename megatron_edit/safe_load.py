"""Reading checkpoint files without running code from them. A pickle can call any function while it loads, so a
crafted checkpoint would run on every rank that resumes from it: tensors and state dicts go through torch's
weights-only unpickler (with the classes megatron-core allows), and torch DCP's `.metadata`, which torch itself
reads with plain pickle, is first read here with an allow-list of its own classes."""
import os
import pickle

import torch
import torch.distributed.checkpoint.metadata as dcp_metadata

from megatron_edit.errors import UsageError

# What a torch_dist checkpoint's .metadata holds (torch DCP's metadata dataclasses, tensor shapes and dtypes).
DCP_METADATA_GLOBALS = {
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.distributed.checkpoint.planner": {"SavePlan", "WriteItem", "WriteItemType", "TensorWriteData",
                                             "BytesIOWriteData"},  # the save plans megatron-core keeps there
    "megatron.core.dist_checkpointing.strategies.torch": {"MCoreSavePlan"},  # an empty class, in older ones
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "slice"},
}


def _refused(path: str, reason: str) -> UsageError:
    return UsageError(f"{path} holds objects that loading would run code for ({reason}); no checkpoint of ours or "
                      "Megatron-LM's does: it is not loaded")


def load_without_code(path: str):
    """torch.load of tensors, containers, numbers and the classes megatron-core allows (argparse.Namespace, numpy
    RNG states, its enums): what our checkpoints and Megatron-LM's hold. Anything else is refused in one line."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise _refused(path, str(exc).strip().splitlines()[-1])


class _DcpMetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        allowed = module == dcp_metadata.__name__ or name in DCP_METADATA_GLOBALS.get(module, ())
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            allowed = True
        if not allowed:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of DCP metadata")
        return super().find_class(module, name)


def check_dcp_metadata(directory: str) -> None:
    """Refuse a torch_dist checkpoint whose .metadata needs more than DCP's own classes, before torch unpickles it."""
    path = os.path.join(directory, ".metadata")
    with open(path, "rb") as f:
        try:
            _DcpMetadataUnpickler(f).load()
        except pickle.UnpicklingError as exc:
            raise _refused(path, str(exc))
