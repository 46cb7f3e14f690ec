"""What crosses the pipes between the server process (`EngineClient`) and the engine process
(`engine_process.engine_main`): one frozen dataclass per message, pickled in lists (one list per
wake-up on either side, so a busy engine pays one transfer per step, not one per request).

Server -> engine: `AddRequest`, `AbortRequest`, `CaptureProfile`, `Stop`.
Engine -> server: first `Ready` (or `Failed`), then `EventBatch`es: a list of `Output`,
`StepTimed`, `LaunchTimed`, `DraftsVerified`, `Rejected`, `Profiled`, `Dead`, each batch with the
engine's `EngineStats` as of sending. A batch goes out at least every HEARTBEAT_INTERVAL_S, empty
if need be: a server that hears nothing for longer than the step watchdog's limit knows the
process is stuck (stopped, or wedged with the GIL held).
"""

from __future__ import annotations

import dataclasses

from jaxgen.config import ENGINE_HEARTBEAT_S
from jaxgen.engine_api import EngineInfo, EngineStats
from jaxgen.request_stream import RequestOutput
from jaxgen.sampling_params import SamplingParams

HEARTBEAT_INTERVAL_S = ENGINE_HEARTBEAT_S


# -- server -> engine ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class AddRequest:
    request_id: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    deadline: float | None  # time.monotonic() of the server (one host, one clock)
    after: str | None = None  # Engine.add_request's
    arrival: float | None = None  # when the server took it (sent again after a restart)


@dataclasses.dataclass(frozen=True)
class AbortRequest:
    request_id: str


@dataclasses.dataclass(frozen=True)
class CaptureProfile:
    seq: int  # answered by the `Profiled` of the same seq
    duration_s: float


@dataclasses.dataclass(frozen=True)
class Stop:
    """Stop admitting, end the loop, send what is left, exit."""


# -- engine -> server ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Ready:
    info: EngineInfo
    tokenizer_dir: str  # a copy for the server process, removed once it is loaded
    stats: EngineStats


@dataclasses.dataclass(frozen=True)
class Failed:
    """The engine could not start."""

    error: BaseException


@dataclasses.dataclass(frozen=True)
class Output:
    output: RequestOutput  # text already detokenized, stop strings applied


@dataclasses.dataclass(frozen=True)
class StepTimed:
    step_seconds: float
    host_gap_seconds: float | None


@dataclasses.dataclass(frozen=True)
class LaunchTimed:
    device_drained: bool
    launch_seconds: float


@dataclasses.dataclass(frozen=True)
class DraftsVerified:
    drafts: int
    accepted: int


@dataclasses.dataclass(frozen=True)
class Rejected:
    """An add the engine refused (checked by the client already: the engine may have died, or
    its waiting queue be full with no request the new one may displace)."""

    request_id: str
    message: str
    queue_full: bool = False


@dataclasses.dataclass(frozen=True)
class Profiled:
    seq: int
    directory: str | None
    error: BaseException | None


@dataclasses.dataclass(frozen=True)
class Dead:
    message: str
    hung: bool = False  # the engine's step watchdog fired (EngineHungError), not a crash
    group_lost: bool = False  # a process of a multi-process engine was lost (GroupLostError)


@dataclasses.dataclass(frozen=True)
class EventBatch:
    events: list
    stats: EngineStats
