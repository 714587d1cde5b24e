"""Option haggling (fixed newstyle) against a real server, byte by byte.

Each test speaks to a real NbdServer over its Unix socket with the raw test
client (tests/support/nbd_rawclient.py) and checks the replies the protocol prescribes,
including what happens to options that are malformed or unknown.
"""

from __future__ import annotations

import logging
import struct

import pytest

from tests.support import nbd_rawclient as C
from tests.support.mirror import wait_for
from tests.support.nbd import raw_server

SIZE = 1 << 20


@pytest.fixture
def server(tmp_path):
    with raw_server(tmp_path, {"vol": (SIZE, False), "mirror": (SIZE // 2, True)},
                    negotiation_timeout=2.0) as (srv, paths):
        yield srv


def connect(srv):
    return C.connect_unix(srv.unix_path)


def closed_by_server(sock) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_greeting_offers_fixed_newstyle_and_no_zeroes(server):
    with connect(server) as s:
        assert C.greet(s) == 3


def test_unknown_client_flags_close_the_connection(server):
    with connect(server) as s:
        C.greet(s, client_flags=0x80)
        assert closed_by_server(s)


def test_list_names_every_export_then_acks(server):
    with connect(server) as s:
        C.greet(s)
        C.send_option(s, C.OPT["LIST"])
        replies = C.option_replies(s)
        names = [d[4:4 + struct.unpack(">I", d[:4])[0]].decode()
                 for t, d in replies if t == C.REP_SERVER]
        assert names == ["mirror", "vol"] and replies[-1][0] == C.REP_ACK
        C.send_option(s, C.OPT["LIST"], b"junk")
        assert C.option_replies(s)[-1][0] == C.REP_ERR_INVALID


def test_info_reports_size_flags_name_and_block_sizes_and_keeps_haggling(server):
    with connect(server) as s:
        C.greet(s)
        C.send_option(s, C.OPT["INFO"], C.go_data("vol", (1, 3)))
        replies = C.option_replies(s)
        infos = {struct.unpack(">H", d[:2])[0]: d for t, d in replies if t == C.REP_INFO}
        _t, size, flags = struct.unpack(">HQH", infos[0])
        assert size == SIZE
        # HAS_FLAGS FLUSH FUA TRIM WRITE_ZEROES MULTI_CONN FAST_ZERO; no DF without structured
        assert flags == 1 | 4 | 8 | 32 | 64 | 256 | 2048
        assert infos[1][2:] == b"vol"
        assert struct.unpack(">HIII", infos[3]) == (3, 1, 4096, 32 << 20)
        assert replies[-1] == (C.REP_ACK, b"")
        # still negotiating: GO works afterwards
        C.send_option(s, C.OPT["GO"], C.go_data("mirror"))
        replies = C.option_replies(s)
        _t, size, flags = struct.unpack(">HQH", replies[0][1])
        assert size == SIZE // 2 and flags == 1 | 2 | 256  # read-only, multi-conn


@pytest.mark.parametrize("data", [
    b"",                                        # too short
    struct.pack(">I", 1000) + b"vol" + b"\0\0",  # name length past the data
    C.go_data("vol")[:-1],                      # count field cut
    C.go_data("vol", (1,)) + b"\0",             # trailing byte
    struct.pack(">I", 3) + b"v\0l" + b"\0\0",   # NUL in name
    struct.pack(">I", 2) + b"\xff\xfe" + b"\0\0",  # not UTF-8
])
def test_malformed_info_is_err_invalid_and_the_session_goes_on(server, data):
    with connect(server) as s:
        C.greet(s)
        C.send_option(s, C.OPT["INFO"], data)
        assert C.option_replies(s)[-1][0] == C.REP_ERR_INVALID
        C.send_option(s, C.OPT["GO"], C.go_data("vol"))
        assert C.option_replies(s)[-1][0] == C.REP_ACK


def test_unknown_export_is_err_unknown_for_go_and_a_close_for_export_name(server):
    with connect(server) as s:
        C.greet(s)
        C.send_option(s, C.OPT["GO"], C.go_data("nope"))
        rtype, msg = C.option_replies(s)[-1]
        assert rtype == C.REP_ERR_UNKNOWN and b"nope" in msg
        C.send_option(s, C.OPT["EXPORT_NAME"], b"nope")
        assert closed_by_server(s)


@pytest.mark.parametrize("client_flags,tail", [(1, 124), (3, 0)])
def test_export_name_enters_transmission_with_or_without_the_zero_padding(server, client_flags, tail):
    with connect(server) as s:
        C.greet(s, client_flags)
        C.send_option(s, C.OPT["EXPORT_NAME"], b"vol")
        size, flags = struct.unpack(">QH", C.recv_exact(s, 10))
        assert size == SIZE and flags & 1
        assert C.recv_exact(s, tail) == bytes(tail)
        s.sendall(C.request(C.CMD_READ, 0, 16, handle=9))
        magic, err, handle = struct.unpack(">IIQ", C.recv_exact(s, 16))
        assert (magic, err, handle) == (C.SIMPLE_MAGIC, 0, 9)  # no padding was left in the stream


def test_structured_reply_with_data_is_invalid_and_meta_context_needs_it(server):
    with connect(server) as s:
        C.greet(s)
        C.send_option(s, C.OPT["STRUCTURED_REPLY"], b"x")
        assert C.option_replies(s)[-1][0] == C.REP_ERR_INVALID
        C.send_option(s, C.OPT["SET_META_CONTEXT"], C.meta_data("vol", ["base:allocation"]))
        assert C.option_replies(s)[-1][0] == C.REP_ERR_INVALID


@pytest.mark.parametrize("queries,listed", [
    ([], True), (["base:"], True), (["base:allocation"], True),
    (["qemu:dirty-bitmap:x"], False), (["base:nothing"], False),
])
def test_list_meta_context_matches_queries(server, queries, listed):
    with connect(server) as s:
        C.greet(s)
        C.send_option(s, C.OPT["STRUCTURED_REPLY"])
        C.option_replies(s)
        C.send_option(s, C.OPT["LIST_META_CONTEXT"], C.meta_data("vol", queries))
        replies = C.option_replies(s)
        contexts = [d[4:] for t, d in replies if t == C.REP_META_CONTEXT]
        assert contexts == ([b"base:allocation"] if listed else [])
        assert replies[-1][0] == C.REP_ACK


def test_meta_context_for_an_unknown_export_or_malformed_query(server):
    with connect(server) as s:
        C.greet(s)
        C.send_option(s, C.OPT["STRUCTURED_REPLY"])
        C.option_replies(s)
        C.send_option(s, C.OPT["SET_META_CONTEXT"], C.meta_data("nope", ["base:allocation"]))
        assert C.option_replies(s)[-1][0] == C.REP_ERR_UNKNOWN
        bad = struct.pack(">I", 3) + b"vol" + struct.pack(">I", 1000)  # 1000 queries, no bytes
        C.send_option(s, C.OPT["SET_META_CONTEXT"], bad)
        assert C.option_replies(s)[-1][0] == C.REP_ERR_INVALID


def test_context_selected_for_another_export_is_not_active_after_go(server):
    with connect(server) as s:
        C.greet(s)
        C.send_option(s, C.OPT["STRUCTURED_REPLY"])
        C.option_replies(s)
        C.send_option(s, C.OPT["SET_META_CONTEXT"], C.meta_data("mirror", ["base:allocation"]))
        assert C.option_replies(s)[0][0] == C.REP_META_CONTEXT
        C.send_option(s, C.OPT["GO"], C.go_data("vol"))
        C.option_replies(s)
        s.sendall(C.request(C.CMD_BLOCK_STATUS, 0, 4096, handle=3))
        assert C.ReplyReader(s, True).next().error == C.EINVAL


def test_starttls_is_refused_by_policy_and_unknown_options_are_unsupported(server):
    with connect(server) as s:
        C.greet(s)
        C.send_option(s, C.OPT["STARTTLS"])
        assert C.option_replies(s)[-1][0] == C.REP_ERR_POLICY
        C.send_option(s, 0x4242, b"whatever")
        assert C.option_replies(s)[-1][0] == C.REP_ERR_UNSUP
        C.send_option(s, C.OPT["ABORT"])
        assert C.option_replies(s) == [(C.REP_ACK, b"")]
        assert closed_by_server(s)


def test_bad_option_magic_and_oversized_option_data_close_the_connection(server):
    with connect(server) as s:
        C.greet(s)
        C.send_option(s, C.OPT["LIST"], magic=0x1122334455667788)
        assert closed_by_server(s)
    with connect(server) as s:
        C.greet(s)
        s.sendall(struct.pack(">QII", C.IHAVEOPT, C.OPT["GO"], 0xFFFFFFFF))
        assert closed_by_server(s)


def test_a_client_that_stalls_during_negotiation_is_dropped(server, caplog):
    caplog.set_level(logging.INFO, logger="cyclemirror.nbd")
    with connect(server) as s:
        C.greet(s)
        s.settimeout(20)  # a no-progress guard: the server's own timeout is 2 s
        assert closed_by_server(s)
    # dropped by the negotiation timeout, not by anything else
    wait_for(lambda: "the client stalled past the timeout" in caplog.text, 10,
             "the server to log why it dropped the client")


def test_endless_haggling_is_cut_off(server):
    with connect(server) as s:
        C.greet(s)
        s.settimeout(30)
        with pytest.raises((EOFError, ConnectionResetError, BrokenPipeError)):
            for _ in range(5000):
                C.send_option(s, 0x4242)
                C.option_replies(s)
