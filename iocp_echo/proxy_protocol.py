"""The PROXY protocol, versions 1 and 2: who the client behind a load balancer really is.

An L4 balancer (HAProxy, nginx ``stream``, Envoy, a cloud NLB) opens its own connection to the
server, so the server sees the balancer's address, not the client's.  With the PROXY
protocol the balancer starts that connection with one header naming the client: version 1 is
a line of text (``PROXY TCP4 203.0.113.7 192.0.2.1 51234 8080\\r\\n``), version 2 a binary
block that starts with a 12-byte signature no other protocol begins with.  A ``LOCAL`` header
(version 2) says the balancer opened the connection itself, typically for a health check.

This module only reads and writes headers; ``_proxy_receiver.py`` puts the reading in front of
a connection.  :func:`parse_header` is incremental: given the bytes received so far it returns
the header, or ``None`` while the bytes could still be the start of one, or raises
:class:`ProxyHeaderError` as soon as they cannot be.  A header has a fixed maximum size
(:data:`MAX_V1_LENGTH`, :data:`MAX_V2_LENGTH`), so ``None`` never lasts past that many bytes:
the parser cannot be kept waiting by a stream that merely never ends, only by one that stalls,
which is the deadline's job.

Parsing is strict where the specification is: single spaces, addresses of the declared family,
ports without leading zeros, a version-2 address block as long as its family needs, and
type-length-value extensions (TLVs) that fill the rest exactly.  TLVs are kept, not interpreted.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import struct
from collections.abc import Iterable, Sequence
from typing import Any, Literal, NamedTuple, TypeAlias

__all__ = [
    "DEFAULT_HEADER_TIMEOUT",
    "DEFAULT_TRUSTED",
    "MAX_V1_LENGTH",
    "MAX_V2_LENGTH",
    "OUTCOMES",
    "V2_SIGNATURE",
    "ProxyHeader",
    "ProxyHeaderError",
    "TrustedSources",
    "bytes_wanted",
    "encode_v1",
    "encode_v2",
    "parse_header",
]

#: The 12 bytes every version-2 header starts with.
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
#: The longest version-1 header the specification allows, CRLF included.
MAX_V1_LENGTH = 107
#: The longest version-2 header accepted, signature included.  The format allows 16 + 65,535
#: bytes; addresses take at most 216 and balancers add a few hundred bytes of TLVs at most, so
#: a longer one is refused as ``too_long`` as soon as its length field is read.
MAX_V2_LENGTH = 4096
#: Who may send headers unless told otherwise: this machine only.
DEFAULT_TRUSTED = ("127.0.0.0/8", "::1/128")
#: Seconds a connection gets to send its whole header.
DEFAULT_HEADER_TIMEOUT = 5.0
#: What can become of a connection that must start with a header, each counted exactly once:
#: accepted (``v1``, ``v2``: a PROXY header of that version; ``local``: a version-2 LOCAL
#: header), or closed (``malformed``, ``too_long``, ``untrusted``: from a source not trusted to
#: send one; ``timeout``: not complete within the deadline; ``incomplete``: the client hung up
#: or reset before its header was complete).
OUTCOMES = ("v1", "v2", "local", "malformed", "too_long", "untrusted", "timeout", "incomplete")

Outcome: TypeAlias = Literal["malformed", "too_long"]
Address: TypeAlias = tuple[str, int]

_V1_PREFIX = b"PROXY "
_V1_SHORTEST = len(b"PROXY UNKNOWN\r\n")
_V2_FIXED = 16  # signature, version and command, family, length
_V2_COMMANDS = {0x20: "LOCAL", 0x21: "PROXY"}
_V2_FAMILIES = {0x00: 0, 0x11: 12, 0x21: 36, 0x31: 216}  # family byte: address block size
_V2_UNSPEC, _V2_TCP4, _V2_TCP6 = 0x00, 0x11, 0x21
_V2_HEAD = struct.Struct("!12sBBH")
_V4_BLOCK = struct.Struct("!4s4sHH")
_V6_BLOCK = struct.Struct("!16s16sHH")
_TLV_HEAD = struct.Struct("!BH")
_NOT_PRINTABLE = re.compile(rb"[^\x20-\x7e]")
#: An IPv4 address as version 1 writes it: four numbers 0-255, no leading zeros.
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4 = re.compile(rf"{_OCTET}(?:\.{_OCTET}){{3}}")
_PORT = re.compile(r"0|[1-9][0-9]{0,4}")


class ProxyHeaderError(ValueError):
    """Bytes that are not a valid PROXY header; *outcome* is ``"malformed"`` or ``"too_long"``."""

    def __init__(self, outcome: Outcome, message: str) -> None:
        super().__init__(message)
        self.outcome: Outcome = outcome


class ProxyHeader(NamedTuple):
    """One parsed header.

    *source* and *destination* are ``(host, port)``, or ``None`` when the header carries no
    address (``LOCAL``, version 1 ``UNKNOWN``, version 2 ``UNSPEC`` or ``UNIX``): then the
    connection's own addresses stand.  *length* is how many bytes the header took.  (A named
    tuple: one is made per connection, and it is the cheapest immutable record.)
    """

    version: int
    command: Literal["PROXY", "LOCAL"]
    source: Address | None
    destination: Address | None
    length: int
    tlvs: tuple[tuple[int, bytes], ...] = ()


def parse_header(data: bytes | bytearray | memoryview) -> ProxyHeader | None:
    """The header at the start of *data*; ``None`` if *data* is a proper prefix of one that
    may still complete; :class:`ProxyHeaderError` as soon as it cannot be one."""
    size = len(data)
    if size == 0:
        return None
    first = data[0]
    if first == _V1_PREFIX[0]:
        return _parse_v1(bytes(data[:MAX_V1_LENGTH]))
    if first == V2_SIGNATURE[0]:
        return _parse_v2(data)
    raise ProxyHeaderError("malformed", "not a PROXY protocol header (wrong first byte)")


def bytes_wanted(data: bytes | bytearray | memoryview) -> int:
    """How many more bytes can be read after *data* without reading past the header's end
    (0 once it is complete).  For a reader that must leave what follows the header unread."""
    header = parse_header(data)  # raises for what cannot become a header
    if header is not None:
        return 0
    size = len(data)
    if size == 0:
        return _V1_SHORTEST  # no header is shorter, of either version
    if data[0] == V2_SIGNATURE[0]:
        if size < _V2_FIXED:
            return _V2_FIXED - size
        length: int = _V2_HEAD.unpack_from(data)[3]
        return _V2_FIXED + length - size
    return max(1, _V1_SHORTEST - size)


def _parse_v1(data: bytes) -> ProxyHeader | None:
    prefix = min(len(data), len(_V1_PREFIX))
    if data[:prefix] != _V1_PREFIX[:prefix]:
        raise ProxyHeaderError("malformed", "not a PROXY protocol header")
    end = data.find(b"\r\n")
    line = data if end < 0 else data[:end]
    bad = _NOT_PRINTABLE.search(line)
    if bad is not None and not (end < 0 and bad.start() == len(line) - 1 and line[-1] == 0x0D):
        raise ProxyHeaderError("malformed", "version 1 header has a byte that is not printable")
    if end < 0:
        if len(data) >= MAX_V1_LENGTH:
            raise ProxyHeaderError(
                "too_long", f"version 1 header has no CRLF within {MAX_V1_LENGTH} bytes"
            )
        return None
    fields = line.decode("ascii").split(" ")
    family = fields[1] if len(fields) > 1 else ""
    if family == "UNKNOWN":
        # Whatever follows UNKNOWN is to be ignored, by the specification.
        return ProxyHeader(1, "PROXY", None, None, end + 2)
    if family not in ("TCP4", "TCP6") or len(fields) != 6:
        raise ProxyHeaderError("malformed", "version 1 header is not 'PROXY TCP4|TCP6 ...'")
    version = 4 if family == "TCP4" else 6
    source = (_v1_host(fields[2], version), _v1_port(fields[4]))
    destination = (_v1_host(fields[3], version), _v1_port(fields[5]))
    return ProxyHeader(1, "PROXY", source, destination, end + 2)


def _v1_host(text: str, version: int) -> str:
    if version == 4 and _IPV4.fullmatch(text):
        return text  # already canonical: four decimal numbers, no leading zeros
    try:
        if "%" in text:
            raise ValueError("a scope")
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ProxyHeaderError(
            "malformed", f"version 1 header has a bad address {text!r}"
        ) from None
    if address.version != version:
        raise ProxyHeaderError("malformed", f"version 1 header: {text!r} is not IPv{version}")
    return str(address)


def _v1_port(text: str) -> int:
    if not _PORT.fullmatch(text):
        raise ProxyHeaderError("malformed", f"version 1 header has a bad port {text!r}")
    port = int(text)
    if port > 65535:
        raise ProxyHeaderError("malformed", f"version 1 header has a bad port {text!r}")
    return port


def _parse_v2(data: bytes | bytearray | memoryview) -> ProxyHeader | None:
    size = len(data)
    if size < _V2_FIXED:
        # The slow path, for a header that comes in pieces: check what is there so far.
        prefix = min(size, len(V2_SIGNATURE))
        if bytes(data[:prefix]) != V2_SIGNATURE[:prefix]:
            raise ProxyHeaderError("malformed", "not a PROXY protocol header")
        if size > 12 and data[12] not in _V2_COMMANDS:
            raise ProxyHeaderError(
                "malformed", f"version 2 header: bad version/command {data[12]:#x}"
            )
        if size > 13 and data[13] not in _V2_FAMILIES:
            raise ProxyHeaderError(
                "malformed", f"version 2 header: unsupported family/transport {data[13]:#x}"
            )
        return None
    signature, command_byte, family, length = _V2_HEAD.unpack_from(data)
    if signature != V2_SIGNATURE:
        raise ProxyHeaderError("malformed", "not a PROXY protocol header")
    command = _V2_COMMANDS.get(command_byte)
    if command is None:
        raise ProxyHeaderError(
            "malformed", f"version 2 header: bad version/command {command_byte:#x}"
        )
    needed = _V2_FAMILIES.get(family)
    if needed is None:
        raise ProxyHeaderError(
            "malformed", f"version 2 header: unsupported family/transport {family:#x}"
        )
    total = _V2_FIXED + length
    if total > MAX_V2_LENGTH:
        raise ProxyHeaderError(
            "too_long", f"version 2 header of {total} bytes (at most {MAX_V2_LENGTH} accepted)"
        )
    if size < total:
        return None
    if command == "LOCAL":
        # The balancer's own connection: its addresses are to be ignored, whatever they are.
        try:
            tlvs = _v2_tlvs(data, _V2_FIXED + needed, total) if length >= needed else ()
        except ProxyHeaderError:
            tlvs = ()
        return ProxyHeader(2, "LOCAL", None, None, total, tlvs)
    if length < needed:
        raise ProxyHeaderError(
            "malformed", f"version 2 header: {length} address bytes, family needs {needed}"
        )
    start = _V2_FIXED + needed
    tlvs = _v2_tlvs(data, start, total) if total > start else ()
    source = destination = None
    if family == _V2_TCP4:
        src, dst, sport, dport = _V4_BLOCK.unpack_from(data, _V2_FIXED)
        source = (socket.inet_ntoa(src), sport)
        destination = (socket.inet_ntoa(dst), dport)
    elif family == _V2_TCP6:
        src, dst, sport, dport = _V6_BLOCK.unpack_from(data, _V2_FIXED)
        source = (str(ipaddress.IPv6Address(src)), sport)
        destination = (str(ipaddress.IPv6Address(dst)), dport)
    # UNSPEC and UNIX: no IP address to use; the connection's own addresses stand.
    return ProxyHeader(2, "PROXY", source, destination, total, tlvs)


def _v2_tlvs(
    data: bytes | bytearray | memoryview, offset: int, end: int
) -> tuple[tuple[int, bytes], ...]:
    """The TLVs in ``data[offset:end]``, which they must fill exactly."""
    tlvs = []
    while offset < end:
        if end - offset < 3:
            raise ProxyHeaderError("malformed", "version 2 header: truncated TLV")
        kind, length = _TLV_HEAD.unpack_from(data, offset)
        offset += 3
        if offset + length > end:
            raise ProxyHeaderError("malformed", "version 2 header: TLV longer than the header")
        tlvs.append((kind, bytes(data[offset : offset + length])))
        offset += length
    return tuple(tlvs)


def encode_v1(source: Address | None, destination: Address | None) -> bytes:
    """A version 1 header; ``UNKNOWN`` when either address is None."""
    if source is None or destination is None:
        return b"PROXY UNKNOWN\r\n"
    src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
    if src.version != dst.version:
        raise ValueError("source and destination must be of the same IP version")
    family = "TCP4" if src.version == 4 else "TCP6"
    return f"PROXY {family} {src} {dst} {source[1]} {destination[1]}\r\n".encode("ascii")


def encode_v2(
    source: Address | None,
    destination: Address | None,
    *,
    local: bool = False,
    tlvs: Iterable[tuple[int, bytes]] = (),
) -> bytes:
    """A version 2 header: ``LOCAL`` if *local*, else ``PROXY`` (``UNSPEC`` when either
    address is None), followed by *tlvs*."""
    extensions = b"".join(struct.pack("!BH", kind, len(value)) + value for kind, value in tlvs)
    command = 0x20 if local else 0x21
    if local or source is None or destination is None:
        family, block = _V2_UNSPEC, b""
    else:
        src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
        if src.version != dst.version:
            raise ValueError("source and destination must be of the same IP version")
        family = _V2_TCP4 if src.version == 4 else _V2_TCP6
        block = src.packed + dst.packed + struct.pack("!HH", source[1], destination[1])
    body = block + extensions
    return V2_SIGNATURE + struct.pack("!BBH", command, family, len(body)) + body


Network: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network


class TrustedSources:
    """The networks allowed to send PROXY headers, and the check of one peer against them.

    A connection from anywhere else is closed before a byte of it is read: a header from an
    untrusted source would let anyone claim any address.  Built from CIDR strings (one, a
    comma-separated list, or a sequence); a bare address is a one-address network.
    """

    __slots__ = ("_cache", "networks")

    def __init__(self, networks: str | Sequence[str | Network] = DEFAULT_TRUSTED) -> None:
        items = networks.split(",") if isinstance(networks, str) else list(networks)
        parsed: list[Network] = []
        for item in items:
            if isinstance(item, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
                parsed.append(item)
                continue
            text = str(item).strip()
            try:
                parsed.append(ipaddress.ip_network(text, strict=False))
            except ValueError:
                raise ValueError(
                    f"proxy_from: {text!r} is not a network; give CIDRs such as 10.0.0.0/8 "
                    "or addresses such as 192.0.2.10, comma-separated"
                ) from None
        if not parsed:
            raise ValueError("proxy_from is empty: give at least one network")
        self.networks: tuple[Network, ...] = tuple(parsed)
        self._cache: dict[str, bool] = {}

    def __contains__(self, peer: Any) -> bool:
        """Is the socket address *peer* (``(host, port, ...)``) in a trusted network?"""
        if not isinstance(peer, tuple) or not peer or not isinstance(peer[0], str):
            return False  # not an IP peer (a Unix socket's): never trusted
        host = peer[0]
        known = self._cache.get(host)
        if known is not None:
            return known
        try:
            address = ipaddress.ip_address(host.partition("%")[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # a dual-stack listener's IPv4 client
        trusted = any(address in network for network in self.networks)
        if len(self._cache) >= 1024:
            self._cache.clear()  # peers are few (balancers); a flood of others stays bounded
        self._cache[host] = trusted
        return trusted

    def __repr__(self) -> str:
        return f"TrustedSources({','.join(map(str, self.networks))!r})"
