"""Load shedding in the waiting queue: which request a more urgent arrival displaces when the
queue is full, and which requests have waited longer than `max_queue_time`.

Both shed only requests that were never scheduled: a preempted request waiting again has already
streamed tokens, and ending it would waste that work and break its stream. Shed requests end
with finish_reason "abort" and a detail starting with `SHED` (front ends answer
RESOURCE_EXHAUSTED / 429: retry later). Knows requests' priorities and times; not slots, pages or
the device.
"""

from __future__ import annotations

from collections.abc import Reversible

from jaxgen.scheduler.events import SHED
from jaxgen.scheduler.request import Request


def displaced_by(waiting: Reversible[Request], priority: int) -> Request | None:
    """The request an arrival of `priority` displaces from a full queue: the newest waiting
    request of the lowest priority (the largest number; lower is more urgent) among those never
    scheduled, if it is less urgent than the arrival; None when the arrival must be refused.
    `waiting` is in admission order (priority, then arrival), so that request is the last one
    never scheduled."""
    for request in reversed(waiting):
        if request.first_scheduled_time is None:
            return request if request.params.priority > priority else None
    return None


def displaced_detail(max_waiting: int, victim: Request, priority: int) -> str:
    return (f"{SHED}: the waiting queue is full (max_waiting={max_waiting}) and a request of "
            f"priority {priority} displaced this one (priority {victim.params.priority}); "
            f"retry later")


def overdue(request: Request, now: float, max_queue_time: float | None) -> str | None:
    """The detail that sheds `request` if it has waited, never scheduled, longer than
    `max_queue_time` seconds; else None."""
    if max_queue_time is None or request.first_scheduled_time is not None:
        return None
    waited = now - request.arrival_time
    if waited <= max_queue_time:
        return None
    return (f"{SHED}: waited {waited:.1f}s in the queue, over max_queue_time={max_queue_time:g}s; "
            f"retry later")
