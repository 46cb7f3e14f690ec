"""Multi-host: one model over the devices of several processes (`jax.distributed`), process 0
deciding and the others executing (docs/multi-host.md).

`group`: joining and start-up agreement; `wire`: the control channel's frames; `leader`: process
0's end (plans out, heartbeats, stopping the group); `worker`: every other process's loop.
"""

from jaxgen.distributed.group import GroupError, ProcessGroup, join, resolve
from jaxgen.distributed.leader import Leader
from jaxgen.distributed.worker import Worker

__all__ = ["GroupError", "Leader", "ProcessGroup", "Worker", "join", "resolve"]
