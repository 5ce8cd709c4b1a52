"""Loads a checkpoint as our GPTModel (TP=PP=1) and as the exported LlamaForCausalLM, and prints the largest
difference of their logits on one batch (a process of its own: it starts a process group)."""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.export_hf import load_megatron_model, newest_checkpoint  # noqa: E402


def main(checkpoints: str, exported: str) -> None:
    from transformers import LlamaForCausalLM

    saved, ours = load_megatron_model(newest_checkpoint(checkpoints))
    theirs = LlamaForCausalLM.from_pretrained(exported, torch_dtype=torch.float32).eval()
    tokens = torch.randint(0, saved.padded_vocab_size, (2, saved.seq_length), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(saved.seq_length).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        our_logits = ours(tokens, positions, None)
        their_logits = theirs(tokens).logits
    print(json.dumps({"max_abs_diff": (our_logits - their_logits).abs().max().item(),
                      "logit_scale": our_logits.abs().max().item(), "shape": list(our_logits.shape)}))


if __name__ == "__main__":
    main(*sys.argv[1:])
