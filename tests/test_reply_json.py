"""The schedule reply's bytes, built per decision (`schedule_reply_json`), are the model's:
what peers parse, and what older peers accept (fields left out while they keep their old
meaning), stay byte for byte as `ScheduleReply.model_dump_json()` writes them."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from common.models import (
    AnnounceReply,
    Decision,
    ParentRef,
    ScheduleReply,
    schedule_reply_json,
)

text = st.text(max_size=12)  # any string: quotes, escapes, control and non-ASCII characters
refs = st.builds(ParentRef, id=text, addr=text, transport=st.integers(1, 255))
maybe_int = st.none() | st.integers(0, 1 << 40)
decisions = st.builds(
    Decision, piece=st.integers(0, 1 << 20),
    action=st.sampled_from(["parents", "source", "wait"]), chunk=st.none() | text,
    parents=st.lists(refs, max_size=4), epoch=maybe_int, first=maybe_int, last=maybe_int,
    reason=st.none() | text)
replies = st.none() | st.builds(AnnounceReply, accepted=st.integers(0, 4096),
                                rejected=st.lists(st.integers(0, 1 << 20), max_size=3),
                                deferred=st.lists(st.integers(0, 1 << 20), max_size=3))


@given(st.lists(decisions, max_size=6), replies)
def test_a_reply_built_per_decision_is_the_models_bytes(ds: list[Decision],
                                                        announced: AnnounceReply | None) -> None:
    want = ScheduleReply(decisions=ds, announced=announced).model_dump_json().encode()
    assert schedule_reply_json(ds, announced) == want


def test_an_http_parent_and_no_announce_are_left_out() -> None:
    d = Decision(piece=1, action="parents", chunk="c",
                 parents=[ParentRef(id="a", addr="h:1"), ParentRef(id="b", addr="h:2",
                                                                    transport=2)])
    assert schedule_reply_json([d]) == (
        b'{"decisions":[{"piece":1,"action":"parents","chunk":"c","parents":[{"id":"a",'
        b'"addr":"h:1"},{"id":"b","addr":"h:2","transport":2}],"epoch":null,"first":null,'
        b'"last":null,"reason":null}]}')
    assert schedule_reply_json([]) == b'{"decisions":[]}'
