"""A job's followers: every event in order, and a keepalive when the service's tick finds them without news."""

import asyncio

from app.params import GenerationParams
from app.services.jobs import Job, JobService
from app.store.ledger import JobState

PARAMS = GenerationParams(model="m", prompt="a cat", negative_prompt="", seed=1, steps=2, guidance_scale=7.5,
                          width=64, height=64, sampler="pndm", num_images=1)


async def _settle(seen: list, expected: list) -> None:
    """Let the followers run until they saw `expected` (a bounded number of loop turns, no clock)."""
    for _ in range(100):
        if seen == expected:
            return
        await asyncio.sleep(0)
    assert seen == expected


def test_an_idle_follower_gets_a_keepalive_on_each_tick_and_every_event_in_order():
    async def scenario() -> None:
        service = JobService(generations=None, ledger=None, present=None)
        waiting = Job(id="gen_00000001", params=PARAMS, response_format="url", owner=None,
                      reproducibility_key=None, durable=False)
        service._jobs[waiting.id] = waiting
        seen: list[str | None] = []

        async def follow() -> None:
            async for event in waiting.follow():
                seen.append(None if event is None else event.name)

        follower = asyncio.create_task(follow())
        waiting.emit("queued", {"position": 2})
        await _settle(seen, ["queued"])
        service.keepalive()  # no news: a keepalive
        await _settle(seen, ["queued", None])
        waiting.emit("queued", {"position": 1})  # news: the event, no keepalive
        await _settle(seen, ["queued", None, "queued"])
        service.keepalive()
        service.keepalive()  # two ticks before the follower ran: one keepalive
        await _settle(seen, ["queued", None, "queued", None])
        waiting.state = JobState.SUCCEEDED
        waiting.emit("succeeded", {})
        await asyncio.wait_for(follower, 1.0)  # the final event ends the stream
        assert seen == ["queued", None, "queued", None, "succeeded"]
        assert [e.id for e in waiting.events] == [1, 2, 3]

    asyncio.run(scenario())
