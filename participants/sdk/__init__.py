"""The participant SDK: write a saga participant as a few decorated async functions.

::

    from participants.sdk import Message, Participant, Reply, RunnerSettings, run_participant

    loyalty = Participant("loyalty")

    @loyalty.on("PaymentCaptured")
    async def award(msg: Message) -> Reply:
        ...

    await run_participant(loyalty, RunnerSettings(redis_url=url), stop)

See ``docs/participants.md``.  The commit primitive, the group reader, the
handlers' auto-pipelining client and Lua scripts built once are imported by
module path (:mod:`participants.sdk.commit`, :mod:`participants.sdk.consumer`,
:mod:`participants.sdk.autopipeline`, :mod:`participants.sdk.scripts`).
"""

from participants.sdk.errors import ParticipantError, Reject, Retry
from participants.sdk.participant import Handler, HandlerResult, Message, Participant, Reply, Subscription
from participants.sdk.runner import Runner, RunnerSettings, RunnerStats, run_participant

__all__ = [
    "Handler",
    "HandlerResult",
    "Message",
    "Participant",
    "ParticipantError",
    "Reject",
    "Reply",
    "Retry",
    "Runner",
    "RunnerSettings",
    "RunnerStats",
    "Subscription",
    "run_participant",
]
