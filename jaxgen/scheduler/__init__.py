"""Host-side scheduling for continuous batching over a paged KV cache (no jax imports).

`Scheduler.schedule()` -> `StepPlan` -> runtime -> `StepOutput` -> `Scheduler.update()` ->
`RequestEvent`s.
"""

from jaxgen.scheduler.config import SchedulerConfig
from jaxgen.scheduler.events import FINISH_REASONS, RequestEvent, Usage
from jaxgen.scheduler.page_allocator import NULL_PAGE, PageAllocator
from jaxgen.scheduler.plan import PrefillChunk, SlotAssignment, StepOutput, StepPlan
from jaxgen.scheduler.request import Request, RequestStatus
from jaxgen.scheduler.samples import TokenLogprobs
from jaxgen.scheduler.scheduler import QueueFullError, Scheduler

__all__ = [
    "FINISH_REASONS", "NULL_PAGE", "PageAllocator", "PrefillChunk", "QueueFullError", "Request",
    "RequestEvent", "RequestStatus", "Scheduler", "SchedulerConfig", "SlotAssignment", "StepOutput",
    "StepPlan", "TokenLogprobs", "Usage",
]
