"""Rank 0's engine steps mirrored on every rank of a tensor-parallel model, for `serve --parallel tp`: only rank 0
takes requests, and every rank must run the same forward passes, so once per step rank 0 broadcasts what changed
in its queue (the requests submitted, with their prompt and parameters, the ids cancelled, a stop) and the other
ranks apply the same changes before stepping. Their engines then admit, step and free exactly as rank 0's: a
step's decisions depend only on the queue and on the step's tokens, which every rank computes alike.

    lockstep = Lockstep()                              # on every rank, in the model's process group
    engine = Engine(model, ..., lockstep=lockstep)
    engine.start() ... engine.stop()                   # rank 0 (stop() reaches the other ranks)
    engine.follow()                                    # every other rank, until rank 0 stops

The messages go over a gloo group of the same ranks (host objects, so an NCCL model's GPUs never spin while a
follower waits), one broadcast_object_list per step. An idle rank 0 still sends an empty message every
heartbeat_s, so that a waiting follower's collective never times out.
"""
import datetime
from typing import Optional

import torch.distributed as dist

from ..decoding.engine import QueueChanges
from ..decoding.request import Request
from .collectives import require_group

HEARTBEAT_S = 30.0                                   # an idle rank 0 steps at least this often
TIMEOUT = datetime.timedelta(minutes=30)             # for one message, far beyond a heartbeat and a step


class Lockstep:
    def __init__(self, group: Optional[dist.ProcessGroup] = None, heartbeat_s: float = HEARTBEAT_S):
        group = require_group(group)
        ranks = dist.get_process_group_ranks(group)
        self.group = dist.new_group(ranks, backend="gloo", timeout=TIMEOUT)
        self.root = ranks[0]
        self.leads = dist.get_rank() == self.root
        self.heartbeat_s = heartbeat_s

    def exchange(self, changes: QueueChanges) -> QueueChanges:
        """Rank 0: sends `changes` and returns them. The others: return rank 0's (their own are empty), with
        Request objects of rank 0's ids, prompts and parameters."""
        message = [None]
        if self.leads:
            message = [([(r.id, r.prompt, r.params) for r in changes.submitted], changes.cancelled, changes.stop)]
        dist.broadcast_object_list(message, src=self.root, group=self.group)
        if self.leads:
            return changes
        submitted, cancelled, stop = message[0]
        return QueueChanges([Request(*fields) for fields in submitted], cancelled, stop)
