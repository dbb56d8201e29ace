"""The official per-step commit schedule of block diffusion decoding."""


def min_commit_schedule(block_length: int, steps: int) -> list[int]:
    """Minimum tokens to commit at each of `steps` steps of a block: block_length // steps each, the
    remainder spread one by one over the first steps (LLaDA2.0's `_get_num_transfer_tokens`)."""
    base, remainder = divmod(block_length, steps)
    return [base + (1 if s < remainder else 0) for s in range(steps)]
