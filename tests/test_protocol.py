"""The wire protocol: every message round-trips; everything else is a typed ProtocolError."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from agentbus_zmq.bus import protocol as P
from agentbus_zmq.bus.protocol import ErrorCode, ProtocolError

ids = st.from_regex(r"[A-Za-z0-9._:@/+-]{1,128}", fullmatch=True)
u32 = st.integers(0, 2**32 - 1)
ticks = st.integers(0, 2**63 - 1)
text = st.text(max_size=200)
values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False) | text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(text, children, max_size=4),
    max_leaves=12,
)
maps = st.dictionaries(text, values, max_size=6)

messages = st.one_of(
    st.builds(P.Hello, ids, ids, u32),
    st.builds(P.Welcome, ids, ids, maps),
    st.builds(P.Observation, ticks, st.lists(u32, min_size=1, max_size=32)),
    st.builds(P.Action, ticks, u32, ticks),
    st.just(P.Heartbeat()),
    st.builds(P.Bye, st.text(max_size=1024)),
    st.builds(P.Error, u32, st.text(max_size=1024)),
    st.builds(P.Control, ticks, ids, maps),
    st.builds(P.Reply, ticks, st.booleans(), maps),
)

pytestmark = pytest.mark.unit


@given(messages)
def test_every_message_round_trips(msg):
    frame = P.encode(msg)
    assert P.decode(frame) == msg
    assert msgpack.unpackb(frame)[:2] == [P.PROTOCOL_VERSION, int(msg.TYPE)]


@given(hnp.arrays(dtype=st.sampled_from(["<f8", "<f4", "<i8", "<u1", "?", "<c16"]),
                  shape=hnp.array_shapes(min_dims=0, max_dims=4, max_side=6)))
def test_numpy_arrays_travel_as_dtype_shape_bytes(arr):
    out = P.unpack(P.pack({"a": arr}))["a"]
    assert out.dtype == arr.dtype and out.shape == arr.shape
    assert np.array_equal(out, arr, equal_nan=arr.dtype.kind in "fc")


@given(st.binary(max_size=300))
def test_random_bytes_raise_only_protocol_errors(data):
    try:
        P.decode(data)
    except ProtocolError as exc:
        assert isinstance(exc.code, ErrorCode)


@given(st.lists(values, max_size=6))
def test_arbitrary_msgpack_arrays_raise_only_protocol_errors(fields):
    try:
        P.decode(msgpack.packb([P.PROTOCOL_VERSION, *fields]))
    except ProtocolError:
        pass


def _code(frame: bytes, **kw) -> ErrorCode:
    with pytest.raises(ProtocolError) as info:
        P.decode(frame, **kw)
    return info.value.code


def test_truncated_message_is_malformed():
    frame = P.encode(P.Observation(3, [1, 2]))
    assert _code(frame[:-1]) is ErrorCode.MALFORMED


def test_not_an_array_is_malformed():
    assert _code(msgpack.packb({"type": 1})) is ErrorCode.MALFORMED
    assert _code(msgpack.packb([1])) is ErrorCode.MALFORMED


def test_wrong_version_is_refused_by_code():
    assert _code(msgpack.packb([2, 5])) is ErrorCode.UNSUPPORTED_VERSION
    assert _code(msgpack.packb(["1", 5])) is ErrorCode.MALFORMED


def test_unknown_type_is_refused():
    assert _code(msgpack.packb([P.PROTOCOL_VERSION, 99])) is ErrorCode.UNKNOWN_TYPE
    assert _code(msgpack.packb([P.PROTOCOL_VERSION, "ACTION", 1, 2, 3])) is ErrorCode.UNKNOWN_TYPE


@pytest.mark.parametrize("fields", [
    [1, 2],                      # too few
    [1, 2, 3, 4, 5],             # too many (cpu_us is the one optional field)
    [1, 2, 3, -4],               # negative cpu_us
    [1, 2, 3, 4.5],              # float cpu_us
    ["1", 2, 3],                 # tick not an int
    [True, 2, 3],                # bool is not an int
    [-1, 2, 3],                  # negative tick
    [1, 2**40, 3],               # action out of range
    [1, 2.5, 3],                 # float action
])
def test_bad_action_fields_are_refused(fields):
    assert _code(msgpack.packb([P.PROTOCOL_VERSION, P.MsgType.ACTION, *fields])) is ErrorCode.BAD_FIELD


def test_bad_hello_ids_are_refused():
    for bad in ["", "has space", "x" * 129, "é", 7]:
        frame = msgpack.packb([P.PROTOCOL_VERSION, P.MsgType.HELLO, bad, "null", 1])
        assert _code(frame) is ErrorCode.BAD_FIELD


def test_oversized_frame_is_refused_before_parsing():
    frame = P.encode(P.Bye("x" * 1000))
    assert _code(frame, max_bytes=100) is ErrorCode.TOO_LARGE


def test_object_arrays_never_travel():
    with pytest.raises(TypeError):
        P.pack(np.array([object()], dtype=object))
    payload = msgpack.packb(["|O", [1], b"\x00" * 8])
    frame = msgpack.packb([P.PROTOCOL_VERSION, P.MsgType.WELCOME, "s", "a", {"x": msgpack.ExtType(P.EXT_NDARRAY, payload)}])
    assert _code(frame) is ErrorCode.BAD_FIELD


def test_array_with_wrong_byte_count_is_refused():
    payload = msgpack.packb(["<f8", [3], b"\x00" * 16])
    frame = msgpack.packb([P.PROTOCOL_VERSION, P.MsgType.WELCOME, "s", "a", {"x": msgpack.ExtType(P.EXT_NDARRAY, payload)}])
    assert _code(frame) is ErrorCode.BAD_FIELD


def test_unknown_extension_type_is_refused():
    frame = msgpack.packb([P.PROTOCOL_VERSION, P.MsgType.WELCOME, "s", "a", {"x": msgpack.ExtType(42, b"")}])
    assert _code(frame) is ErrorCode.BAD_FIELD


def test_pickle_is_never_used():
    class Thing:
        pass

    with pytest.raises(TypeError, match="no pickle"):
        P.pack(Thing())


def test_every_error_code_has_a_hint():
    assert set(P.ERROR_HINTS) == set(ErrorCode)


@given(st.sampled_from([P.Action, P.Observation]),
       st.lists(st.one_of(values, st.lists(st.integers(-5, 2**33), max_size=40)), min_size=1, max_size=4))
def test_a_records_quick_accept_takes_exactly_what_its_precise_checks_take(record, fields):
    obj = msgpack.unpackb(msgpack.packb([P.PROTOCOL_VERSION, int(record.TYPE), *fields]))
    quick = record._accept(obj)
    try:
        precise = record.from_wire(obj[2:])
    except ProtocolError:
        assert quick is None
    else:
        assert quick == precise and P.decode(msgpack.packb(obj)) == precise


@given(st.sampled_from([P.Action, P.Observation]), st.sampled_from([float, bool]),
       st.one_of(st.just(float(P.PROTOCOL_VERSION)), st.just(True)), st.booleans())
def test_only_integer_versions_and_type_codes_are_decoded(record, code_type, bad_version, bad_code):
    fields = [0, 4, 0] if record is P.Action else [0, [1, 2]]
    obj = [bad_version if not bad_code else P.PROTOCOL_VERSION,
           code_type(int(record.TYPE)) if bad_code else int(record.TYPE), *fields]
    with pytest.raises(ProtocolError):
        P.decode(msgpack.packb(obj))


def test_a_float_type_code_is_refused_on_the_fast_path_too():
    assert _code(msgpack.packb([1, 4.0, 0, 4, 0])) == ErrorCode.UNKNOWN_TYPE
    assert _code(msgpack.packb([1, 3.0, 0, [1, 2]])) == ErrorCode.UNKNOWN_TYPE


@pytest.mark.parametrize("dtype", [
    {"names": ["a"], "formats": ["<f8"], "offsets": [2**63]},
    {"names": ["a"], "formats": ["<f8"], "itemsize": 2**64 - 1},
    "V999999999999999999", "[('a', '<f8')]", "<f8,<i4", 7,
])
def test_hostile_array_dtypes_raise_protocol_errors_only(dtype):
    payload = msgpack.packb([dtype, [1], b"\0" * 8])
    frame = msgpack.packb([1, int(P.MsgType.CONTROL), 1, "x", {"a": msgpack.ExtType(P.EXT_NDARRAY, payload)}])
    assert _code(frame) == ErrorCode.BAD_FIELD


def test_msgpack_timestamps_are_refused_like_other_extensions():
    stamp = msgpack.Timestamp(1, 0)
    frame = msgpack.packb([1, int(P.MsgType.CONTROL), 1, "stats", {"when": [stamp]}], datetime=False)
    assert _code(frame) == ErrorCode.BAD_FIELD
    frame = msgpack.packb([1, int(P.MsgType.CONTROL), 1, "stats", {"x": msgpack.ExtType(5, b"")}])
    assert _code(frame) == ErrorCode.BAD_FIELD


def test_maps_nested_past_the_limit_are_refused():
    deep: list = []
    for _ in range(40):
        deep = [deep]
    assert _code(msgpack.packb([1, int(P.MsgType.CONTROL), 1, "stats", {"d": deep}])) == ErrorCode.BAD_FIELD


def test_encode_observation_is_encode_of_an_observation():
    assert P.encode_observation(9, [3, 1]) == P.encode(P.Observation(9, [3, 1]))


def test_encode_host_observation_is_encode_of_a_host_observation():
    members, obs = np.arange(3, dtype=np.uint16), np.array([[1, 0], [2, 4], [7, 2]], dtype=np.uint16)
    frame = P.encode(P.HostObservation(5, members, obs))
    assert P.encode_host_observation(5, P.array_ext(members), obs) == frame
    assert P.decode(frame) == P.HostObservation(5, members, obs)


@pytest.mark.parametrize("msg", [
    [1, 10, "h", "k", 1, "a", 0, 0],                 # count 0
    [1, 10, "h", "k", 1, "a", 0, P.MAX_HOST_AGENTS + 1],
    [1, 10, "h", "k", 1, "a b", 0, 3],               # ids that are not ids
    [1, 12, 0, [0, 1], [[0, 0], [1, 1]]],            # lists, not arrays
    [1, 14, [], "x"], [1, 14, [P.MAX_HOST_AGENTS], "x"],
])
def test_bad_host_frames_are_refused(msg):
    assert _code(msgpack.packb(msg)) == ErrorCode.BAD_FIELD


def test_host_arrays_must_have_the_documented_shapes():
    ext = lambda a: msgpack.ExtType(P.EXT_NDARRAY, msgpack.packb([a.dtype.str, list(a.shape), a.tobytes()]))
    members = np.arange(2, dtype=np.uint16)
    for obs in (np.zeros((3, 2), np.uint16), np.zeros((2, 40), np.uint16), np.zeros(2, np.uint16),
                np.zeros((2, 2), np.complex64)):
        assert _code(msgpack.packb([1, 12, 0, ext(members), ext(obs)])) == ErrorCode.BAD_FIELD
    for actions in (np.zeros((), np.int32), np.zeros(2, np.complex64)):
        assert _code(msgpack.packb([1, 13, 0, ext(actions), 0])) == ErrorCode.BAD_FIELD
    # an array world's rows: observations of any shape, one per member, and array actions
    for obs in (np.zeros((2, 2), np.float64), np.zeros((2, 3, 4), np.float32)):
        assert P.decode(msgpack.packb([1, 12, 0, ext(members), ext(obs)])).obs.shape == obs.shape
    assert P.decode(msgpack.packb([1, 13, 0, ext(np.zeros((2, 3), np.float32)), 0])).actions.shape == (2, 3)
    info = {"reward": ext(np.ones(2, np.float32)), "episode": ext(np.zeros(2, np.uint32))}
    assert P.decode(msgpack.packb([1, 12, 0, ext(members), ext(np.zeros((2, 2), np.uint16)), info])).info["reward"][1] == 1
    assert _code(msgpack.packb([1, 12, 0, ext(members), ext(np.zeros((2, 2), np.uint16)),
                                {"reward": ext(np.ones(3, np.float32))}])) == ErrorCode.BAD_FIELD
    assert _code(msgpack.packb([1, 3, 0, [1], {"cheat": 1}])) == ErrorCode.BAD_FIELD


def test_single_agents_observe_and_act_in_arrays_where_the_world_says_so():
    obs = np.arange(6, dtype=np.float32).reshape(2, 3)
    msg = P.decode(P.encode(P.Observation(4, obs, {"reward": 1.5, "episode": 2})))
    assert np.array_equal(msg.obs, obs) and msg.info == {"reward": 1.5, "episode": 2}
    assert P.decode(P.encode(P.Observation(4, [1, 2]))) == P.Observation(4, [1, 2])      # version 1 as it was
    act = P.decode(P.encode(P.Action(4, np.array([0.5, -1.0], np.float32), 3)))
    assert act.action.tolist() == [0.5, -1.0] and act.compute_us == 3


def test_the_welcome_encoder_makes_the_bytes_encode_makes():
    import numpy as np

    params = {"mode": "lockstep", "deadline_ms": 1000, "world": {"width": 5, "obstacles": list(range(3000))}}
    enc = P.WelcomeEncoder("sess", params)
    assert enc.welcome("a1", {"arena": 3, "token": "t"}) == P.encode(
        P.Welcome("sess", "a1", {**params, "arena": 3, "token": "t"}))
    arenas = np.arange(7, dtype=np.uint32)
    frame = enc.host_welcome("h1", {"token": "t"}, arenas)
    assert frame == P.encode(P.HostWelcome("sess", "h1", {**params, "token": "t"}, arenas))
    assert P.decode(frame) == P.HostWelcome("sess", "h1", {**params, "token": "t"}, arenas)
    many = P.WelcomeEncoder("s", {f"k{i}": i for i in range(20)})   # a map of 16 entries or more
    assert P.decode(many.welcome("a", {"x": 1})).params == {**{f"k{i}": i for i in range(20)}, "x": 1}


def test_cpu_us_is_optional_on_actions():
    assert P.decode(P.encode(P.Action(1, 2, 30))) == P.Action(1, 2, 30, None)
    assert P.decode(P.encode(P.Action(1, 2, 30, 25))) == P.Action(1, 2, 30, 25)
    import numpy as np

    a = P.HostAction(1, np.array([1, 2], np.uint8), 30, 20)
    assert P.decode(P.encode(a)) == a and P.decode(P.encode(P.HostAction(1, a.actions, 30))).cpu_us is None
