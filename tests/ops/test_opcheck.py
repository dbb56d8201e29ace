"""torch.library.opcheck over every registered llada op (schema, fake tensor, autograd registration).

Each op family's test module exports `opcheck_samples(device) -> {op name: [(args, kwargs), ...]}`; an op
that is registered in torch.ops.llada but has no samples here fails test_every_op_is_checked.
"""
import pytest
import torch

from op_testing import DEVICES, registered_llada_ops
from ops import test_block_attention, test_commit_tokens, test_moe

pytestmark = pytest.mark.kernels

FAMILIES = [test_commit_tokens, test_moe, test_block_attention]


def all_samples(device):
    samples = {}
    for family in FAMILIES:
        samples.update(family.opcheck_samples(device))
    return samples


def test_every_op_is_checked():
    missing = registered_llada_ops() - set(all_samples("cpu"))
    assert not missing, f"registered llada ops without opcheck samples: {sorted(missing)}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op_name", sorted(registered_llada_ops()))
def test_opcheck(device, op_name):
    op = getattr(torch.ops.llada, op_name).default
    for args, kwargs in all_samples(device)[op_name]:
        torch.library.opcheck(op, args, kwargs)
