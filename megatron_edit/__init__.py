"""megatron-edit: Megatron-style GPT pretraining on megatron-core with low-communication data parallelism."""
import warnings

# megatron-core warns at import, once per module and per rank, that Apex/Transformer Engine are absent and it
# falls back to torch; arguments.py picks the implementation and the log says which.
warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).* not installed", category=UserWarning)
# Raised by TransformerConfig for its own default of cuda_graph_scope, which we never set.
warnings.filterwarnings("ignore", message=r"full scope is deprecated", category=UserWarning)
# torch 2.13 renamed all_gather_into_tensor; megatron-core 0.16 and comm_stats still use (and count) the old name.
warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor. is deprecated", category=FutureWarning)

from megatron_edit.platform.mcore_import import import_megatron_core_eagerly  # noqa: E402

import_megatron_core_eagerly()
