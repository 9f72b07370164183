"""The PROXY protocol parser on its own (no sockets): every valid header round-trips, every
prefix of one waits for more, and any other byte string is refused with a named outcome.

The server trusts these properties: it counts a connection's outcome from ``parse_header``'s
answer on whatever prefix it has read so far, so that answer must never change its mind
(``None`` until the header is complete or impossible, then the same answer for any longer
input), never raise anything but :class:`ProxyHeaderError`, and never keep asking for bytes
past a fixed maximum.  The strategies here also feed ``test_proxy_server.py``'s storms.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iocp_echo.proxy_protocol import (
    DEFAULT_TRUSTED,
    MAX_V1_LENGTH,
    MAX_V2_LENGTH,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderError,
    TrustedSources,
    bytes_wanted,
    encode_v1,
    encode_v2,
    parse_header,
)

Address = tuple[str, int]

# -- strategies ------------------------------------------------------------------------------

ports = st.integers(0, 65535)
ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
#: TLVs whose total stays well inside MAX_V2_LENGTH (a longer header is refused as too_long).
tlv_lists = st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=300)), max_size=6).map(tuple)


def _pairs(addresses: st.SearchStrategy[str]) -> st.SearchStrategy[tuple[Address, Address]]:
    return st.tuples(st.tuples(addresses, ports), st.tuples(addresses, ports))


@st.composite
def valid_headers(draw: st.DrawFn) -> tuple[bytes, ProxyHeader]:
    """A header as a balancer would send it, and what parsing it must give."""
    kind = draw(
        st.sampled_from(["v1 tcp4", "v1 tcp6", "v1 unknown", "v2 tcp4", "v2 tcp6", "v2 unspec"])
        | st.just("v2 local")
    )
    if kind == "v1 unknown":
        data = encode_v1(None, None)
        return data, ProxyHeader(1, "PROXY", None, None, len(data))
    if kind.startswith("v1"):
        source, destination = draw(_pairs(ipv4 if kind == "v1 tcp4" else ipv6))
        data = encode_v1(source, destination)
        return data, ProxyHeader(1, "PROXY", _norm(source), _norm(destination), len(data))
    tlvs = draw(tlv_lists)
    if kind == "v2 local":
        data = encode_v2(None, None, local=True, tlvs=tlvs)
        return data, ProxyHeader(2, "LOCAL", None, None, len(data), tlvs)
    if kind == "v2 unspec":
        data = encode_v2(None, None, tlvs=tlvs)
        return data, ProxyHeader(2, "PROXY", None, None, len(data), tlvs)
    source, destination = draw(_pairs(ipv4 if kind == "v2 tcp4" else ipv6))
    data = encode_v2(source, destination, tlvs=tlvs)
    return data, ProxyHeader(2, "PROXY", _norm(source), _norm(destination), len(data), tlvs)


def _norm(address: Address) -> Address:
    return (str(ipaddress.ip_address(address[0])), address[1])


@st.composite
def mutated_headers(draw: st.DrawFn) -> bytes:
    """A valid header damaged the ways a broken balancer or a fuzzer would damage it."""
    data, _ = draw(valid_headers())
    how = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "oversized"]))
    if how == "flip":
        index = draw(st.integers(0, len(data) - 1))
        mask = draw(st.integers(1, 255))
        return data[:index] + bytes([data[index] ^ mask]) + data[index + 1 :]
    if how == "truncate":
        return data[: draw(st.integers(0, len(data) - 1))]
    if how == "insert":
        index = draw(st.integers(0, len(data)))
        return data[:index] + draw(st.binary(min_size=1, max_size=20)) + data[index:]
    if how == "delete":
        start = draw(st.integers(0, len(data) - 1))
        return data[:start] + data[start + draw(st.integers(1, 20)) :]
    return draw(oversized_headers())


@st.composite
def oversized_headers(draw: st.DrawFn) -> bytes:
    """A version 2 header whose length field promises more than is ever accepted, or a
    version 1 line with no CRLF within its 107 bytes."""
    if draw(st.booleans()):
        data, _ = draw(valid_headers())
        length = draw(st.integers(MAX_V2_LENGTH - 16 + 1, 65535))
        body = data[16:] if data.startswith(V2_SIGNATURE) else b""
        head = V2_SIGNATURE + bytes([draw(st.sampled_from([0x20, 0x21])), 0x11])
        return head + struct.pack("!H", length) + body + draw(st.binary(max_size=100))
    text = draw(st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=102))
    return b"PROXY " + text.encode("ascii")[: draw(st.integers(MAX_V1_LENGTH - 6, 400))]


#: Anything a remote peer could send first: random bytes, damaged headers, near-headers.
hostile_bytes = st.one_of(
    st.binary(max_size=300),
    st.binary(max_size=40).map(lambda tail: b"PROXY " + tail),
    st.binary(max_size=40).map(lambda tail: V2_SIGNATURE + tail),
    mutated_headers(),
)

PROPERTY = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def outcome_of(data: bytes) -> str:
    """What the server must count for a connection whose client sends *data* and then its
    EOF: the header's version (or ``local``), the refusal, or ``incomplete``."""
    try:
        header = parse_header(data)
    except ProxyHeaderError as exc:
        return exc.outcome
    if header is None:
        return "incomplete"
    if header.command == "LOCAL":
        return "local"
    return f"v{header.version}"


# -- valid headers ---------------------------------------------------------------------------


@PROPERTY
@given(valid_headers())
def test_any_valid_header_round_trips(case: tuple[bytes, ProxyHeader]) -> None:
    data, expected = case
    for form in (data, bytearray(data), memoryview(data)):
        assert parse_header(form) == expected
    assert bytes_wanted(data) == 0


@PROPERTY
@given(valid_headers(), st.binary(max_size=5000))
def test_what_follows_a_header_is_not_part_of_it(
    case: tuple[bytes, ProxyHeader], tail: bytes
) -> None:
    """A header and the client's first bytes often arrive together: the header's *length*
    says where the client's data starts, whatever that data is."""
    data, expected = case
    assert parse_header(data + tail) == expected
    assert parse_header(memoryview(data + tail)) == expected


@PROPERTY
@given(valid_headers())
def test_every_proper_prefix_waits_and_bytes_wanted_never_overshoots(
    case: tuple[bytes, ProxyHeader],
) -> None:
    """A header split over many packets: each prefix is incomplete (``None``, never an
    error), and a reader that asks for ``bytes_wanted`` bytes at a time (the TLS path, which
    must leave the first TLS record on the socket) lands exactly on the header's end."""
    data, expected = case
    for end in range(len(data)):
        prefix = data[:end]
        assert parse_header(prefix) is None, prefix
        wanted = bytes_wanted(prefix)
        assert 1 <= wanted <= len(data) - end, (prefix, wanted)
    # The reader itself, greedy: it always takes everything it is allowed to.
    read = b""
    steps = 0
    while wanted := bytes_wanted(read):
        read += data[len(read) : len(read) + wanted]
        steps += 1
        assert steps <= len(data)
    assert read == data
    assert parse_header(read) == expected


def test_known_headers() -> None:
    """Examples from the specification's text, checked by hand once."""
    assert parse_header(b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\nGET /") == ProxyHeader(
        1, "PROXY", ("192.168.0.1", 56324), ("192.168.0.11", 443), 47
    )
    assert parse_header(b"PROXY TCP6 2001:DB8::1 ::1 1 65535\r\n") == ProxyHeader(
        1, "PROXY", ("2001:db8::1", 1), ("::1", 65535), 36
    )
    # The specification: whatever follows UNKNOWN up to the CRLF is to be ignored.
    assert parse_header(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n") == ProxyHeader(
        1, "PROXY", None, None, 35
    )
    # The specification's worst case, 107 bytes with its CRLF: UNKNOWN with two full IPv6
    # addresses.
    longest = (
        b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff "
        b"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n"
    )
    assert len(longest) == MAX_V1_LENGTH
    assert parse_header(longest) == ProxyHeader(1, "PROXY", None, None, MAX_V1_LENGTH)
    tcp6 = longest.replace(b"UNKNOWN", b"TCP6")
    assert parse_header(tcp6) == ProxyHeader(
        1,
        "PROXY",
        ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535),
        ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535),
        104,
    )
    v2 = V2_SIGNATURE + bytes([0x21, 0x11, 0, 12]) + bytes([10, 0, 0, 1, 10, 0, 0, 2, 0, 80, 1, 0])
    assert parse_header(v2) == ProxyHeader(2, "PROXY", ("10.0.0.1", 80), ("10.0.0.2", 256), 28)


def test_v2_unix_and_local_carry_no_address() -> None:
    """UNIX sockets (family 0x31) and LOCAL: no IP address, the connection's own stands;
    a LOCAL header's address block is ignored, whatever its family."""
    unix = V2_SIGNATURE + bytes([0x21, 0x31]) + struct.pack("!H", 216) + b"/s" * 108
    assert parse_header(unix) == ProxyHeader(2, "PROXY", None, None, 232)
    block = bytes([1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 0, 2])
    local = V2_SIGNATURE + bytes([0x20, 0x11, 0, 12]) + block
    assert parse_header(local) == ProxyHeader(2, "LOCAL", None, None, 28)


def test_encoders_refuse_mixed_families() -> None:
    with pytest.raises(ValueError, match="same IP version"):
        encode_v1(("10.0.0.1", 1), ("::1", 2))
    with pytest.raises(ValueError, match="same IP version"):
        encode_v2(("10.0.0.1", 1), ("::1", 2))


# -- anything else ---------------------------------------------------------------------------


def _parse(data: bytes) -> ProxyHeader | ProxyHeaderError | None:
    try:
        return parse_header(data)
    except ProxyHeaderError as exc:
        return exc


def assert_refused_or_parsed(data: bytes) -> None:
    """The contract for any input (see the module docstring)."""
    header = _parse(data)
    if isinstance(header, ProxyHeaderError):
        assert header.outcome in ("malformed", "too_long"), header.outcome
        assert str(header)
        # Settled: more bytes never change a refusal.
        for more in (b"\r\n", b"\x00" * 5000, data):
            again = _parse(data + more)
            assert isinstance(again, ProxyHeaderError) and again.outcome == header.outcome
        with pytest.raises(ProxyHeaderError):
            bytes_wanted(data)
        return
    if header is None:
        limit = MAX_V1_LENGTH if data[:1] == b"P" else MAX_V2_LENGTH
        assert len(data) < limit, (len(data), limit)
        wanted = bytes_wanted(data)
        assert 1 <= wanted <= limit - len(data)
        # Still waiting: no shorter prefix was ever refused either.
        for end in range(len(data)):
            assert parse_header(data[:end]) is None
        return
    assert 0 < header.length <= len(data)
    assert parse_header(data[: header.length]) == header
    assert bytes_wanted(data[: header.length]) == 0
    assert header.command in ("PROXY", "LOCAL") and header.version in (1, 2)


@PROPERTY
@given(st.binary(max_size=5000))
def test_any_bytes_are_refused_parsed_or_waited_for_within_the_maximum(data: bytes) -> None:
    assert_refused_or_parsed(data)


@PROPERTY
@given(hostile_bytes)
def test_damaged_headers_are_refused_parsed_or_waited_for_within_the_maximum(data: bytes) -> None:
    assert_refused_or_parsed(data)


@PROPERTY
@given(oversized_headers())
def test_a_v2_length_past_the_maximum_or_a_v1_line_past_107_bytes_is_too_long(
    data: bytes,
) -> None:
    """Refused as soon as it is known: the v2 length field is in the first 16 bytes, and a
    v1 line is never longer than 107 bytes."""
    known_at = MAX_V1_LENGTH if data.startswith(b"PROXY ") else 16
    for form in (data, data[:known_at]):
        with pytest.raises(ProxyHeaderError) as refused:
            parse_header(form)
        assert refused.value.outcome == "too_long"
    assert parse_header(data[: known_at - 1]) is None


def _v2(command: int, family: int, body: bytes) -> bytes:
    return V2_SIGNATURE + bytes([command, family]) + struct.pack("!H", len(body)) + body


TCP4_BLOCK = bytes([192, 0, 2, 1, 192, 0, 2, 2, 0, 80, 0, 81])

MALFORMED = {
    "v1 lower-case": b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
    "v1 leading zero in IPv4": b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n",
    "v1 leading zero in port": b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
    "v1 port 65536": b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",
    "v1 negative port": b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n",
    "v1 signed port": b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n",
    "v1 empty port": b"PROXY TCP4 1.2.3.4 5.6.7.8  2\r\n",
    "v1 double space": b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n",
    "v1 trailing space": b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n",
    "v1 tab": b"PROXY TCP4 1.2.3.4\t5.6.7.8 1 2\r\n",
    "v1 TCP4 with IPv6": b"PROXY TCP4 ::1 ::2 1 2\r\n",
    "v1 TCP6 with IPv4": b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n",
    "v1 mixed families": b"PROXY TCP6 ::1 5.6.7.8 1 2\r\n",
    "v1 IPv6 scope id": b"PROXY TCP6 fe80::1%eth0 fe80::2 1 2\r\n",
    "v1 host name": b"PROXY TCP4 localhost 5.6.7.8 1 2\r\n",
    "v1 UDP4": b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n",
    "v1 missing port": b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
    "v1 extra field": b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
    "v1 LF only": b"PROXY UNKNOWN\n",
    "v1 CR not followed by LF": b"PROXY UNKNOWN\rX\r\n",
    "v1 NUL byte": b"PROXY TCP4 1.2.3.4 5.6.7.8 1\x00 2\r\n",
    "v1 non-ASCII digit": "PROXY TCP4 1.2.3.4 5.6.7.8 \u0661 2\r\n".encode(),
    "v1 empty family": b"PROXY \r\n",
    "v2 TLV past the end": _v2(0x21, 0x11, TCP4_BLOCK + bytes([1, 0, 5, 1, 2])),
    "v2 truncated TLV header": _v2(0x21, 0x11, TCP4_BLOCK + bytes([1, 0])),
    "v2 short TCP4 block": _v2(0x21, 0x11, TCP4_BLOCK[:11]),
    "v2 short TCP6 block": _v2(0x21, 0x21, bytes(35)),
    "v2 UDP over IPv4": _v2(0x21, 0x12, TCP4_BLOCK),
    "v2 UDP over IPv6": _v2(0x21, 0x22, bytes(36)),
    "v2 UNIX datagram": _v2(0x21, 0x32, bytes(216)),
    "v2 unknown family": _v2(0x21, 0x41, b""),
    "v2 version 1": _v2(0x11, 0x11, TCP4_BLOCK),
    "v2 version 3": _v2(0x31, 0x11, TCP4_BLOCK),
    "v2 command 2": _v2(0x22, 0x11, TCP4_BLOCK),
    "v2 bad signature": b"\r\n\r\n\x00\r\nQUIT\r" + bytes([0x21, 0x11, 0, 12]) + TCP4_BLOCK,
    "TLS ClientHello": bytes([0x16, 0x03, 0x01, 0x02, 0x00, 0x01]),
    "HTTP request": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_strictness(name: str) -> None:
    """What the specification does not allow is refused as malformed, as soon as a prefix
    shows it (the first byte for another protocol, the command and family bytes of v2 before
    its length is known)."""
    data = MALFORMED[name]
    with pytest.raises(ProxyHeaderError) as refused:
        parse_header(data)
    assert refused.value.outcome == "malformed"
    assert_refused_or_parsed(data)


@pytest.mark.parametrize(
    ("data", "known_at"),
    [
        (b"GET / HTTP/1.1\r\n", 1),
        (b"PROXX", 5),
        (b"PROXY TCP4 1.2.3.4\x00", 19),
        (_v2(0x21, 0x12, TCP4_BLOCK), 14),  # UDP: refused before the length field
        (_v2(0x22, 0x11, TCP4_BLOCK), 13),
        (b"\r\n\r\n\x00\r\nQUIx", 11),
        (b"\r\n\r\n\x00\r\nQUIT\r", 12),
    ],
)
def test_refused_as_soon_as_a_prefix_shows_it(data: bytes, known_at: int) -> None:
    assert parse_header(data[: known_at - 1]) is None
    with pytest.raises(ProxyHeaderError):
        parse_header(data[:known_at])


@pytest.mark.parametrize(
    "data",
    [
        b"PROXY " + b"A" * (MAX_V1_LENGTH - 6),
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2" + b"0" * 100,
        b"PROXY UNKNOWN" + b" " * 93 + b"\r\n",  # 108 bytes: its CRLF ends one byte too late
        V2_SIGNATURE + bytes([0x21, 0x11, 0xFF, 0xFF]),
        V2_SIGNATURE + bytes([0x20, 0x00]) + struct.pack("!H", MAX_V2_LENGTH - 15),
    ],
)
def test_too_long(data: bytes) -> None:
    with pytest.raises(ProxyHeaderError) as refused:
        parse_header(data)
    assert refused.value.outcome == "too_long"


def test_the_longest_accepted_v2_header() -> None:
    body = TCP4_BLOCK + bytes([0xE0]) + struct.pack("!H", MAX_V2_LENGTH - 16 - 12 - 3)
    body += bytes(MAX_V2_LENGTH - 16 - 12 - 3)
    data = _v2(0x21, 0x11, body)
    assert len(data) == MAX_V2_LENGTH
    header = parse_header(data)
    assert header is not None and header.length == MAX_V2_LENGTH


# -- trusted sources -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("networks", "named"),
    [
        ("10.0.0.0/33", "'10.0.0.0/33'"),
        ("10.0.0.0/8,example.com", "'example.com'"),
        ("10.0.0.0/8,", "''"),
        (["::1/129"], "'::1/129'"),
        ("1.2.3", "'1.2.3'"),
    ],
)
def test_trusted_sources_name_what_is_not_a_network(networks: Any, named: str) -> None:
    with pytest.raises(ValueError, match=r"^proxy_from: ") as error:
        TrustedSources(networks)
    message = str(error.value)
    assert message.startswith("proxy_from: ") and named in message and "CIDR" in message


def test_trusted_sources_refuse_nothing_at_all() -> None:
    with pytest.raises(ValueError, match="proxy_from is empty"):
        TrustedSources([])


def test_trusted_sources() -> None:
    default = TrustedSources()
    assert [str(n) for n in default.networks] == list(DEFAULT_TRUSTED)
    assert ("127.0.0.1", 5000) in default
    assert ("127.255.0.9", 1) in default
    assert ("::1", 5000, 0, 0) in default
    assert ("::ffff:127.0.0.1", 5000, 0, 0) in default  # a dual-stack listener's client
    assert ("10.0.0.1", 5000) not in default
    assert ("::2", 5000, 0, 0) not in default
    # Spaces around items, bare addresses, host bits set: all as an operator would write them.
    mixed = TrustedSources(" 10.1.2.3/8 , 192.0.2.10,2001:db8::/32")
    assert [str(n) for n in mixed.networks] == ["10.0.0.0/8", "192.0.2.10/32", "2001:db8::/32"]
    assert ("10.200.0.1", 1) in mixed
    assert ("192.0.2.10", 1) in mixed
    assert ("192.0.2.11", 1) not in mixed
    assert ("2001:db8::5", 1, 0, 0) in mixed
    assert ("fe80::1%lo", 1, 0, 1) not in mixed
    assert ("::ffff:10.9.9.9", 1, 0, 0) in mixed
    assert ("::ffff:11.9.9.9", 1, 0, 0) not in mixed
    assert TrustedSources([ipaddress.ip_network("::/0")]).networks == (
        ipaddress.ip_network("::/0"),
    )
    assert "10.0.0.0/8" in repr(mixed)


@pytest.mark.parametrize(
    "peer", ["/run/echo.sock", b"\x00abstract", None, (), ("",), ("not an ip", 1), (b"1", 1), 5]
)
def test_peers_that_are_not_ip_addresses_are_never_trusted(peer: Any) -> None:
    assert peer not in TrustedSources("0.0.0.0/0,::/0")


@settings(max_examples=300, deadline=None)
@given(
    network=st.ip_addresses(v=4).flatmap(
        lambda address: st.integers(0, 32).map(
            lambda prefix: ipaddress.ip_network(f"{address}/{prefix}", strict=False)
        )
    ),
    peers=st.lists(st.ip_addresses(v=4), min_size=1, max_size=20),
)
def test_ipv4_membership_mapped_or_not(
    network: ipaddress.IPv4Network, peers: list[ipaddress.IPv4Address]
) -> None:
    """An IPv4 client is trusted by an IPv4 network alike whether the listener saw it as
    IPv4 or as IPv4-mapped IPv6, and the answer is the same when asked again (cached)."""
    trusted = TrustedSources(str(network))
    for _ in range(2):
        for peer in peers:
            expected = peer in network
            assert ((str(peer), 1) in trusted) is expected
            assert ((f"::ffff:{peer}", 1, 0, 0) in trusted) is expected


def test_membership_stays_right_past_the_cache_bound() -> None:
    """The per-host cache is bounded (a scan of many addresses must not grow it for ever);
    the answers do not depend on it."""
    trusted = TrustedSources("10.0.0.0/16")
    for round_ in range(2):
        for index in range(3000):
            peer = (f"10.{index % 2}.{index // 256 % 256}.{index % 256}", round_)
            assert (peer in trusted) is (index % 2 == 0)
