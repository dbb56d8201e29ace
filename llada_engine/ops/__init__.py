"""The ops of llada_engine, one module per family. Each family has its public wrapper (calling the
compiled `torch.ops.llada` kernel), its fake (meta) implementation for torch.compile, and its pure-PyTorch
reference `<op>_ref`, which is the oracle of the tests and the baseline of the benchmarks."""
from .commit_tokens import CommitResult, commit_tokens, commit_tokens_, commit_tokens_ref
from .block_attention import (block_attention, block_attention_decode, block_attention_decode_ref,
                              block_attention_ref, block_mask_dense)

__all__ = ["CommitResult", "commit_tokens", "commit_tokens_", "commit_tokens_ref"]
__all__ += ["block_attention", "block_attention_decode", "block_attention_decode_ref", "block_attention_ref",
            "block_mask_dense"]
